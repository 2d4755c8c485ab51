"""One HTTP attempt of a delivery: resolve and check the target, connect to the checked
address, POST, read at most a few KiB of the answer. No Django here (the dispatcher passes the
settings), no redirects followed, no proxy from the environment, every phase under a timeout.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import httpx

from webhooks import targets

__all__ = ["MAX_RESPONSE_BYTES", "Outcome", "post"]

MAX_RESPONSE_BYTES = 4096  # of a receiver's answer, read and kept (as text, for people)
MAX_ERROR = 200


@dataclass(frozen=True, slots=True)
class Outcome:
    status_code: int | None
    error: str  # empty on success
    duration_ms: int
    address: str = ""
    excerpt: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.status_code is not None and 200 <= self.status_code < 300


def _why(exc: Exception, timeout: float) -> str:
    """A short account of a failed attempt, without the URL (its path may carry a token)."""
    if isinstance(exc, httpx.ConnectTimeout):
        return f"connect timed out after {timeout:g}s"
    if isinstance(exc, httpx.ReadTimeout):
        return f"no answer within {timeout:g}s"
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out after {timeout:g}s"
    if isinstance(exc, httpx.ConnectError):
        return f"could not connect: {exc}"[:MAX_ERROR]
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"protocol error: {exc}"[:MAX_ERROR]
    return f"{type(exc).__name__}: {exc}"[:MAX_ERROR]


def post(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    allow_private: bool,
    timeout: float,
    max_bytes: int = MAX_RESPONSE_BYTES,
) -> Outcome:
    """POST ``body`` to ``url`` once. Never raises for what the network or the receiver does."""
    started = time.monotonic()

    def took() -> int:
        return int((time.monotonic() - started) * 1000)

    try:
        target, addresses = targets.check(url, allow_private=allow_private)
    except targets.TargetRefused as exc:
        return Outcome(None, f"target refused: {exc}"[:MAX_ERROR], took())
    sent = dict(headers)
    sent["Host"] = target.host_header
    sent["Accept-Encoding"] = "identity"  # the answer is not decompressed: a few bytes stay few
    extensions = {}
    if target.scheme == "https" and target.host not in map(str, addresses):
        extensions["sni_hostname"] = target.host  # and the certificate is checked for it
    deadline = started + timeout
    client = httpx.Client(
        timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
        follow_redirects=False,
        trust_env=False,  # no proxy: it would connect to what was not checked
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=0),
    )
    try:
        # Each checked address in the resolver's order, the next one only when one refuses a
        # connection (a name with an IPv6 and an IPv4 address whose receiver listens on one).
        for i, address in enumerate(addresses):
            try:
                with client.stream(
                    "POST", target.url_for(address), content=body, headers=sent,
                    extensions=extensions,
                ) as response:  # fmt: skip
                    kept = bytearray()
                    for chunk in response.iter_raw():
                        kept += chunk
                        if len(kept) >= max_bytes or time.monotonic() > deadline:
                            break
                    code = response.status_code
                break
            except httpx.ConnectError as exc:
                if i + 1 == len(addresses) or time.monotonic() > deadline:
                    return Outcome(None, _why(exc, timeout), took(), str(address))
            except httpx.HTTPError as exc:
                return Outcome(None, _why(exc, timeout), took(), str(address))
    finally:
        client.close()
    excerpt = bytes(kept[:max_bytes]).decode("utf-8", "replace")
    if 200 <= code < 300:
        error = ""
    elif 300 <= code < 400:
        error = f"HTTP {code}: redirects are not followed"
    else:
        error = f"HTTP {code}"
    return Outcome(code, error, took(), str(address), excerpt)
