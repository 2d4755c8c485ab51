"""Run a function inside a named network namespace, from a thread of this process.

``setns(2)`` with ``CLONE_NEWNET`` changes the namespace of the calling *thread* only, so the
function runs in a short-lived thread switched into ``/run/netns/<name>`` (pyroute2's ``setns``:
Python 3.11 has no ``os.setns``); the caller's threads never leave their namespace. What the
function opens there (a TAP's file descriptor, a netlink socket) stays bound to that namespace
after the thread ends. Django-free, like the drivers that use it.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from typing import TypeVar

from pyroute2 import netns as _netns

from .base import HypervisorError

__all__ = ["NETNS_DIR", "check_name", "exists", "run_in"]

NETNS_DIR = "/run/netns"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

T = TypeVar("T")


def check_name(name: str) -> str:
    """``name`` if it is a safe namespace name (no path, no dot-dot), else HypervisorError."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise HypervisorError(f"invalid network namespace name {name!r}")
    return name


def exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, check_name(name)))


def run_in(name: str, fn: Callable[[], T], timeout: float = 10.0) -> T:
    """``fn()`` run in a thread that has joined the network namespace ``name``.

    The namespace must exist (it is never created here). Exceptions of ``fn`` are re-raised in
    the caller; a namespace that cannot be joined is a ``HypervisorError``.
    """
    path = os.path.join(NETNS_DIR, check_name(name))
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            error.append(HypervisorError(f"network namespace {name!r}: {exc.strerror}"))
            return
        try:
            _netns.setns(fd)
        except OSError as exc:
            error.append(HypervisorError(f"cannot join network namespace {name!r}: {exc}"))
            return
        finally:
            os.close(fd)
        try:
            result.append(fn())
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=target, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise HypervisorError(f"work in network namespace {name!r} took more than {timeout:g}s")
    if error:
        raise error[0]
    return result[0]
