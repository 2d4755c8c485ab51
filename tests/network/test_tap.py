"""TAP devices in a network namespace the test creates (root; nothing in the host's namespace)."""

from __future__ import annotations

import fcntl
import os
import struct
import uuid
from collections.abc import Iterator

import pytest
from pyroute2 import IPRoute, netns

from vms.network import netns as net_ns
from vms.network import tap
from vms.network.names import NetworkError

TUNGETIFF = 0x800454D2
IFF_PERSIST = 0x0800


@pytest.fixture
def ns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.fail("TAP tests need root (network namespaces)")
    name = f"tapns-{uuid.uuid4().hex[:8]}"
    netns.create(name)
    yield name
    netns.remove(name)


def _host_links() -> set[str]:
    with IPRoute() as ipr:
        return {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}


def _link(ns: str, ifname: str) -> dict[str, object]:
    def read() -> dict[str, object]:
        with IPRoute() as ipr:
            (link,) = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])
            return {"flags": link["flags"], "state": link.get_attr("IFLA_OPERSTATE")}

    return net_ns.call_in(ns, read)


def test_create_makes_a_persistent_tap_in_the_namespace_only(ns: str) -> None:
    before = _host_links()
    tap.create(ns, "tapa0")
    assert tap.exists(ns, "tapa0")
    assert tap.list_taps(ns) == ["tapa0"]
    assert int(_link(ns, "tapa0")["flags"]) & 1  # IFF_UP: ready to forward once opened
    assert _host_links() == before


def test_open_fd_attaches_with_vnet_headers_and_close_on_exec(ns: str) -> None:
    tap.create(ns, "tapb0")
    fd = tap.open_fd(ns, "tapb0")
    try:
        name, flags = struct.unpack("16sH", fcntl.ioctl(fd, TUNGETIFF, bytes(40))[:18])
        assert name.rstrip(b"\0") == b"tapb0"
        assert flags & tap.TAP_FLAGS == tap.TAP_FLAGS and flags & IFF_PERSIST
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert _link(ns, "tapb0")["state"] == "UP"  # carrier while a descriptor is open
    finally:
        os.close(fd)
    # Closing the descriptor leaves the persistent TAP in place.
    assert tap.exists(ns, "tapb0")


def test_create_and_open_makes_the_tap_and_hands_its_descriptor_in_one_visit(ns: str) -> None:
    fd = tap.create_and_open(ns, "tapg0")
    try:
        name, flags = struct.unpack("16sH", fcntl.ioctl(fd, TUNGETIFF, bytes(40))[:18])
        assert name.rstrip(b"\0") == b"tapg0"
        assert flags & tap.TAP_FLAGS == tap.TAP_FLAGS and flags & IFF_PERSIST
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert int(_link(ns, "tapg0")["flags"]) & 1
    finally:
        os.close(fd)
    assert tap.list_taps(ns) == ["tapg0"]  # persistent
    with pytest.raises(tap.TapError, match="already exists"):
        tap.create_and_open(ns, "tapg0")
    # A leftover of an earlier run of the same VM is replaced; what is not a TAP never is.
    index = net_ns.call_in(ns, lambda: _index(ns, "tapg0"))
    fd = tap.create_and_open(ns, "tapg0", replace=True)
    os.close(fd)
    assert tap.list_taps(ns) == ["tapg0"]
    assert net_ns.call_in(ns, lambda: _index(ns, "tapg0")) != index
    with pytest.raises(tap.TapError, match="already exists"):
        tap.create_and_open(ns, "lo", replace=True)


def _index(ns: str, ifname: str) -> int:
    with IPRoute() as ipr:
        return int(ipr.link_lookup(ifname=ifname)[0])


def test_delete_removes_the_tap_and_reports_a_missing_one(ns: str) -> None:
    tap.create(ns, "tapc0")
    assert tap.delete(ns, "tapc0") is True
    assert not tap.exists(ns, "tapc0")
    assert tap.delete(ns, "tapc0") is False


def test_create_refuses_a_name_already_taken(ns: str) -> None:
    tap.create(ns, "tapd0")
    with pytest.raises(tap.TapError, match="already exists"):
        tap.create(ns, "tapd0")


def test_open_and_delete_refuse_what_is_not_a_tap(ns: str) -> None:
    with pytest.raises(tap.TapError, match="not a TAP"):
        tap.open_fd(ns, "lo")
    with pytest.raises(tap.TapError, match="not a TAP"):
        tap.delete(ns, "lo")
    with pytest.raises(tap.TapError, match="no TAP"):
        tap.open_fd(ns, "nothere")


@pytest.mark.parametrize("ifname", ["", "a" * 16, "../x", "a b", "-x", "x/y", "0tap"])
def test_invalid_interface_names_are_refused(ns: str, ifname: str) -> None:
    with pytest.raises(NetworkError, match="invalid interface name"):
        tap.create(ns, ifname)


@pytest.mark.parametrize("name", ["", "../etc", "a/b", ".hidden", "x" * 65])
def test_invalid_or_missing_namespaces_are_refused(name: str) -> None:
    with pytest.raises(NetworkError, match="invalid network namespace"):
        tap.create(name, "tape0")


def test_a_missing_namespace_is_an_error_not_created() -> None:
    name = f"nons-{uuid.uuid4().hex[:8]}"
    with pytest.raises(tap.TapError, match="does not exist"):
        tap.create(name, "tapf0")
    assert name not in netns.listnetns()
