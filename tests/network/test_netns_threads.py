"""Threads that live in a namespace (``vms.network.netns.submit``): what a server uses to open
many sockets there."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

from vms.network import netns
from vms.network.names import NetworkError


@pytest.fixture
def far() -> Iterator[str]:
    name = f"nbt{secrets.token_hex(3)}"
    netns.create(name)
    try:
        yield name
    finally:
        netns.remove(name)


def _own_ns_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def test_a_namespace_thread_stays_there_and_a_namespace_made_again_gets_a_new_one(
    far: str,
) -> None:
    first = netns.submit(far, _own_ns_inode).result(10)
    assert first == (netns.NETNS_DIR / far).stat().st_ino != _own_ns_inode()
    assert netns.submit(far, _own_ns_inode).result(10) == first  # the same thread, still there
    netns.remove(far)
    netns.create(far)
    second = netns.submit(far, _own_ns_inode).result(10)
    assert second == (netns.NETNS_DIR / far).stat().st_ino != first
    with pytest.raises(NetworkError):
        netns.submit(f"nbu{secrets.token_hex(3)}", _own_ns_inode)
