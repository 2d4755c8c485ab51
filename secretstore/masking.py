"""Masking secret values in what leaves a guest: exec output, downloads, console output.

A ``Masker`` knows the values given to a VM (and their common encodings: base64, standard and
URL-safe) and replaces every occurrence with ``[secret:NAME]``. Streams are masked through a
``StreamMasker``, which holds back only the end of what it has seen that could still become a
value (the longest suffix that is a proper prefix of one), so a value split across chunks is
still found, and output that cannot be a value (a shell prompt) is never delayed.

Pure: no Django, no database; the caller says which values (``secretstore.guests``).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterable

__all__ = ["Masker", "StreamMasker", "MaskingWriter", "NO_MASKER"]


def _encodings(value: bytes) -> set[bytes]:
    found = {value}
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        padded = encode(value)
        found.add(padded)
        # Unpadded too: a value's base64 inside a longer base64 text has no padding.
        if len(padded.rstrip(b"=")) >= 4:
            found.add(padded.rstrip(b"="))
    return found


class Masker:
    """Replaces the values of named secrets (and their encodings) in bytes and text."""

    def __init__(self, secrets: Iterable[tuple[str, bytes]]) -> None:
        by_pattern: dict[bytes, str] = {}
        for name, value in secrets:
            if not value:
                continue
            for pattern in _encodings(value):
                by_pattern.setdefault(pattern, name)
        self._names = by_pattern
        # Longest first: where two start at one place, the longer wins.
        ordered = sorted(by_pattern, key=len, reverse=True)
        self._re = re.compile(b"|".join(re.escape(p) for p in ordered)) if ordered else None
        self.max_len = max((len(p) for p in ordered), default=0)

    def __bool__(self) -> bool:
        return self._re is not None

    @property
    def names(self) -> list[str]:
        return sorted(set(self._names.values()))

    def token(self, pattern: bytes) -> bytes:
        return f"[secret:{self._names[pattern]}]".encode()

    def mask(self, data: bytes) -> bytes:
        if self._re is None:
            return data
        return self._re.sub(lambda m: self.token(m.group(0)), data)

    def mask_text(self, text: str) -> str:
        if self._re is None:
            return text
        return self.mask(text.encode("utf-8", "surrogateescape")).decode("utf-8", "surrogateescape")

    def found_in(self, data: bytes) -> list[str]:
        if self._re is None:
            return []
        return sorted({self._names[m.group(0)] for m in self._re.finditer(data)})

    def _held(self, tail: bytes) -> int:
        """How many bytes at the end of ``tail`` could be the start of a value: the longest
        suffix that is a proper prefix of a pattern. Only the places where a pattern's first
        byte occurs are compared (in C), so a large value costs little on ordinary output."""
        n, best = len(tail), 0
        for pattern in self._names:
            first = pattern[:1]
            i = tail.find(first, max(0, n - (len(pattern) - 1)))
            while i != -1 and n - i > best:
                if pattern.startswith(tail[i:]):
                    best = n - i
                    break
                i = tail.find(first, i + 1)
        return best

    def stream(self) -> StreamMasker:
        return StreamMasker(self)


class StreamMasker:
    """One stream's masking state: ``feed`` chunks, then ``flush`` what was held back."""

    def __init__(self, masker: Masker) -> None:
        self.masker = masker
        self._tail = b""
        self.masked: set[str] = set()

    def feed(self, chunk: bytes) -> bytes:
        m = self.masker
        if m._re is None:
            return chunk
        buf = self._tail + chunk
        out = bytearray()
        done = 0
        for match in m._re.finditer(buf):
            out += buf[done : match.start()]
            out += m.token(match.group(0))
            self.masked.add(m._names[match.group(0)])
            done = match.end()
        rest = buf[done:]
        held = m._held(rest)
        cut = len(rest) - held
        out += rest[:cut]
        self._tail = rest[cut:]
        return bytes(out)

    def flush(self) -> bytes:
        tail, self._tail = self._tail, b""
        return tail


class MaskingWriter:
    """A binary file object's ``write`` that masks on the way (``close_stream`` at the end)."""

    def __init__(self, dest: object, masker: Masker) -> None:
        self._dest: Callable[[bytes], object] = dest.write  # type: ignore[attr-defined]
        self._stream = masker.stream()
        self.size = 0

    def write(self, data: bytes) -> int:
        out = self._stream.feed(bytes(data))
        if out:
            self._dest(out)
            self.size += len(out)
        return len(data)

    def close_stream(self) -> list[str]:
        out = self._stream.flush()
        if out:
            self._dest(out)
            self.size += len(out)
        return sorted(self._stream.masked)


NO_MASKER = Masker(())
