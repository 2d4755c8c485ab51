"""Where a webhook may be delivered: the URL's rules and the addresses it may reach (SSRF).

A target URL is http or https, with a host, no credentials and no fragment. Its host is resolved
and *every* address it resolves to must be allowed, at subscribe time and again at each delivery;
the delivery then connects to the address that was checked (``Target.url_for``: the address in
the URL, the host name in the Host header and, over TLS, in the SNI and the certificate check),
so a name that resolves elsewhere the second time (DNS rebinding) reaches nothing unchecked.

Never allowed: unspecified (0.0.0.0, ::), multicast, link-local (169.254.0.0/16 with the cloud
metadata service at 169.254.169.254, fe80::/10), the other metadata addresses named below,
reserved ranges, and IPv6 forms that carry an IPv4 address the rules cannot see through (NAT64,
Teredo). Allowed only when the subscription (an administrator's choice) or the site allows
private targets: loopback, private networks (RFC 1918, fc00::/7, 100.64.0.0/10) and the other
ranges that are not globally routable. Everything else (global unicast) is allowed.

No Django here: the settings come in as arguments.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "MAX_URL_LENGTH",
    "Target",
    "TargetRefused",
    "check",
    "classify",
    "parse",
    "resolve",
]

MAX_URL_LENGTH = 2048
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud metadata services outside the link-local range (AWS over IPv6, Alibaba Cloud).
METADATA = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: private in practice
NAT64 = ipaddress.ip_network("64:ff9b::/96")
NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


class TargetRefused(ValueError):
    """The URL or one of the addresses it reaches is not allowed (the message says why)."""


@dataclass(frozen=True, slots=True)
class Target:
    scheme: str
    host: str  # as written, lower case, IDNA-encoded; an IPv6 literal without brackets
    port: int
    path: str  # path and query, at least "/"

    @property
    def origin(self) -> str:
        """scheme://host:port: what events record of a target (a path may carry a token)."""
        return f"{self.scheme}://{_netloc(self.host, self.port)}"

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return _netloc(self.host, None if self.port == default else self.port)

    def url_for(self, address: IPAddress) -> str:
        """The URL that connects to ``address`` (checked) instead of resolving the host again."""
        return f"{self.scheme}://{_netloc(str(address), self.port)}{self.path}"


def _netloc(host: str, port: int | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port is None else f"{shown}:{port}"


def parse(url: str) -> Target:
    """The target of ``url``, or ``TargetRefused`` saying what is wrong with it."""
    if not isinstance(url, str) or not url:
        raise TargetRefused("a URL is required")
    if len(url) > MAX_URL_LENGTH:
        raise TargetRefused(f"at most {MAX_URL_LENGTH} characters")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise TargetRefused("no spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise TargetRefused(f"not a valid URL ({exc})") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise TargetRefused("the scheme must be http or https")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise TargetRefused(
            "no credentials in the URL: the receiver authenticates deliveries by their signature"
        )
    if parts.fragment or url.endswith("#"):
        raise TargetRefused("no fragment (#...) in the URL")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise TargetRefused("the URL has no host")
    if port == 0:
        raise TargetRefused("port 0 is not a port")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is None:
        try:
            host = host.encode("idna").decode("ascii").lower()
        except UnicodeError as exc:
            raise TargetRefused("the host is not a valid name") from exc
        labels = host.split(".")
        if any(not label or len(label) > 63 for label in labels) or len(host) > 253:
            raise TargetRefused("the host is not a valid name")
        if not all(c.isalnum() or c in "-." for c in host):
            raise TargetRefused("the host is not a valid name")
    else:
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
            raise TargetRefused("no IPv6 zone in the host")
        host = str(address)
    path = urlunsplit(("", "", parts.path or "/", parts.query, ""))
    return Target(scheme, host, port or (443 if scheme == "https" else 80), path)


def _embedded_v4(address: IPAddress) -> ipaddress.IPv4Address | None:
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None:
            return address.sixtofour
    return None


def classify(address: IPAddress, *, allow_private: bool = False) -> str | None:
    """Why ``address`` may not be reached (None: it may). ``allow_private`` admits loopback and
    private networks, never link-local, metadata, multicast, unspecified or reserved ones."""
    embedded = _embedded_v4(address)
    if embedded is not None:
        why = classify(embedded, allow_private=allow_private)
        return f"{why} (inside {address})" if why else None
    if isinstance(address, ipaddress.IPv6Address) and (
        address in NAT64 or address in NAT64_LOCAL or address.teredo is not None
    ):
        return "an IPv6 translation address (NAT64 or Teredo), whose IPv4 end is not checked"
    if address in METADATA:
        return "a cloud metadata address"
    if address.is_unspecified:
        return "the unspecified address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_link_local:
        return "a link-local address (169.254.0.0/16, fe80::/10)"
    if address.is_loopback:
        return None if allow_private else "a loopback address"
    if address.is_reserved:
        return "a reserved address"
    if address.is_global and address not in SHARED:
        return None
    return None if allow_private else "a private or non-routable address"


def resolve(host: str, port: int) -> list[IPAddress]:
    """The addresses ``host`` resolves to (a literal is itself), in the resolver's order."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise TargetRefused(f"the host {host} does not resolve") from exc
    out: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in out:
            out.append(address)
    if not out:
        raise TargetRefused(f"the host {host} has no address")
    return out


def check(url: str, *, allow_private: bool = False) -> tuple[Target, list[IPAddress]]:
    """Parse ``url``, resolve its host and check every address; ``TargetRefused`` when any is
    not allowed (one bad address among good ones refuses it all)."""
    target = parse(url)
    addresses = resolve(target.host, target.port)
    for address in addresses:
        why = classify(address, allow_private=allow_private)
        if why:
            shown = "" if target.host == str(address) else f" ({target.host} resolves to it)"
            raise TargetRefused(f"{address} is {why}{shown}: not allowed as a webhook target")
    return target, addresses
