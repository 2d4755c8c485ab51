"""Preview URLs: the signed grants, the preview hosts and ports (no database access here).

A guest's port is served at ``{scheme}://{port}-{vm_id}.{SANDBOX_PREVIEW_DOMAIN}/`` by the
web process itself (``sandbox_site.preview`` proxies it; this module decides). That host is
another origin than the dashboard's, so guest JavaScript can never act as the signed-in user:
the dashboard's session cookie is never read there, only these credentials are:

- an API token (``Authorization: Bearer sbx_...``) whose user may see the VM and whose scopes
  allow reading VMs (``VM_READ``); a read-only token may only use safe methods;
- a *grant*: a value signed with a key derived from ``SECRET_KEY`` (``django.core.signing``,
  one salt per use) that names the VM, the port, the user it was issued to, its kind and its
  expiry. It comes in the URL (``?sbx_preview=...``) from a shareable link (kind ``link``,
  made by ``vms.commands.create_preview_link``) or from the dashboard's hand-off (kind
  ``session``, valid for a minute, made when a signed-in user opens a preview), and is then
  exchanged for a host-only cookie on the preview host carrying the same kind of grant.

Every use is checked against the database: the VM must exist and not be destroyed, the issuing
user must still be active and still allowed (a link dies with its issuer's right to share, a
session grant with its user's right to see the VM), and the guest's address is taken from the
VM's record (running, with an address), never from the request: ``vms.preview_access``
decides each request; ``vms.commands.create_preview_link`` makes and records shareable links.
"""

from __future__ import annotations

import re
import secrets
import time
import uuid
from dataclasses import dataclass

from django.conf import settings
from django.core import signing

from vms.models import VirtualMachine

__all__ = [
    "COOKIE_NAME",
    "COOKIE_SALT",
    "HANDOFF",
    "LINK",
    "QUERY_PARAM",
    "SESSION",
    "URL_SALT",
    "Grant",
    "cookie_name",
    "cookie_value",
    "from_cookie",
    "from_url",
    "is_our_authorization",
    "issue",
    "parse_host",
    "port_allowed",
    "preview_origin",
    "session_grant",
    "url_value",
]

QUERY_PARAM = "sbx_preview"  # the grant in a URL; removed before the guest sees the request
COOKIE_NAME = "sbx_preview"  # over https: "__Host-sbx_preview" (see cookie_name)

# Kinds of grant. LINK: a shareable link, recorded when made. HANDOFF: the dashboard's redirect
# to the preview host, exchanged at once for a SESSION cookie there.
LINK, HANDOFF, SESSION = "link", "handoff", "session"
_KINDS = frozenset({LINK, HANDOFF, SESSION})

# Signing salts: a grant is good only where it was made for (a cookie value is no URL grant).
URL_SALT = "vms.previews.url"
COOKIE_SALT = "vms.previews.cookie"

_LABEL_RE = re.compile(
    r"^(?P<port>[0-9]{1,5})-(?P<vm>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$"
)
_TOKEN_KEYWORDS = frozenset({"bearer", "token"})


@dataclass(frozen=True)
class Grant:
    """Signed permission to reach one port of one VM until ``expires`` (Unix seconds)."""

    vm_id: uuid.UUID
    port: int
    user_id: int
    kind: str
    expires: int
    link_id: str = ""

    def dumps(self, salt: str) -> str:
        payload = {
            "v": str(self.vm_id),
            "p": self.port,
            "u": self.user_id,
            "k": self.kind,
            "e": self.expires,
            "i": self.link_id,
        }
        return signing.dumps(payload, salt=salt)

    @classmethod
    def loads(cls, value: str, salt: str) -> Grant | None:
        """The grant ``value`` holds if its signature is ours for ``salt``, else None."""
        if not value or len(value) > 512:
            return None
        try:
            data = signing.loads(value, salt=salt)
            grant = cls(
                vm_id=uuid.UUID(str(data["v"])),
                port=int(data["p"]),
                user_id=int(data["u"]),
                kind=str(data["k"]),
                expires=int(data["e"]),
                link_id=str(data.get("i", "")),
            )
        except (signing.BadSignature, KeyError, TypeError, ValueError):
            return None
        return grant if grant.kind in _KINDS else None

    @property
    def seconds_left(self) -> int:
        return self.expires - int(time.time())


# --- Hosts, ports, cookies --------------------------------------------------------------------


def parse_host(host: str) -> tuple[int, uuid.UUID] | None:
    """``(port, vm_id)`` named by a preview host (``8080-<uuid>.<domain>``, any port suffix
    removed and lower-cased by the caller), or None when it names none."""
    domain = settings.SANDBOX_PREVIEW_DOMAIN
    suffix = "." + domain
    if not domain or not host.endswith(suffix):
        return None
    match = _LABEL_RE.match(host[: -len(suffix)])
    if match is None:
        return None
    return int(match.group("port")), uuid.UUID(match.group("vm"))


def port_allowed(port: int) -> bool:
    return 1 <= port <= 65535 and port not in settings.SANDBOX_PREVIEW_DENIED_PORTS


def cookie_name(secure: bool) -> str:
    """Over https the ``__Host-`` prefix makes the browser refuse the cookie unless it is
    host-only, Secure and for ``/``: another preview host (another guest) cannot set it."""
    return f"__Host-{COOKIE_NAME}" if secure else COOKIE_NAME


def is_our_authorization(value: str) -> bool:
    """Whether an Authorization header carries one of our API tokens (then it is ours to check
    and never forwarded); other schemes (a guest app's own Basic auth) are the guest's."""
    parts = value.split()
    return len(parts) == 2 and parts[0].lower() in _TOKEN_KEYWORDS and parts[1].startswith("sbx_")


def preview_origin(vm_id: uuid.UUID, port: int, *, secure: bool, host_port: str = "") -> str:
    """The preview origin of ``port`` on ``vm_id``; ``host_port`` is the port the dashboard
    was reached on (the same server answers both), kept when it is not the default."""
    scheme = "https" if secure else "http"
    default = "443" if secure else "80"
    suffix = f":{host_port}" if host_port and host_port != default else ""
    return f"{scheme}://{port}-{vm_id}.{settings.SANDBOX_PREVIEW_DOMAIN}{suffix}"


# --- Issuing grants ---------------------------------------------------------------------------


def issue(vm: VirtualMachine, port: int, user_id: int, kind: str, seconds: int) -> Grant:
    """A new grant (not yet signed); the caller has checked that it may be issued."""
    if kind not in _KINDS:
        raise ValueError(f"unknown grant kind {kind!r}")
    return Grant(
        vm_id=vm.pk,
        port=port,
        user_id=user_id,
        kind=kind,
        expires=int(time.time()) + seconds,
        link_id=secrets.token_hex(8) if kind == LINK else "",
    )


def url_value(grant: Grant) -> str:
    """``grant`` signed for a URL (``?sbx_preview=...``)."""
    return grant.dumps(URL_SALT)


def cookie_value(grant: Grant) -> str:
    """``grant`` signed for the preview cookie."""
    return grant.dumps(COOKIE_SALT)


def from_url(value: str) -> Grant | None:
    return Grant.loads(value, URL_SALT)


def from_cookie(value: str) -> Grant | None:
    return Grant.loads(value, COOKIE_SALT)


def session_grant(handoff: Grant) -> Grant:
    """The cookie a dashboard hand-off turns into: the same user, VM and port, for longer."""
    return Grant(
        vm_id=handoff.vm_id,
        port=handoff.port,
        user_id=handoff.user_id,
        kind=SESSION,
        expires=int(time.time()) + settings.SANDBOX_PREVIEW_SESSION_S,
    )
