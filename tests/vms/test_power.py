"""On a real guest, through the worker's handlers: a stop is a clean power-off by the ACPI power
button (the image's acpid), a force stop says it was forced, a reboot is the guest's own and
gives the VM its identity again; and a started guest's serial console shows a prompt naming
the VM's host before anyone types.

The event payloads are what is asserted (``graceful``, ``how`` and the worker's own ``seconds``),
never the test's wall clock.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.test import Client

from audit.models import Event
from vms import commands, live, runtime, worker
from vms.agent import credentials
from vms.models import VirtualMachine

pytestmark = [pytest.mark.guest, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def owner(caller_for: Any) -> Any:
    return caller_for("operator")


@pytest.fixture
def running(owner: Any, vm_dirs: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[VirtualMachine]:
    from vms import images

    image = images.ensure_built()  # this checkout's recipe (images/), built if it changed
    # Pinned: the cache is shared, and another checkout may make its own image current meanwhile.
    monkeypatch.setenv("SANDBOX_IMAGE_DIR", str(image.directory))
    accepted = commands.create(owner, name="Power_Test.1", template="linux-small")
    try:
        assert worker.handle(accepted.request.event_id) == "vm.started"
        started = Event.objects.get(type="vm.started", aggregate_id=str(accepted.vm_id))
        assert started.payload["image_id"] == image.image_id
        vm = VirtualMachine.objects.get(pk=accepted.vm_id)
        yield vm
    finally:
        vm = VirtualMachine.objects.get(pk=accepted.vm_id)
        if vm.state != "destroyed":
            destroy = commands.destroy(owner, vm)
            worker.handle(destroy.request.event_id)


def outcome(request: Any) -> Event:
    return Event.objects.get(causation_id=str(request.event_id), type__in=_OUTCOMES)


_OUTCOMES = ("vm.stopped", "vm.stop_failed", "vm.rebooted", "vm.reboot_failed")


def guest_run(vm: VirtualMachine, *argv: str) -> str:
    with credentials.client_for_vm(vm) as agent:
        agent.hello(timeout=30)
        result = agent.exec(list(argv), timeout=30)
    assert result.exit_code == 0, result
    return result.stdout.decode()


def test_a_stop_is_a_clean_power_off_by_the_power_button(owner, running) -> None:
    accepted = commands.stop(owner, running, grace_s=20)
    assert worker.handle(accepted.request.event_id) == "vm.stopped"
    data = outcome(accepted.request).payload
    assert data["graceful"] is True, data
    assert data["how"] == "acpi", data  # the guest honoured the button: no agent needed
    assert data["seconds"] < 5, data
    assert live.event_note("vm.stopped", data) == "clean power-off (power button)"
    running.refresh_from_db()
    assert running.state == "stopped"


def test_a_force_stop_says_it_was_forced(owner, running) -> None:
    accepted = commands.stop(owner, running, force=True)
    assert worker.handle(accepted.request.event_id) == "vm.stopped"
    data = outcome(accepted.request).payload
    assert data["graceful"] is False
    assert data["how"] == "forced"
    page = Client()
    page.force_login(owner.user)
    html = page.get(f"/vms/{running.pk}/").content.decode()
    assert '<span class="bad">forced stop: killed at once, the guest was not asked</span>' in html


def test_a_reboot_is_the_guests_own_and_keeps_the_vms_identity(owner, running) -> None:
    boot_before = guest_run(running, "cat", "/proc/sys/kernel/random/boot_id")
    accepted = commands.reboot(owner, running)
    assert worker.handle(accepted.request.event_id) == "vm.rebooted"
    data = outcome(accepted.request).payload
    assert data == {"graceful": True, "how": "agent"}, data
    assert guest_run(running, "cat", "/proc/sys/kernel/random/boot_id") != boot_before
    assert guest_run(running, "hostname").strip() == running.hostname == "power-test-1"


def test_the_console_shows_a_prompt_naming_the_vm_before_anyone_types(running) -> None:
    """The guest was restored from a template booted under another name: its console shell is
    started again with the VM's name, so the prompt is on the screen (in the console log a new
    viewer's scrollback starts from) without an Enter."""
    log_path = runtime.runtime_dir(running.pk).serial_log
    want = f"root@{running.hostname}"
    deadline = time.monotonic() + 30
    text = ""
    while time.monotonic() < deadline:
        text = log_path.read_bytes().decode(errors="replace") if log_path.exists() else ""
        if want in text:
            break
        time.sleep(0.2)
    assert want in text, f"no {want!r} prompt on the console: {text[-500:]!r}"
    assert "root@sandbox" not in text
