"""VM templates: built-in defaults plus an optional YAML file, synced into the Template table.

YAML (``SANDBOX_TEMPLATES_FILE``)::

    templates:
      - name: linux-small
        description: One vCPU, 256 MiB
        boot: linux
        vcpus: 1
        memory_mib: 256
        disk_mib: 512
        timeout_s: 3600       # optional: its VMs' lifetime (docs/vms.md, "Lifetimes")
        on_expiry: stop       # optional: what the lifetime's end does, stop (default) or destroy
        idle_timeout_s: 600   # optional: paused after this long unused (docs/vms.md, "Idle pause")
        idle_to_disk: true    # optional: that pause suspends it to disk (its memory freed)
        priority: normal      # optional: under host pressure high, normal (default) or low
        pressure_opt_out: false  # optional: true: its VMs are never ballooned
        secrets:              # optional: every VM made from it receives these (docs/security.md)
          - {name: REGISTRY_TOKEN, env: REGISTRY_TOKEN}
          - {name: deploy_key, file: /root/.ssh/id_ed25519}

A template's secrets are references, resolved when a VM is created as the creating user may use
them (its own, then its groups'); a create request's own references win for the same variable or
file. Rows edited in the admin (source "admin") are left alone by the sync.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, ValidationError

from secretstore import guests
from vms.models import Template

BUILTIN: list[dict[str, Any]] = [
    {
        "name": "linux-default",
        "description": "Debian 12, direct kernel boot: 2 vCPU, 512 MiB",
        "boot": "linux",
        "image": "linux",
        "vcpus": 2,
        "memory_mib": 512,
        "disk_mib": 1024,
    },
    {
        "name": "linux-small",
        "description": "Debian 12, direct kernel boot: 1 vCPU, 256 MiB",
        "boot": "linux",
        "image": "linux",
        "vcpus": 1,
        "memory_mib": 256,
        "disk_mib": 512,
    },
    {
        "name": "linux-uefi",
        "description": "Debian 12 through UEFI firmware (OVMF): 1 vCPU, 512 MiB",
        "boot": "uefi",
        "image": "uefi",
        "vcpus": 1,
        "memory_mib": 512,
        "disk_mib": 512,
    },
    {
        "name": "windows-default",
        "description": "Windows through UEFI: 4 vCPU, 2048 MiB (needs a Windows image on the host)",
        "boot": "uefi",
        "image": "windows",
        "vcpus": 4,
        "memory_mib": 2048,
        "disk_mib": 32768,
    },
]

FIELDS = (
    "description",
    "boot",
    "image",
    "vcpus",
    "memory_mib",
    "disk_mib",
    "secrets",
    "timeout_s",
    "on_expiry",
    "idle_timeout_s",
    "idle_to_disk",
    "priority",
    "pressure_opt_out",
)


def load_yaml(path: str | Path) -> list[dict[str, Any]]:
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ImproperlyConfigured(f"SANDBOX_TEMPLATES_FILE {path}: {exc}") from exc
    items = (doc or {}).get("templates", [])
    if not isinstance(items, list):
        raise ImproperlyConfigured(f"{path}: 'templates' must be a list")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "name" not in item:
            raise ImproperlyConfigured(f"{path}: template #{i} needs a name")
        missing = [f for f in ("boot", "vcpus", "memory_mib") if f not in item]
        if missing:
            raise ImproperlyConfigured(f"{path}: template {item['name']} lacks {missing}")
        if item["boot"] not in ("linux", "uefi"):
            raise ImproperlyConfigured(
                f"{path}: template {item['name']}: boot must be linux or uefi"
            )
        timeout = item.get("timeout_s")
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, int)
            or not 1 <= timeout <= settings.SANDBOX_VM_LIFETIME_MAX_S
        ):
            raise ImproperlyConfigured(
                f"{path}: template {item['name']}: timeout_s must be 1 to "
                f"{settings.SANDBOX_VM_LIFETIME_MAX_S} seconds"
            )
        idle = item.get("idle_timeout_s")
        if idle is not None and (
            isinstance(idle, bool)
            or not isinstance(idle, int)
            or not 1 <= idle <= settings.SANDBOX_IDLE_TIMEOUT_MAX_S
        ):
            raise ImproperlyConfigured(
                f"{path}: template {item['name']}: idle_timeout_s must be 1 to "
                f"{settings.SANDBOX_IDLE_TIMEOUT_MAX_S} seconds"
            )
        if not isinstance(item.get("idle_to_disk", False), bool):
            raise ImproperlyConfigured(
                f"{path}: template {item['name']}: idle_to_disk must be true or false"
            )
        if item.get("idle_to_disk") and idle is None:
            raise ImproperlyConfigured(
                f"{path}: template {item['name']}: idle_to_disk needs an idle_timeout_s"
            )
        if item.get("on_expiry", "stop") not in ("stop", "destroy"):
            raise ImproperlyConfigured(
                f"{path}: template {item['name']}: on_expiry must be stop or destroy"
            )
        if item.get("priority", "normal") not in ("high", "normal", "low"):
            raise ImproperlyConfigured(
                f"{path}: template {item['name']}: priority must be high, normal or low"
            )
        if not isinstance(item.get("pressure_opt_out", False), bool):
            raise ImproperlyConfigured(
                f"{path}: template {item['name']}: pressure_opt_out must be true or false"
            )
        try:
            item["secrets"] = guests.validate_refs(item.get("secrets"))
        except ValidationError as exc:
            raise ImproperlyConfigured(
                f"{path}: template {item['name']}: secrets {'; '.join(exc.messages)}"
            ) from exc
        out.append(item)
    return out


def sync_templates() -> None:
    wanted = [(t, "builtin") for t in BUILTIN]
    if settings.SANDBOX_TEMPLATES_FILE:
        wanted += [(t, "yaml") for t in load_yaml(settings.SANDBOX_TEMPLATES_FILE)]
    for spec, source in wanted:
        row = Template.objects.filter(name=spec["name"]).first()
        if row is not None and row.source == "admin":
            continue
        values = {f: spec[f] for f in FIELDS if f in spec} | {"source": source}
        values.setdefault("image", "linux" if spec["boot"] == "linux" else "uefi")
        values.setdefault("secrets", [])
        values.setdefault("timeout_s", None)
        values.setdefault("on_expiry", "stop")
        values.setdefault("idle_timeout_s", None)
        values.setdefault("idle_to_disk", False)
        values.setdefault("priority", "normal")
        values.setdefault("pressure_opt_out", False)
        Template.objects.update_or_create(name=spec["name"], defaults=values)


def sync_after_migrate(sender: Any = None, **kwargs: Any) -> None:
    sync_templates()
