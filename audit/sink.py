"""The digest sink: a copy of every signed digest, made as it is signed, outside the database.

Someone who can write to the database can delete the newest events together with the digests
that cover them; the copy in the sink still names them, so ``verify_audit_chain``, the signer
(which refuses to sign over a cut) and the offline verifier (``--sink``) find the cut.

The default sink is a directory of write-once files, one per digest, named by its sequence
number (``00000000/000000000042.json``, ten thousand to a subdirectory) and created with O_EXCL,
read-only: a second digest under a used
sequence number, which is what a signer would make after a cut, is refused. Give the directory
its own mount, a WORM store or a host the database role cannot reach. Another sink is a class
named by ``SANDBOX_DIGEST_SINK_CLASS`` with ``write(entry)``, ``read()`` (every copy, for a full
verification) and optionally ``newest()`` (the newest copy, for the check before each signing);
a sink that cannot be read back (syslog, a webhook) returns None from ``read()``, and then only
the other copies (bundles) can check continuity.

Django-free apart from ``configured()``, so the offline verifier can read a copied directory.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

__all__ = ["FileSink", "Sink", "SinkEntry", "SinkError", "configured", "entry_of", "newest_of"]

PER_DIRECTORY = 10_000


class SinkError(Exception):
    """The sink refused or lost a copy: signing must not go ahead."""


@dataclass(frozen=True)
class SinkEntry:
    """One digest as copied: its sequence number, signed document and signature."""

    sequence: int
    document: str
    signature: str

    def as_json(self) -> str:
        return (
            json.dumps(
                {"sequence": self.sequence, "document": self.document, "signature": self.signature},
                sort_keys=True,
                separators=(",", ":"),
            )
            + "\n"
        )

    @property
    def doc(self) -> dict[str, Any]:
        return json.loads(self.document)


def entry_of(digest: Any) -> SinkEntry:
    """The sink entry of a ``Digest`` row (or anything with those attributes)."""
    return SinkEntry(int(digest.sequence), digest.document, digest.signature)


class Sink(Protocol):
    def write(self, entry: SinkEntry) -> None: ...

    def read(self) -> dict[int, SinkEntry] | None: ...


class FileSink:
    """A directory of write-once files, one per digest."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def _path(self, sequence: int) -> Path:
        return self.directory / f"{sequence // PER_DIRECTORY:08d}" / f"{sequence:012d}.json"

    def write(self, entry: SinkEntry) -> None:
        path = self._path(entry.sequence)
        data = entry.as_json().encode()
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
        except FileExistsError:
            if path.read_bytes() == data:
                return  # the same digest copied twice (a retried signing)
            raise SinkError(
                f"the sink already holds a different digest number {entry.sequence} ({path}): "
                "the database lost digests that were signed before (the tail was cut), or a "
                "commit failed after the copy was made"
            ) from None
        except OSError as exc:
            raise SinkError(f"cannot write to the digest sink {self.directory}: {exc}") from exc
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            with contextlib.suppress(OSError):  # not every file system syncs directories
                dir_fd = os.open(path.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except OSError as exc:
            raise SinkError(f"cannot write {path}: {exc}") from exc

    def _shards(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if p.is_dir())

    def _files(self) -> Iterator[Path]:
        for shard in self._shards():
            yield from sorted(shard.glob("*.json"))

    def _load(self, path: Path) -> SinkEntry:
        try:
            raw = json.loads(path.read_text())
            entry = SinkEntry(int(raw["sequence"]), str(raw["document"]), str(raw["signature"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SinkError(f"{path} is not a digest copy: {exc}") from exc
        if path != self._path(entry.sequence):
            raise SinkError(f"{path} holds digest number {entry.sequence}")
        return entry

    def read(self) -> dict[int, SinkEntry]:
        entries: dict[int, SinkEntry] = {}
        for path in self._files():
            entry = self._load(path)
            entries[entry.sequence] = entry
        return entries

    def newest(self) -> SinkEntry | None:
        """The copy with the highest number, reading one directory listing, not every file."""
        for shard in reversed(self._shards()):
            files = sorted(shard.glob("*.json"))
            if files:
                return self._load(files[-1])
        return None


def newest_of(destination: Sink) -> tuple[bool, SinkEntry | None]:
    """(readable, newest copy) of any sink: ``newest()`` when it has one, else ``read()``."""
    newest = getattr(destination, "newest", None)
    if newest is not None:
        return True, newest()
    copies = destination.read()
    if copies is None:
        return False, None
    return True, copies[max(copies)] if copies else None


def configured() -> Sink:
    """The sink named by the settings (a ``FileSink`` on ``SANDBOX_DIGEST_SINK_DIR`` by default)."""
    # Here, not at the top: the offline verifier (audit.offline) uses this module without Django.
    from django.conf import settings

    dotted = settings.SANDBOX_DIGEST_SINK_CLASS
    if dotted == "audit.sink.FileSink":
        return FileSink(settings.SANDBOX_DIGEST_SINK_DIR)
    module, _, name = dotted.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    sink: Sink = cls()
    return sink
