"""Roles as groups of permissions: admin, operator, viewer, auditor.

Each user holds one role. The permission lists name codenames as ``app_label.codename``; a
codename whose model does not exist yet is skipped, and ``sync_roles`` runs after every migrate, so
a new app's permissions join their roles as soon as its migration runs.
"""

from __future__ import annotations

from typing import Any

from django.apps import apps
from django.contrib.auth.models import Group, Permission

from accounts.permission_cache import clear_permission_cache

ADMIN, OPERATOR, VIEWER, AUDITOR = "admin", "operator", "viewer", "auditor"
ROLES = (ADMIN, OPERATOR, VIEWER, AUDITOR)

# Guest permissions that a role or a token may hold a subset of (see vms).
VM_VIEW = ["vms.view_virtualmachine", "vms.view_snapshot"]  # read every user's VMs
VM_DRIVE = [
    "vms.add_virtualmachine",
    "vms.operate_vm",
    "vms.delete_virtualmachine",
    "vms.exec_vm",
    "vms.read_files",
    "vms.write_files",
    "vms.console_vm",
    "vms.snapshot_vm",
    "vms.rollback_snapshot",
]
# The secrets store (secretstore): keeping secrets of one's own (and one's groups') and giving
# them to guests; reading every secret's metadata (never a value: nobody reads those).
SECRET_DRIVE = [
    "secretstore.add_secret",
    "secretstore.change_secret",
    "secretstore.delete_secret",
    "secretstore.use_secret",
]
SECRET_VIEW = ["secretstore.view_secret"]
# Webhooks (webhooks): subscriptions of one's own, delivered as oneself (operators: their VMs'
# events; auditors: the whole trail, read-only); seeing every user's subscriptions. Viewers hold
# none: a subscription sends data out of the product.
WEBHOOK_DRIVE = [
    "webhooks.add_subscription",
    "webhooks.change_subscription",
    "webhooks.delete_subscription",
]
WEBHOOK_VIEW = ["webhooks.view_subscription"]
# What a token's scopes may name: accounts.scopes.SCOPES.
AUDIT = ["audit.view_audit_trail", "audit.export_audit", "audit.verify_audit"]

ROLE_PERMISSIONS: dict[str, list[str]] = {
    ADMIN: ["*"],
    # its own VMs only: view_* grants reading everyone's
    OPERATOR: VM_DRIVE + SECRET_DRIVE + WEBHOOK_DRIVE,
    VIEWER: VM_VIEW,
    AUDITOR: VM_VIEW + AUDIT + SECRET_VIEW + WEBHOOK_DRIVE + WEBHOOK_VIEW,
}


def role_of(user: Any) -> str:
    """The user's role: its role group. Django's superuser flag follows the admin role (written
    with it by ``accounts.commands``), it does not define it."""
    names = {g.name for g in user.groups.all()} if user.pk else set()
    for role in ROLES:
        if role in names:
            return role
    return ""


def _permissions(spec: list[str]) -> list[Permission]:
    if spec == ["*"]:
        return list(Permission.objects.all())
    found = []
    for dotted in spec:
        app_label, codename = dotted.split(".", 1)
        perm = Permission.objects.filter(
            content_type__app_label=app_label, codename=codename
        ).first()
        if perm is not None:
            found.append(perm)
    return found


def sync_roles() -> None:
    for role, spec in ROLE_PERMISSIONS.items():
        group, _ = Group.objects.get_or_create(name=role)
        group.permissions.set(_permissions(spec))
    clear_permission_cache()


def sync_roles_after_migrate(sender: Any = None, **kwargs: Any) -> None:
    """post_migrate fires once per app that has models; sync after the last of them, when all
    permissions exist."""
    with_models = [app for app in apps.get_app_configs() if app.models_module is not None]
    if sender is with_models[-1]:
        sync_roles()
