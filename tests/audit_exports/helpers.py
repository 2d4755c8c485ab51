"""Building and rewriting evidence bundles in tests."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path

from audit import bundle, commands
from audit.actor import Actor
from audit.store import head

SHELL = Actor.system(channel="shell", name="tests")


def make_bundle(path: Path, *, first: int = 1, last: int | None = None) -> Path:
    """Sign the pending tail, then write a bundle of [first, last] (default: up to the head)."""
    end = last if last is not None else head()[0]
    commands.sign_digest(SHELL)
    with path.open("wb") as fh:
        bundle.write_bundle(fh, first=first, last=end, name=path.name)
    return path


def rewrite(src: Path, dst: Path, member: str, change: Callable[[bytes], bytes]) -> Path:
    """Copy a zip, passing one member through ``change`` (the manifest is left as it was)."""
    with zipfile.ZipFile(src) as zin:
        members = [(info, zin.read(info.filename)) for info in zin.infolist()]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zout:
        for info, data in members:
            zout.writestr(info.filename, change(data) if info.filename == member else data)
    dst.write_bytes(buf.getvalue())
    return dst


def edit_lines(src: Path, dst: Path, change: Callable[[list[bytes]], list[bytes]]) -> Path:
    def apply(data: bytes) -> bytes:
        lines = data.splitlines(keepends=True)
        return b"".join(change(lines))

    return rewrite(src, dst, "events.jsonl", apply)
