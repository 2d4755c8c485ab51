"""TAP devices for VM NICs, created and opened inside a network namespace (no Django).

A VM's NIC is a persistent TAP in the product's namespace, attached to its network's bridge
(``vms.network.bridge``). The VMM never opens it by name: this module opens the TAP's file
descriptor inside the namespace and the driver hands it to the VMM (QEMU ``-netdev tap,fd=N``),
so the VMM process stays in the host's namespace and needs no ``CAP_NET_ADMIN``.

The descriptor is opened with ``IFF_VNET_HDR``: the VMM then exchanges virtio-net headers with
the kernel, so the guest gets checksum and segmentation offloads (QEMU turns them on when the
TAP has vnet headers, as it does when it opens a TAP itself). A snapshot's virtio-net state
records the offloads the guest negotiated, so TAPs of VMs restored from a template must be
opened the same way as the template's: always through ``open_fd``.

Every function joins the namespace from a short-lived thread (``netns.call_in``); the calling
thread never changes namespace.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
from collections.abc import Callable
from typing import TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import netns
from .names import NetworkError, check_ifname, check_netns

__all__ = ["TapError", "create", "create_and_open", "delete", "exists", "list_taps", "open_fd"]

T = TypeVar("T")

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TAP_FLAGS = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR


class TapError(NetworkError):
    """A TAP could not be created, opened or removed; ``str()`` says why."""


def _in(ns: str, fn: Callable[[], T]) -> T:
    """``fn()`` inside the existing namespace ``ns`` (never created here)."""
    if not netns.exists(ns):
        raise TapError(f"network namespace {ns} does not exist")
    return netns.call_in(ns, fn)


def _ifreq(ifname: str, flags: int) -> bytes:
    return struct.pack("16sH22x", ifname.encode(), flags)


def _attach(ifname: str) -> int:
    """Open /dev/net/tun in the current thread's namespace and attach it to TAP ``ifname``
    (creating it if missing). Returns the descriptor (close-on-exec)."""
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, _ifreq(ifname, TAP_FLAGS))
    except OSError:
        os.close(fd)
        raise
    return fd


def _link_index(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def create(ns: str, ifname: str) -> None:
    """Create the persistent TAP ``ifname`` in namespace ``ns`` and set it up.

    Fails with TapError if an interface of that name already exists there (names are given out
    once; a leftover is for the reconciler, not to be reused silently).
    """
    check_netns(ns)
    check_ifname(ifname)

    def work() -> None:
        with IPRoute() as ipr:
            if _link_index(ipr, ifname) is not None:
                raise TapError(f"interface {ifname} already exists in namespace {ns}")
            fd = _attach(ifname)
            try:
                fcntl.ioctl(fd, TUNSETPERSIST, 1)
            finally:
                os.close(fd)
            index = _link_index(ipr, ifname)
            if index is None:
                raise TapError(f"TAP {ifname} vanished right after its creation in {ns}")
            ipr.link("set", index=index, state="up")

    try:
        _in(ns, work)
    except OSError as exc:
        raise TapError(f"cannot create TAP {ifname} in {ns}: {exc.strerror or exc}") from exc


def create_and_open(ns: str, ifname: str, *, replace: bool = False) -> int:
    """``create`` and ``open_fd`` in one visit of the namespace: the persistent TAP ``ifname``,
    up, and a descriptor of it for a VMM (close-on-exec). With ``replace``, a TAP of that name
    left by an earlier run of the same VM is removed first (any other kind of interface of that
    name is an error, as in ``create``)."""
    check_netns(ns)
    check_ifname(ifname)

    def work() -> int:
        with IPRoute() as ipr:
            index = _link_index(ipr, ifname)
            if index is not None:
                if not replace or _kind(ipr, index) != "tun":
                    raise TapError(f"interface {ifname} already exists in namespace {ns}")
                with contextlib.suppress(NetlinkError):
                    ipr.link("del", index=index)
            fd = _attach(ifname)
            try:
                fcntl.ioctl(fd, TUNSETPERSIST, 1)
                index = _link_index(ipr, ifname)
                if index is None:
                    raise TapError(f"TAP {ifname} vanished right after its creation in {ns}")
                ipr.link("set", index=index, state="up")
            except BaseException:
                os.close(fd)
                raise
            return fd

    try:
        return _in(ns, work)
    except OSError as exc:
        raise TapError(f"cannot create TAP {ifname} in {ns}: {exc.strerror or exc}") from exc


def open_fd(ns: str, ifname: str) -> int:
    """A new descriptor of the existing TAP ``ifname`` in ``ns``, for a VMM (close-on-exec: pass
    it with ``pass_fds``). The caller closes it once the VMM holds its own copy."""
    check_netns(ns)
    check_ifname(ifname)

    def work() -> int:
        with IPRoute() as ipr:
            index = _link_index(ipr, ifname)
            if index is None:
                raise TapError(f"no TAP {ifname} in namespace {ns}")
            kind = _kind(ipr, index)
            if kind != "tun":
                raise TapError(f"{ifname} in {ns} is a {kind or 'plain'} device, not a TAP")
        return _attach(ifname)

    try:
        return _in(ns, work)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise TapError(f"TAP {ifname} in {ns} is already in use by another process") from exc
        raise TapError(f"cannot open TAP {ifname} in {ns}: {exc.strerror or exc}") from exc


def _kind(ipr: IPRoute, index: int) -> str | None:
    (link,) = ipr.get_links(index)
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info is not None else None


def delete(ns: str, ifname: str) -> bool:
    """Remove TAP ``ifname`` from ``ns``; False if there was none. A VMM still holding it loses
    its NIC (the guest sees the link go down); it does not stop the VMM."""
    check_netns(ns)
    check_ifname(ifname)

    def work() -> bool:
        with IPRoute() as ipr:
            index = _link_index(ipr, ifname)
            if index is None:
                return False
            if _kind(ipr, index) != "tun":
                raise TapError(f"{ifname} in {ns} is not a TAP: not removed")
            try:
                ipr.link("del", index=index)
            except NetlinkError as exc:
                if exc.code == errno.ENODEV:
                    return False  # removed by someone else meanwhile
                raise TapError(f"cannot remove TAP {ifname} from {ns}: {exc}") from exc
            return True

    return _in(ns, work)


def exists(ns: str, ifname: str) -> bool:
    check_netns(ns)
    check_ifname(ifname)

    def work() -> bool:
        with IPRoute() as ipr:
            return _link_index(ipr, ifname) is not None

    return _in(ns, work)


def list_taps(ns: str, prefix: str = "") -> list[str]:
    """Names of the TAP devices in ``ns`` (optionally only those starting with ``prefix``),
    sorted: what the reconciler compares with the VMs it knows."""
    check_netns(ns)

    def work() -> list[str]:
        names = []
        with IPRoute() as ipr:
            for link in ipr.get_links():
                info = link.get_attr("IFLA_LINKINFO")
                kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
                name = link.get_attr("IFLA_IFNAME")
                if kind == "tun" and name.startswith(prefix):
                    names.append(name)
        return sorted(names)

    return _in(ns, work)
