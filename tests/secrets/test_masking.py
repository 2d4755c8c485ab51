"""Masking: every occurrence of a value (raw or base64) becomes [secret:NAME], in one piece of
bytes or in a stream cut anywhere, and output that cannot be a value is never held back."""

from __future__ import annotations

import base64

from secretstore.masking import Masker

VALUE = b"hunter2-and-more"


def test_values_and_their_base64_are_replaced() -> None:
    m = Masker([("PW", VALUE)])
    text = b"a " + VALUE + b" b " + base64.b64encode(VALUE) + b" c"
    assert m.mask(text) == b"a [secret:PW] b [secret:PW] c"
    assert m.mask_text("x" + VALUE.decode()) == "x[secret:PW]"


def test_a_value_split_across_chunks_at_every_point_is_masked() -> None:
    m = Masker([("PW", VALUE), ("OTHER", b"zzzz-other")])
    data = b"before " + VALUE + b" middle zzzz-other " + VALUE + b" after $ "
    for size in range(1, len(data) + 1):
        stream = m.stream()
        out = b"".join(stream.feed(data[i : i + size]) for i in range(0, len(data), size))
        out += stream.flush()
        assert out == b"before [secret:PW] middle [secret:OTHER] [secret:PW] after $ ", size
        assert stream.masked == {"PW", "OTHER"}


def test_output_that_cannot_start_a_value_is_not_held_back() -> None:
    stream = Masker([("PW", VALUE)]).stream()
    assert stream.feed(b"root@guest:~# ") == b"root@guest:~# "
    assert stream.feed(b"hun") == b""  # could be the start of the value
    assert stream.feed(b"gry\n") == b"hungry\n"


def test_no_secrets_no_change() -> None:
    m = Masker([])
    assert not m
    assert m.stream().feed(b"abc") == b"abc"


def test_a_large_value_costs_little_on_a_large_stream() -> None:
    import os
    import time

    key = base64.b64encode(os.urandom(48 * 1024))  # a 64 KiB value, like a big key file
    m = Masker([("BIG", key)])
    data = os.urandom(4 << 20) + key + b"tail"
    stream = m.stream()
    started = time.monotonic()
    out = b"".join(stream.feed(data[i : i + 65536]) for i in range(0, len(data), 65536))
    out += stream.flush()
    assert time.monotonic() - started < 5.0
    assert out.endswith(b"[secret:BIG]tail") and key not in out
