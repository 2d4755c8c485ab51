"""Fixtures for the Cloud Hypervisor driver tests: the OpenAPI reference, the simulator as a fake
``cloud-hypervisor`` executable, short runtime directories and VM specs.

Runtime directories live directly under /tmp: unix socket paths are limited to 107 bytes and
pytest's own tmp_path is often longer than that once ``control.sock`` is appended.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chsim import spec as chspec
from vms.hypervisors.base import DiskSpec, NetSpec, RuntimeDir, VMSpec
from vms.hypervisors.cloud_hypervisor import CloudHypervisor
from vms.hypervisors.jail import JailConfig
from vms.hypervisors.process import iter_processes


@pytest.fixture(scope="session")
def openapi() -> chspec.OpenApi:
    # The document is part of the repository: its absence is a broken checkout (or a wrong
    # $CHSIM_SPEC), never a reason to skip the contract tests.
    path = chspec.spec_path()
    if not path.is_file():
        pytest.fail(f"Cloud Hypervisor OpenAPI document not found at {path}")
    return chspec.load()


@pytest.fixture(scope="session")
def fake_ch(openapi: chspec.OpenApi) -> Iterator[Path]:
    """An executable named ``cloud-hypervisor`` that runs the simulator.

    bash's ``exec -a`` makes argv[0] the script's own path, so /proc/<pid>/cmdline reads like a
    real VMM's and the driver's process identity checks are exercised unchanged. PYTHONPATH
    carries this interpreter's path, so the simulator sees the same packages as the tests.
    """
    root = Path(tempfile.mkdtemp(prefix="chsim-bin-", dir="/tmp"))
    binary = root / "cloud-hypervisor"
    pythonpath = os.pathsep.join([str(chspec.REPO_ROOT), *[p for p in sys.path if p]])
    binary.write_text(
        "#!/bin/bash\n"
        f"export PYTHONPATH={shlex.quote(pythonpath)}\n"
        f"export CHSIM_SPEC={shlex.quote(str(openapi.path))}\n"
        f'exec -a "$0" {shlex.quote(sys.executable)} -m tests.chsim "$@"\n'
    )
    binary.chmod(0o755)
    yield binary
    # Nothing the simulator started may outlive the session.
    leftovers = [p for p in iter_processes([binary.name]) if p.argv[0] == str(binary)]
    for proc in leftovers:
        os.kill(proc.pid, signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)
    assert not leftovers, f"simulated VMMs left running: {leftovers}"


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="chs-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


SIM_ENV = (
    "CHSIM_AGENT_DELAY",
    "CHSIM_CPU_REMOVAL_DELAY",
    "CHSIM_GUEST_AGENT",
    "CHSIM_POWEROFF_DELAY",
    "CHSIM_RECORD",
)


@pytest.fixture(scope="session")
def sim_jail(openapi: chspec.OpenApi) -> JailConfig:
    """A jail for the simulator: what it (a Python program, unlike CH) needs to read (its
    interpreter, its packages, this checkout, the API document) and its CHSIM_* settings."""
    needs = {Path(sys.prefix), Path(sys.base_prefix), chspec.REPO_ROOT, openapi.path.parent}
    return JailConfig(mode="on", extra_ro=tuple(sorted(needs)), pass_env=SIM_ENV)


@pytest.fixture
def driver(fake_ch: Path) -> CloudHypervisor:
    """The driver on an unjailed simulator: the contract and lifecycle tests record requests
    and run helpers outside any one runtime directory (the jailed driver is ``jailed_driver``)."""
    return CloudHypervisor(
        binary=fake_ch,
        api_timeout=5.0,
        slow_timeout=20.0,
        start_timeout=15.0,
        jail_config=JailConfig(mode="off"),
    )


@pytest.fixture
def jailed_driver(fake_ch: Path, sim_jail: JailConfig) -> CloudHypervisor:
    return CloudHypervisor(
        binary=fake_ch,
        api_timeout=5.0,
        slow_timeout=20.0,
        start_timeout=15.0,
        jail_config=sim_jail,
    )


class Runtimes:
    """Hands out runtime directories and destroys every VMM in them at teardown."""

    def __init__(self, root: Path, driver: CloudHypervisor) -> None:
        self.root = root
        self.driver = driver
        self.made: list[RuntimeDir] = []

    def __call__(self, name: str = "rt") -> RuntimeDir:
        runtime = RuntimeDir(self.root / name)
        self.made.append(runtime)
        return runtime

    def close(self) -> None:
        for runtime in self.made:
            self.driver.destroy(runtime)
            assert not runtime.root.exists()


@pytest.fixture
def runtimes(workdir: Path, driver: CloudHypervisor) -> Iterator[Runtimes]:
    made = Runtimes(workdir, driver)
    yield made
    made.close()


@pytest.fixture
def runtime(runtimes: Runtimes) -> RuntimeDir:
    return runtimes()


@pytest.fixture
def make_spec(workdir: Path):  # noqa: ANN201 - a factory
    """``make_spec(**changes)``: a Linux VMSpec whose kernel, initramfs and disks exist."""
    images = workdir / "images"
    images.mkdir()
    kernel = images / "vmlinuz"
    kernel.write_bytes(b"\x7fELF fake kernel")
    initramfs = images / "initrd.img"
    initramfs.write_bytes(b"070701 fake initramfs")
    root = images / "root.raw"
    with open(root, "wb") as fh:
        fh.truncate(64 << 20)  # sparse, like a real image
        fh.seek(1 << 20)
        fh.write(b"root filesystem data")
    data = images / "data.qcow2"
    data.write_bytes(b"QFI\xfb" + b"\0" * 508)

    def make(**changes: object) -> VMSpec:
        spec = VMSpec(
            vm_id="vm-test",
            vcpus=1,
            max_vcpus=2,
            memory_mib=256,
            max_memory_mib=512,
            kernel=kernel,
            initramfs=initramfs,
            cmdline="console=ttyS0 root=/dev/vda rw",
            disks=(
                DiskSpec(path=root, readonly=True, format="raw", id="root"),
                DiskSpec(path=data, readonly=False, format="qcow2", id="data"),
            ),
            nets=(NetSpec(tap="tap-test0", mac="52:54:00:12:34:56"),),
        )
        return spec.replace(**changes)

    return make
