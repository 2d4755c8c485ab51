"""Shared real-QEMU guests for the guest tests (no Django).

Booting is the expensive part (a cold boot is 4-5 CPU-seconds under TCG on 2 cores), so guests
are shared: one template guest is cold-booted and saved once (and cached on disk across runs,
keyed by image and shape), and the guests the tests use are restored from it. Tests that need
their own guest (snapshot, kill -9, destroy) restore one too: about half a second each.
Runtime directories live under a short temp path (unix socket paths are limited to 107 bytes).
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vms.agent import readiness
from vms.agent.client import AgentClient, AgentError
from vms.hypervisors.base import DiskSpec, RuntimeDir, TemplateHooks, VMSpec
from vms.hypervisors.qemu import QemuHypervisor
from vms.hypervisors.templates import TemplateCache
from vms.images import make_data_disk

HELLO_TIMEOUT = 90.0  # cold boot under TCG on a loaded 2-core host


@dataclass
class Guest:
    spec: VMSpec
    runtime: RuntimeDir
    hv: QemuHypervisor
    client: AgentClient

    def reconnect(self, timeout: float = 30.0) -> AgentClient:
        with contextlib.suppress(Exception):
            self.client.close()
        self.client = connect_agent(self.hv, self.runtime, timeout, self.client.credential)
        return self.client

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
        self.hv.destroy(self.runtime)


def connect_agent(
    hv: QemuHypervisor, runtime: RuntimeDir, timeout: float, credential: str | None
) -> AgentClient:
    """Greet the guest's agent with ``credential`` (its template's); None: a cold-booted guest,
    enrolled here with a fresh one."""
    client = AgentClient(
        lambda: hv.agent_connect(runtime, 2.0),
        timeout=30.0,
        name=runtime.root.name,
        credential=credential,
    )
    if credential is None:
        with contextlib.suppress(AgentError):  # not_enrolled: the agent answers
            client.hello(timeout=timeout)
        client.enroll(secrets.token_urlsafe(32))
    client.hello(timeout=timeout)
    return client


@pytest.fixture(scope="session")
def qemu_binary() -> str:
    binary = shutil.which("qemu-system-x86_64")
    if binary is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    return binary


@pytest.fixture(scope="session")
def linux_image(qemu_binary: str):  # noqa: ANN201 - vms.images.LinuxImage
    from vms import images

    return images.ensure_built()


@pytest.fixture(scope="session")
def uefi_image(qemu_binary: str):  # noqa: ANN201 - vms.images.UefiImage
    from vms import images

    return images.ensure_built(uefi=True)


@pytest.fixture(scope="session")
def hv(qemu_binary: str) -> QemuHypervisor:
    return QemuHypervisor()


@pytest.fixture(scope="session")
def runtime_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="g-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def make_spec(linux_image, runtime_root: Path) -> Callable[..., VMSpec]:  # noqa: ANN001
    def make(vm_id: str, *, memory_mib: int = 256, vcpus: int = 1) -> VMSpec:
        return VMSpec(
            vm_id=vm_id,
            vcpus=vcpus,
            memory_mib=memory_mib,
            kernel=linux_image.kernel,
            initramfs=linux_image.initramfs,
            cmdline=linux_image.cmdline,
            disks=(DiskSpec(linux_image.rootfs, readonly=True, id="root"),),
        )

    return make


@pytest.fixture(scope="session")
def templates(hv: QemuHypervisor, runtime_root: Path) -> TemplateCache:
    hooks = TemplateHooks(readiness.wait_ready, readiness.reset_identity, make_data_disk)
    return hv.template_cache(hooks, scratch_root=runtime_root, boot_timeout=HELLO_TIMEOUT)


@pytest.fixture(scope="session")
def start_guest(
    hv: QemuHypervisor,
    templates: TemplateCache,
    make_spec: Callable[..., VMSpec],
    runtime_root: Path,
) -> Iterator[Callable[..., Guest]]:
    """Start a guest from the template (``cold=True``: a cold boot) and connect its agent.

    Every guest started here is destroyed at the end of the session if a test did not."""
    started: list[Guest] = []

    def start(vm_id: str, *, cold: bool = False, spec: VMSpec | None = None) -> Guest:
        spec = spec or make_spec(vm_id)
        runtime = RuntimeDir(runtime_root / vm_id)
        credential = None
        if cold:
            hv.start(spec, runtime)
        else:
            result = templates.start(spec, runtime, fallback=False)
            assert result.restored
            credential = result.guest_secret
        try:
            client = connect_agent(hv, runtime, HELLO_TIMEOUT, credential)
        except BaseException:
            hv.destroy(runtime)
            raise
        guest = Guest(spec, runtime, hv, client)
        started.append(guest)
        return guest

    yield start
    for guest in started:
        guest.close()


@pytest.fixture(scope="session")
def shared_guest(start_guest: Callable[..., Guest]) -> Guest:
    """One restored guest for the read-mostly tests (exec, files, pause)."""
    return start_guest("shared")
