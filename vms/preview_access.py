"""Preview URLs: whether a request may reach a guest's port, and the guest's address.

``sandbox_site.preview`` (the proxy) asks :func:`authorize` for each request and each websocket;
the credentials and grants are described in ``vms.previews``. Everything is read from the
database on every request: a revoked token, a deactivated user, a VM that stopped or was
destroyed, or an issuer who lost the right to share takes effect on the next request.
"""

from __future__ import annotations

import ipaddress
import uuid
from dataclasses import dataclass

from django.contrib.auth import get_user_model
from rest_framework.exceptions import AuthenticationFailed

from accounts import authentication, scopes
from accounts import commands as account_commands
from accounts.caller import Caller
from audit.actor import Actor
from vms import lifecycle, policy
from vms.models import PreviewLink, VirtualMachine
from vms.previews import (
    HANDOFF,
    LINK,
    Grant,
    cookie_value,
    from_cookie,
    from_url,
    port_allowed,
    session_grant,
)

__all__ = ["Access", "Refused", "authorize"]


class Refused(Exception):
    """The request may not reach the guest: ``status`` and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Access:
    """A request allowed through: where to send it, and what to tell the browser."""

    ip: str
    port: int
    by_cookie: bool = False  # ambient credential: a websocket must come from the preview origin
    set_cookie: str = ""  # a grant to store in the preview cookie...
    cookie_max_age: int = 0  # ...for this many seconds


def authorize(
    vm_id: uuid.UUID,
    port: int,
    *,
    method: str,
    websocket: bool,
    client_ip: str | None,
    authorization: str = "",
    url_grant: str = "",
    cookie_grants: tuple[str, ...] = (),
) -> Access:
    """Whether a request for ``port`` of ``vm_id`` may reach the guest, and where it goes.

    The credentials are tried in this order: an API token, a grant in the URL, the preview
    cookie(s). Raises ``Refused`` with the status to answer. Runs database queries: call it from
    a thread in async code.
    """
    if not port_allowed(port):
        raise Refused(403, "This port may not be previewed.")
    if authorization:
        vm = _by_token(authorization, vm_id, method=method, websocket=websocket, ip=client_ip)
        return _access(vm, port)
    if url_grant:
        grant = from_url(url_grant)
        vm = _check_grant(grant, vm_id, port)
        assert grant is not None
        kept = grant if grant.kind != HANDOFF else session_grant(grant)
        access = _access(vm, port)
        return Access(
            access.ip,
            access.port,
            set_cookie=cookie_value(kept),
            cookie_max_age=max(1, kept.seconds_left),
        )
    refusal: Refused | None = None
    for value in cookie_grants:
        grant = from_cookie(value)
        try:
            vm = _check_grant(grant, vm_id, port)
        except Refused as exc:
            refusal = refusal or exc
            continue
        access = _access(vm, port)
        return Access(access.ip, access.port, by_cookie=True)
    if refusal is not None:
        raise refusal
    raise Refused(
        401,
        "Sign in: open this preview from the dashboard, use a shared link, or send an API token.",
    )


def _by_token(
    authorization: str, vm_id: uuid.UUID, *, method: str, websocket: bool, ip: str | None
) -> VirtualMachine:
    raw = authorization.split()[1]
    try:
        token = authentication.verify(raw, ip)  # records refusals of a token that exists
    except AuthenticationFailed as exc:
        raise Refused(401, str(exc.detail)) from None
    # A websocket carries writes to the guest both ways: like an unsafe method.
    refused = scopes.refusal(token, scopes.VM_READ, write=websocket or scopes.is_write(method))
    if refused is not None:
        account_commands.record_token_rejected(
            Actor.anonymous(token.user.username), token, refused.reason
        )
        raise Refused(403, refused.detail)
    caller = Caller(user=token.user, token=token)
    vm = policy.visible_vms(caller).filter(pk=vm_id).exclude(state=lifecycle.GONE).first()
    if vm is None:
        raise Refused(404, "No such VM.")  # another user's VM looks like a missing one
    return vm


def _check_grant(grant: Grant | None, vm_id: uuid.UUID, port: int) -> VirtualMachine:
    if grant is None:
        raise Refused(403, "This preview link is not valid.")
    if grant.vm_id != vm_id or grant.port != port:
        raise Refused(403, "This preview link is for another VM or port.")
    if grant.seconds_left <= 0:
        raise Refused(403, "This preview link has expired.")
    if grant.kind == LINK and not _link_open(grant.link_id):
        raise Refused(403, "This preview link was revoked.")
    vm = (
        VirtualMachine.objects.select_related("owner")
        .filter(pk=vm_id)
        .exclude(state=lifecycle.GONE)
        .first()
    )
    if vm is None:
        raise Refused(404, "This VM no longer exists.")
    user = get_user_model().objects.filter(pk=grant.user_id, is_active=True).first()
    if user is None:
        raise Refused(403, "The user who made this preview link is no longer active.")
    caller = Caller(user=user)
    if grant.kind == LINK:
        allowed = policy.may(caller, "share_preview", vm.owner_id)
    else:
        allowed = policy.may_see(caller, vm.owner_id)
    if not allowed:
        raise Refused(403, "The user who made this preview link may no longer share this VM.")
    return vm


def _link_open(link_id: str) -> bool:
    """A shareable link opens only while its record exists and is not revoked."""
    return PreviewLink.objects.filter(link_id=link_id, revoked_at__isnull=True).exists()


def _access(vm: VirtualMachine, port: int) -> Access:
    if vm.state not in lifecycle.verb("share_preview").allowed_from:
        raise Refused(503, f"The VM is {vm.state}, not running.")
    if not vm.ip:
        raise Refused(503, "The VM has no network address.")
    ip = str(ipaddress.ip_address(vm.ip))  # from the VM's record only, never from the request
    return Access(ip, port)
