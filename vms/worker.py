"""Carrying out VM requests on this host: the hypervisor work behind each request event.

Each verb of the lifecycle table (``vms.lifecycle``) that the worker carries out names its
handler here (``do_<verb>``): ``HANDLERS`` is derived from the table, and importing this module
fails if a row names a handler that does not exist.

``handle(request)`` is idempotent: it returns at once when the request already has an outcome
(a task delivered twice, or one settled by the reconciler), and a start that finds a VMM left by
a crashed attempt kills it before booting again. Every failure becomes an outcome event with a
reason, never a silent hang: all waits have deadlines.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from audit import store
from audit.models import Event
from secretstore import guests
from vms import commands, enqueue, lifecycle, runtime, vmnet
from vms.agent import credentials, readiness
from vms.agent.client import AgentClient, AgentError
from vms.hypervisors.base import (
    Hypervisor,
    HypervisorError,
    NotSupported,
    RuntimeDir,
    SnapshotFiles,
    TemplateHooks,
    TemplateStarter,
    VMSpec,
    VMState,
)
from vms.images import ImageNotBuilt, current_image_id, make_data_disk, snapshot_image
from vms.models import RequestOutcome, Snapshot, VirtualMachine

log = logging.getLogger("sandbox.vms.worker")

AGENT_READY_TIMEOUT_S = 120.0
# A stop presses the power button first; a guest that has not powered off this long after the
# press (an image without a button handler) is asked through its agent too. The image's
# power-off on the button takes about 2 s under TCG (docs/images.md).
POWER_BUTTON_GRACE_S = 10.0
# A reboot asks the guest (its init runs the shutdown actions); a guest whose agent has not come
# back from a new boot this long after accepting is reset by the VMM.
REBOOT_GRACE_S = 60.0
# How long a destroy waits for a start or restore of the same VM to finish launching its VMM.
LAUNCH_LOCK_WAIT_S = 300.0
# Verbs whose handlers launch a VMM: if the VM was destroyed meanwhile, what they launched goes.
LAUNCHING_VERBS = frozenset(v.name for v in lifecycle.REQUEST_VERBS if v.launches_vmm)


class Superseded(Exception):
    """The request is no longer the one its VM waits for (a destroy overtook it)."""


class RequestFailed(Exception):
    """A request that could not be carried out; ``state`` is where the VM is left."""

    def __init__(self, reason: str, state: str | None = None, **data: Any) -> None:
        super().__init__(reason)
        self.state = state
        self.data = data


def load_request(event_id: str) -> store.RecordedEvent | None:
    row = Event.objects.filter(event_id=uuid.UUID(event_id)).values_list(*store.COLUMNS).first()
    return store.RecordedEvent.from_row(row) if row else None


def handle(event_id: str) -> str:
    request = load_request(event_id)
    if request is None:
        return f"no request event {event_id}"
    if request.data.get("fork") and request.type == lifecycle.request_verb("snapshot").requested:
        # A fork's snapshot (commands.fork): whatever became of it, its new VMs' restores go
        # on now (each fails on its own with the reason when there is no snapshot to restore).
        try:
            return _handle(request, event_id)
        finally:
            start_forks(request)
    return _handle(request, event_id)


def start_forks(request: store.RecordedEvent) -> int:
    """Enqueue the restore of each VM of the fork whose snapshot ``request`` asked for, still
    waiting for it (idempotent: a restore carried out or claimed already is not done twice)."""
    restore = lifecycle.request_verb("restore").requested
    started = 0
    for vm in VirtualMachine.objects.filter(pk__in=request.data["fork"]["vm_ids"]):
        if vm.pending_request and vm.pending_type == restore:
            enqueue.request(vm.pending_request)
            started += 1
    return started


def _fork_snapshot_unready(request: store.RecordedEvent) -> str | None:
    """For the restore of a fork's VM: None when its snapshot is ready; "creating" while it is
    being taken (the snapshot's task starts the restore once it is); else the reason the
    restore fails (the snapshot failed or went)."""
    snap = Snapshot.objects.filter(pk=request.data["snapshot_id"]).first()
    if snap is None:
        return "the fork's snapshot is not recorded"
    if snap.state == Snapshot.State.READY:
        return None
    if snap.state == Snapshot.State.CREATING:
        if RequestOutcome.objects.filter(request_event_id=request.data["fork_request"]).exists():
            # Its request was settled without taking it (a destroy of the source overtook it).
            return f"the fork's snapshot {snap.name} was not taken: its source's request ended"
        return "creating"
    return f"the fork's snapshot {snap.name} is {snap.state}: {snap.last_error or 'not taken'}"


def _handle(request: store.RecordedEvent, event_id: str) -> str:
    if RequestOutcome.objects.filter(request_event_id=event_id).exists():
        return "already done"
    vm = VirtualMachine.objects.filter(pk=request.aggregate_id).first()
    row = lifecycle.by_request(request.type)
    if row is None or row.kind != "request":
        return f"{request.type} is not a request the worker carries out"
    verb, failed = row.name, _failed(row)
    if vm is None:
        return "no such VM"
    if vm.pending_request != event_id:
        # Superseded (a destroy overtook it): record that it was not carried out.
        commands.record_outcome(
            request,
            failed,
            {"reason": "superseded by a later request", "state": vm.state},
        )
        return "superseded"
    if request.data.get("fork_of"):
        unready = _fork_snapshot_unready(request)
        if unready == "creating":
            return "waiting for the fork's snapshot"
        if unready is not None:
            commands.record_outcome(request, failed, {"reason": unready, "state": "failed"})
            return f"failed: {unready}"
    if not claim(request):
        return "claimed by another worker"
    handler = HANDLERS[verb]
    try:
        outcome, data = handler(vm, request)
        if outcome != row.succeeded:
            raise RuntimeError(f"the {verb} handler answered {outcome}, not {row.succeeded}")
        result = outcome
    except Superseded:
        return _record_superseded(vm, request, verb, launched=False)
    except RequestFailed as exc:
        outcome, data = failed, {"reason": str(exc), **exc.data}
        if exc.state:
            data["state"] = exc.state
        result = f"failed: {exc}"
    except Exception as exc:  # an unexpected error still settles the request, with its reason
        log.exception("request %s (%s) failed", event_id, request.type)
        outcome, data = failed, {"reason": f"{type(exc).__name__}: {exc}"[:2000]}
        if verb in LAUNCHING_VERBS:
            _kill(vm)
        result = f"error: {exc}"
    if outcome == failed:
        data |= lifetime_retry(request)
    # The outcome is appended only while the request is still the one the VM waits for, checked
    # under the append lock in the same transaction: a destroy that came in meanwhile wins.
    if commands.record_outcome_if_pending(request, outcome, data) is commands.SUPERSEDED:
        return _record_superseded(vm, request, verb, launched=True, would_have_been=(outcome, data))
    return result


def lifetime_retry(request: store.RecordedEvent) -> dict[str, Any]:
    """A failed stop or destroy that a lifetime's end asked for: when to ask it again (the
    projector sets the VM's end to it), so a VM whose stop failed does not run on for good."""
    if request.data.get("reason") != "lifetime":
        return {}
    again = timezone.now() + timedelta(seconds=settings.SANDBOX_LIFETIME_RETRY_S)
    return {"lifetime_retry_at": again.isoformat()}


def _failed(row: lifecycle.Verb) -> str:
    return row.outcomes()[1]


def _record_superseded(
    vm: VirtualMachine,
    request: store.RecordedEvent,
    verb: str,
    *,
    launched: bool,
    would_have_been: tuple[str, dict[str, Any]] | None = None,
) -> str:
    """A destroy overtook ``request`` while it was carried out: record truthfully what it did.

    A start or restore tears down the VMM it launched (the VM is destroyed: it must never run
    again), and its outcome says so; other verbs record what they did, which no longer moves
    the VM's state (the projection follows the destroy).
    """
    failed = _failed(lifecycle.request_verb(verb))
    if verb in LAUNCHING_VERBS:
        if launched:
            with vm_host_lock(vm.pk, required=False):
                _kill(vm)
                shutil.rmtree(runtime.vm_data_dir(vm.pk), ignore_errors=True)
        data: dict[str, Any] = {
            "reason": (
                f"the VM was destroyed while the {verb} was under way; the VMM it launched "
                "was stopped and removed"
                if launched
                else f"the VM was destroyed before the {verb} could launch a VMM; none was"
            ),
            "superseded": True,
            "vmm_launched": launched,
        }
        if would_have_been is not None and would_have_been[0].endswith("_failed"):
            data["error"] = would_have_been[1].get("reason", "")
        commands.record_outcome(request, failed, data)
        return "superseded"
    if would_have_been is not None:
        # It was carried out (a pause, a snapshot...) before the destroy: say so.
        outcome, outcome_data = would_have_been
        commands.record_outcome(request, outcome, {**outcome_data, "superseded": True})
    else:
        commands.record_outcome(
            request, failed, {"reason": "superseded by a later request", "superseded": True}
        )
    return "superseded"


def host_lock_path(vm_id: object) -> Path:
    return Path(settings.SANDBOX_RUNTIME_DIR) / f"{runtime.runtime_dir(vm_id).root.name}.lock"


@contextlib.contextmanager
def vm_host_lock(
    vm_id: object, *, wait_s: float = LAUNCH_LOCK_WAIT_S, required: bool = True
) -> Iterator[bool]:
    """This host's lock for launching or tearing down ``vm_id``'s VMM (a flock, so it holds
    across worker processes). Yields whether it was taken: with ``required=False`` a waiter
    gives up after ``wait_s`` and goes on without it (a destroy never hangs on a stuck start).

    The lock file sits beside the runtime directories (files there are not VMs to the
    reconciler); a destroy removes it once the VM is gone, which is safe because every later
    taker re-checks the VM's state under the append lock before it launches anything.
    """
    path = host_lock_path(vm_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + wait_s
        held = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    if required:
                        raise RequestFailed(
                            "another worker is still launching this VM's VMM", state="failed"
                        ) from None
                    log.warning("VM %s: going on without the host lock after %ss", vm_id, wait_s)
                    break
                time.sleep(0.05)
        yield held
    finally:
        os.close(fd)


@contextlib.contextmanager
def _launching(vm: VirtualMachine, request: store.RecordedEvent) -> Iterator[None]:
    """Hold the VM's host lock while a VMM is launched for ``request``, having checked under
    the append lock that the VM still waits for it (a destroy may have been requested, or even
    carried out, since the request was claimed): a destroyed VM never gets a VMM again."""
    with vm_host_lock(vm.pk):
        if not commands.is_pending(request):
            raise Superseded(request.event_id)
        yield


def is_claimed(request: store.RecordedEvent) -> bool:
    return Event.objects.filter(
        aggregate_type=request.aggregate_type,
        aggregate_id=request.aggregate_id,
        type="vm.progress",
        causation_id=request.event_id,
    ).exists()


def claim(request: store.RecordedEvent) -> bool:
    """Record that this worker carries the request out; False if another already does.

    Under the append lock, so of two deliveries of one task exactly one claims it. The claim is
    what the reconciler looks for: a claimed request without an outcome was interrupted.
    """
    with transaction.atomic():
        store.lock()
        if is_claimed(request):
            return False
        commands.record_progress(
            request, "accepted", 5, f"worker {runtime.host_name()}:{os.getpid()}"
        )
    return True


# --- helpers ----------------------------------------------------------------------------------


def _agent(vm: VirtualMachine, timeout: float = AGENT_READY_TIMEOUT_S) -> AgentClient:
    """The VM's agent, greeted with its credential; a guest that booted afresh (no credential
    yet) is enrolled with a fresh one first (``vms.agent.credentials.connect``)."""
    return credentials.connect(vm, timeout, enroll=True)


def _give_own_credential(
    vm: VirtualMachine, current: str | None, reason: str, request: store.RecordedEvent
) -> None:
    """A guest restored with another's credential (``current``: its template's or its
    snapshot's) gets a fresh one of the VM's own at once: the other is refused from then on."""
    credentials.take_over(vm, current, reason, request=request)


def _configure_identity(vm: VirtualMachine, *, nic: bool = True) -> None:
    """The guest's clock and hostname, and its NIC's MAC, address, gateway and resolver (found
    by the MAC it has now: a restored guest still has its snapshot's); ``nic=False``: a guest
    restored without its NIC gets the clock and hostname only."""
    nets = vmnet.netspecs(vm) if nic else ()
    with _agent(vm, 30.0) as agent:
        if nets:
            spec = VMSpec(vm_id=vm.pk.hex[:12], nets=nets, extra={"hostname": vm.hostname})
            readiness.configure_guest(agent, runtime.hypervisor(), runtime.runtime_dir(vm.pk), spec)
        else:
            agent.configure(time=time.time(), hostname=vm.hostname)


def _deliver_secret_files(vm: VirtualMachine) -> list[dict[str, Any]]:
    """Write the VM's file secrets into the guest through its agent (mode 0600): over the
    agent channel only, never the kernel command line or an image. What the outcome records of
    them: name, owner, version, HMAC and path."""
    if not vm.secrets:
        return []
    files = [g for g in guests.resolve_records(vm.owner, vm.secrets) if g.file]
    if not files:
        return []
    with _agent(vm, 30.0) as agent:
        for g in files:
            assert g.file is not None
            agent.put_file(io.BytesIO(g.value), g.file, mode=0o600, mkdirs=True)
    return [g.record() for g in files]


def _kill(vm: VirtualMachine) -> None:
    """Tear the VMM down and unplug the VM's NIC (each whatever became of the other)."""
    hv, rt = runtime.hypervisor(), runtime.runtime_dir(vm.pk)
    with contextlib.suppress(Exception):
        hv.destroy(rt)
    _unplug(vm)


def _unplug(vm: VirtualMachine) -> None:
    try:
        errors = vmnet.unplug(vm)
    except Exception:  # a stop or destroy goes on; the reconciler removes what is left
        log.exception("unplugging the NIC of %s failed", vm.pk)
        return
    if errors:
        log.warning("unplugging the NIC of %s: %s", vm.pk, "; ".join(errors))


def _progress(request: store.RecordedEvent, step: str, pct: int, message: str = "") -> None:
    commands.record_progress(request, step, pct, message)


def _ensure_data_disk(vm: VirtualMachine) -> None:
    path = runtime.vm_data_dir(vm.pk) / "data.img"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        make_data_disk(path, vm.disk_mib)


# What a driver's saved-state templates need from this side: the guest agent's readiness and
# the restored guest's identity, and the VMs' data disks.
TEMPLATE_HOOKS = TemplateHooks(
    wait_ready=readiness.wait_ready,
    reset_identity=readiness.reset_identity,
    make_disk=make_data_disk,
)


def _template_cache() -> TemplateStarter | None:
    """The driver's fast start from saved templates; None when it has none (cold boot)."""
    return runtime.hypervisor().template_cache(TEMPLATE_HOOKS)


def _wait_for_agent(vm: VirtualMachine, timeout: float = AGENT_READY_TIMEOUT_S) -> None:
    """Wait for the guest's agent (enrolling it: a cold boot has no credential yet), failing
    at once if the VMM dies (or is torn down) first."""
    hv, rt = runtime.hypervisor(), runtime.runtime_dir(vm.pk)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with _agent(vm, min(5.0, max(deadline - time.monotonic(), 0.1))):
                return
        except Exception:
            if not hv.is_alive(rt):
                raise RequestFailed("the VMM exited before its guest agent answered") from None
            if time.monotonic() >= deadline:
                raise


def _boot(vm: VirtualMachine, request: store.RecordedEvent) -> dict[str, Any]:
    hv, rt = runtime.hypervisor(), runtime.runtime_dir(vm.pk)
    with _launching(vm, request):
        if hv.is_alive(rt):
            # A VMM left by an attempt that died mid-way: never run two for one VM.
            hv.destroy(rt)
        rt.create()
        _ensure_data_disk(vm)
        started = time.monotonic()
        # The NIC's bridge port, resolver and rules are set up while the VMM restores.
        pluggings = vmnet.plug_begin(vm)
        nets = tuple(p.netspec for p in pluggings)

        def network_ready() -> None:
            vmnet.wait_plugged(pluggings)

        try:
            spec = runtime.build_spec(vm, nets=nets)
            runtime.record_launched_image(rt, spec)  # before the launch: the reconciler reads it
            _progress(request, "booting", 20, "starting the VMM")
            cache = _template_cache()
            template_secret: str | None = None
            if cache is not None:
                result = cache.start(spec, rt, network_ready=network_ready)
                restored, pid = result.restored, result.pid
                template_secret = result.guest_secret
            else:
                network_ready()
                pid, restored = hv.start(spec, rt), False
            network_ready()
        finally:
            vmnet.join_plugged(pluggings)  # never unplug (on failure) while it still plugs
            vmnet.close_fds(nets)  # the VMM holds its own copies
    if restored:
        # The template's credential, shared by every VM restored from it: the VM's own, now.
        _give_own_credential(vm, template_secret, "enrolled", request)
    else:
        _progress(request, "booting", 50, "waiting for the guest agent")
        _wait_for_agent(vm)
        _configure_identity(vm)
    delivered = _deliver_secret_files(vm)
    return {
        **({"secrets": delivered} if delivered else {}),
        "host": runtime.host_name(),
        "hypervisor": hv.name,
        "pid": pid,
        "from_template": restored,
        "image_id": spec.extra.get("image_id", ""),
        "seconds": round(time.monotonic() - started, 3),
        **_nic_data(spec),
    }


def _nic_data(spec: VMSpec) -> dict[str, Any]:
    if not spec.nets:
        return {}
    net = spec.nets[0]
    return {"nic": {"tap": net.tap, "mac": net.mac, "address": net.address, "netns": net.netns}}


# --- handlers: (vm, request) -> (outcome type, data) ------------------------------------------


def do_start(vm: VirtualMachine, request: store.RecordedEvent) -> tuple[str, dict[str, Any]]:
    drop_suspended(vm.pk)  # a start is cold: a VM that crashed while suspended left its state
    try:
        data = _boot(vm, request)
    except Superseded:
        raise
    except Exception as exc:
        _kill(vm)
        raise RequestFailed(f"boot failed: {exc}", state="failed") from exc
    return "vm.started", data


def _powered_off(vm: VirtualMachine) -> bool:
    """The guest is down: its VMM gone, or (QEMU's -no-shutdown) waiting in the shutdown state."""
    hv, rt = runtime.hypervisor(), runtime.runtime_dir(vm.pk)
    if not hv.is_alive(rt):
        return True
    try:
        return hv.info(rt).state is VMState.SHUTDOWN
    except Exception:  # the VMM went away between the two questions
        return not hv.is_alive(rt)


def _wait_powered_off(vm: VirtualMachine, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        if _powered_off(vm):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _power_off(vm: VirtualMachine, request: store.RecordedEvent, grace: float) -> str | None:
    """Power the guest off cleanly: the ACPI power button, then (a guest that ignores it) the
    agent's shutdown, within ``grace`` seconds in all. Returns the path that worked ("acpi",
    "agent") or None when the guest was still up at the end."""
    hv, rt = runtime.hypervisor(), runtime.runtime_dir(vm.pk)
    deadline = time.monotonic() + grace
    _progress(request, "stopping", 30, "pressing the power button")
    try:
        hv.power_button(rt)
    except Exception as exc:  # no button on this VMM or machine: the agent is the way
        log.info("power button of %s: %s", vm.pk, exc)
    else:
        if _wait_powered_off(vm, min(POWER_BUTTON_GRACE_S, grace)):
            return "acpi"
    _progress(request, "stopping", 60, "asking the guest agent to power off")
    with contextlib.suppress(Exception):
        # Briefly: a guest already on its way down (a slow answer to the button) has no agent.
        with _agent(vm, max(min(deadline - time.monotonic(), 3.0), 0.1)) as agent:
            agent.shutdown("poweroff")
    if _wait_powered_off(vm, max(deadline - time.monotonic(), 0.0)):
        return "agent"
    return None


def do_stop(vm: VirtualMachine, request: store.RecordedEvent) -> tuple[str, dict[str, Any]]:
    """A clean power-off within the request's grace (``grace_s``, default 20 s), then the VMM is
    torn down. ``graceful`` says whether the guest powered itself off; ``how`` how it ended:
    "acpi" (the power button), "agent" (its shutdown request), "forced" (``force``: no grace
    given), "timeout" (still up after the grace: killed) or "not_running" (no VMM)."""
    hv, rt = runtime.hypervisor(), runtime.runtime_dir(vm.pk)
    started = time.monotonic()
    if not hv.is_alive(rt):
        how: str | None = "not_running"
    elif request.data.get("force"):
        how = "forced"
    else:
        how = _power_off(vm, request, float(request.data.get("grace_s", 20))) or "timeout"
    hv.destroy(rt)
    _unplug(vm)
    # A VM suspended to disk (vms.idle) starts cold next: its saved state goes.
    dropped = {"suspended_state_removed": True} if drop_suspended(vm.pk) else {}
    return "vm.stopped", {
        "graceful": how in ("acpi", "agent"),
        "how": how,
        "seconds": round(time.monotonic() - started, 3),
        **dropped,
    }


def _reboot_guest(vm: VirtualMachine, request: store.RecordedEvent) -> str:
    """The guest's own reboot, asked through its agent (init runs its shutdown actions) and
    recognised by the new boot id its agent answers with; "agent" when that worked, else the
    VMM's hard reset ("reset": no agent to ask, or no new boot within ``REBOOT_GRACE_S``)."""
    hv, rt = runtime.hypervisor(), runtime.runtime_dir(vm.pk)
    _progress(request, "rebooting", 30, "asking the guest to reboot")
    try:
        with _agent(vm, 10.0) as agent:
            before = agent.hello_info.boot_id if agent.hello_info else None
            agent.shutdown("reboot")
    except Exception as exc:
        log.info("reboot of %s through its agent: %s", vm.pk, exc)
        before = None
    if before is not None:
        _progress(request, "rebooting", 50, "waiting for the guest to boot again")
        deadline = time.monotonic() + REBOOT_GRACE_S
        while time.monotonic() < deadline and hv.is_alive(rt):
            try:
                with credentials.client_for_vm(vm) as agent:
                    left = max(min(deadline - time.monotonic(), 5.0), 0.1)
                    if agent.hello(timeout=left).boot_id != before:
                        return "agent"
            except AgentError as exc:
                if exc.code == "not_enrolled":
                    return "agent"  # a new boot: it forgot the credential (enrolled next)
                log.info("reboot of %s: waiting for the new boot: %s", vm.pk, exc)
                time.sleep(0.2)
            except Exception as exc:  # going down, or not up yet
                log.info("reboot of %s: waiting for the new boot: %r", vm.pk, exc)
                time.sleep(0.2)
            else:
                time.sleep(0.2)  # the old boot still answers: it is shutting down
    _progress(request, "rebooting", 50, "resetting the VM")
    hv.reboot(rt)
    time.sleep(0.5)
    with _agent(vm):
        pass
    return "reset"


def do_reboot(vm: VirtualMachine, request: store.RecordedEvent) -> tuple[str, dict[str, Any]]:
    """``graceful`` says whether the guest rebooted itself; ``how``: "agent" or "reset". A boot
    starts from the kernel's parameters, so the VM's identity (hostname, addresses, clock) is
    given again, as after a restore."""
    hv, rt = runtime.hypervisor(), runtime.runtime_dir(vm.pk)
    try:
        how = _reboot_guest(vm, request)
        _configure_identity(vm)
    except Exception as exc:
        raise RequestFailed(
            f"reboot failed: {exc}", state="running" if hv.is_alive(rt) else "crashed"
        ) from exc
    return "vm.rebooted", {"graceful": how == "agent", "how": how}


def do_pause(vm: VirtualMachine, request: store.RecordedEvent) -> tuple[str, dict[str, Any]]:
    if request.data.get("to_disk"):
        return "vm.paused", suspend_to_disk(vm, request)
    try:
        runtime.hypervisor().pause(runtime.runtime_dir(vm.pk))
    except HypervisorError as exc:
        raise RequestFailed(f"pause failed: {exc}", state="running") from exc
    return "vm.paused", {}


def do_resume(vm: VirtualMachine, request: store.RecordedEvent) -> tuple[str, dict[str, Any]]:
    if vm.suspended_to_disk:
        return "vm.resumed", resume_from_disk(vm, request)
    try:
        runtime.hypervisor().resume(runtime.runtime_dir(vm.pk))
    except HypervisorError as exc:
        raise RequestFailed(f"resume failed: {exc}", state="paused") from exc
    return "vm.resumed", {}


# --- Suspend to disk (vms.idle) ----------------------------------------------------------------
# The driver's snapshot of the VM into its data dir (``runtime.suspend_dir``), its files'
# SHA-256 manifest with the image and NICs the state was saved with in ``suspended.json``
# beside them (written last: a directory without it is no suspended state), then its VMM and
# NIC torn down. A resume checks the files against the record, restores them as a snapshot's
# restore does, greets the guest with the VM's own credential (the saved guest has it) and
# gives it the clock, hostname and NIC again; the files go once the guest answers.

SUSPEND_RECORD = "suspended.json"


def _suspend_record(vm_id: object) -> dict[str, Any]:
    path = runtime.suspend_dir(vm_id) / SUSPEND_RECORD
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise RequestFailed(
            "the VM is suspended to disk but its saved state is not on this host "
            f"({path} is missing): stop it (it starts cold) or destroy it",
            state="paused",
        ) from None
    except (OSError, ValueError) as exc:
        raise RequestFailed(f"the VM's saved state is unreadable: {exc}", state="paused") from exc
    if not isinstance(record, dict) or not isinstance(record.get("manifest"), dict):
        raise RequestFailed(f"{path} is not a suspended state record", state="paused")
    return record


def _verify_suspended(directory: Path, record: dict[str, Any]) -> str | None:
    """The first saved file not as it was saved, or None. A file whose size, mtime, ctime and
    inode are as they were when it was hashed is taken as hashed (as a fork's restores do);
    any other is hashed again."""
    stats = record.get("stats") or {}
    for name, expected in sorted(record["manifest"].items()):
        path = directory / name
        if not path.is_file() or path.is_symlink():
            return f"{name} is missing"
        if stats.get(name) is not None and stats[name] == _stat_of(path):
            continue
        if (
            path.stat().st_size != expected["size"]
            or runtime.sha256_file(path) != (expected["sha256"])
        ):
            return f"{name} fails its SHA-256 check"
    return None


def suspended_complete(vm_id: object) -> bool:
    """Has the VM a saved suspended state whose record was written (the save finished)?"""
    return (runtime.suspend_dir(vm_id) / SUSPEND_RECORD).is_file()


def drop_suspended(vm_id: object) -> bool:
    """Remove a VM's saved suspended state, if any: whether there was one."""
    directory = runtime.suspend_dir(vm_id)
    if not directory.exists():
        return False
    shutil.rmtree(directory, ignore_errors=True)
    return True


def suspend_to_disk(vm: VirtualMachine, request: store.RecordedEvent) -> dict[str, Any]:
    """Save the running VM's memory and device state under its data dir, then stop its VMM
    and unplug its NIC: it holds no host memory until it is resumed. The outcome's data."""
    hv, rt = runtime.hypervisor(), runtime.runtime_dir(vm.pk)
    directory = runtime.suspend_dir(vm.pk)
    # Restored on the image its VMM runs on (its page cache holds that image's root).
    image_id = runtime.launched_image(rt)
    if image_id is None:
        raise RequestFailed(
            "suspend to disk refused: the image this VM's VMM runs on is not recorded on this "
            "host; stop and start the VM",
            state="running",
        )
    started = time.monotonic()
    try:
        drop_suspended(vm.pk)  # what a failed earlier attempt left
        directory.mkdir(parents=True, mode=0o700)
        _progress(request, "suspending", 20, "saving guest memory and devices to disk")
        files = hv.snapshot(rt, directory)  # leaves the guest paused
        nics = hv.snapshot_nics(files)
        _progress(request, "suspending", 60, "hashing the saved state")
        manifest, stats = hash_files(directory, files.files)
        record = {"manifest": manifest, "stats": stats, "image_id": image_id, "nics": nics}
        tmp = directory / f".{SUSPEND_RECORD}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(record))
        os.replace(tmp, directory / SUSPEND_RECORD)
    except Exception as exc:
        with contextlib.suppress(Exception):
            if hv.is_alive(rt):
                hv.resume(rt)
        drop_suspended(vm.pk)
        raise RequestFailed(
            f"suspend to disk failed: {exc}", state="running" if hv.is_alive(rt) else "crashed"
        ) from exc
    saved = round(time.monotonic() - started, 3)
    _progress(request, "suspending", 90, "stopping the VMM")
    with vm_host_lock(vm.pk, required=False):
        _kill(vm)
    if hv.is_alive(rt):
        # Never both: a VM whose VMM still holds its memory is not suspended to disk.
        drop_suspended(vm.pk)
        raise RequestFailed(
            "suspend to disk failed: the VMM could not be stopped after its state was saved",
            state="paused",
        )
    return {
        "to_disk": True,
        **{k: request.data[k] for k in ("reason", "idle_s") if k in request.data},
        "directory": str(directory),
        "size_bytes": sum(f["size"] for f in manifest.values()),
        "files": manifest,
        # One hash of it all: of the manifest (each file's size and SHA-256).
        "sha256": hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest(),
        "image_id": image_id,
        "seconds": saved,
    }


def resume_from_disk(vm: VirtualMachine, request: store.RecordedEvent) -> dict[str, Any]:
    """Restore a VM suspended to disk from its saved state: a new VMM (its NIC plugged again
    when it was saved with one), the guest greeted with the VM's credential and given its
    clock, hostname and address; the saved files go once it answers. The outcome's data
    (``RequestFailed``, the VM left paused on disk, when it cannot)."""
    hv, rt = runtime.hypervisor(), runtime.runtime_dir(vm.pk)
    directory = runtime.suspend_dir(vm.pk)
    record = _suspend_record(vm.pk)
    began = time.monotonic()
    _progress(request, "resuming", 10, "checking the saved state")
    problem = _verify_suspended(directory, record)
    if problem:
        raise RequestFailed(
            f"the VM's saved state is corrupted: {problem}; stop it (it starts cold)",
            state="paused",
        )
    files = SnapshotFiles(directory, tuple(directory / name for name in record["manifest"]))
    try:
        image_id = runtime.build_spec(vm, snapshot_image(record["image_id"])).extra["image_id"]
    except ImageNotBuilt as exc:
        raise RequestFailed(
            f"the VM's saved state cannot be restored: {exc}", state="paused"
        ) from exc
    with_nic = bool(record.get("nics")) and vmnet.has_nic(vm)
    if record.get("nics") and not with_nic:
        raise RequestFailed(
            "the VM was suspended with a NIC, and gets none on this host now (networking is "
            "off here): resume it where it gets one, or stop it",
            state="paused",
        )
    started = time.monotonic()
    try:
        # Under the host lock, once the resume is checked still pending (a destroy may have
        # overtaken it): a destroyed VM never gets a VMM again.
        with _launching(vm, request):
            hv.destroy(rt)  # nothing should be there: never two VMMs for one VM
            rt.create()
            _ensure_data_disk(vm)
            pid = _restore_vmm(
                hv,
                vm,
                request,
                rt,
                image_id,
                files,
                with_nic=with_nic,
                step=("resuming", "starting the VMM from the saved state"),
            )
        restored = time.monotonic()
        # The saved guest has the VM's own credential: greeted with it; then a correct clock
        # (it stood still while on disk), its hostname and its NIC's address.
        _configure_identity(vm, nic=with_nic)
    except Superseded:
        raise
    except Exception as exc:
        _kill(vm)
        raise RequestFailed(
            f"resume from disk failed: {exc} (the saved state is kept)", state="paused"
        ) from exc
    drop_suspended(vm.pk)
    return {
        "from_disk": True,
        "pid": pid,
        "host": runtime.host_name(),
        "image_id": image_id,
        # Where the time went: checking the files, the VMM's restore, the guest's identity.
        "phases": {
            "check_s": round(started - began, 3),
            "restore_s": round(restored - started, 3),
            "identity_s": round(time.monotonic() - restored, 3),
        },
        "seconds": round(time.monotonic() - started, 3),
    }


def do_resize(vm: VirtualMachine, request: store.RecordedEvent) -> tuple[str, dict[str, Any]]:
    vcpus, memory = request.data["vcpus"], request.data["memory_mib"]
    previous_state = (
        "stopped"
        if vm.state == "resizing" and not runtime.hypervisor().is_alive(runtime.runtime_dir(vm.pk))
        else "running"
    )
    if previous_state == "stopped":
        # Applies at the next start.
        return "vm.resized", {
            "vcpus": vcpus,
            "memory_mib": memory,
            "state": "stopped",
            "live": False,
        }
    try:
        runtime.hypervisor().resize(
            runtime.runtime_dir(vm.pk),
            vcpus=vcpus if vcpus != vm.vcpus else None,
            memory_mib=memory if memory != vm.memory_mib else None,
        )
    except NotSupported as exc:
        raise RequestFailed(
            f"{exc}; stop the VM and resize it while stopped", state="running"
        ) from exc
    except HypervisorError as exc:
        raise RequestFailed(f"resize failed: {exc}", state="running") from exc
    return "vm.resized", {"vcpus": vcpus, "memory_mib": memory, "live": True}


def do_snapshot(vm: VirtualMachine, request: store.RecordedEvent) -> tuple[str, dict[str, Any]]:
    hv, rt = runtime.hypervisor(), runtime.runtime_dir(vm.pk)
    snapshot_id = request.data["snapshot_id"]
    directory = runtime.snapshot_dir(snapshot_id)
    was_paused = hv.info(rt).state.value == "paused"
    # The image the running VMM was launched with (not the read model's, which a start the
    # reconciler completed may have left behind): the snapshot is restored on that image only,
    # so one whose image is not known is not taken.
    image_id = runtime.launched_image(rt)
    if image_id is None:
        raise RequestFailed(
            "snapshot refused: the image this VM's VMM runs on is not recorded on this host "
            "(a VMM launched before images were recorded); stop and start the VM, then snapshot",
            state="paused" if was_paused else "running",
            snapshot_id=snapshot_id,
        )
    try:
        directory.mkdir(parents=True, exist_ok=False)
        _progress(request, "snapshotting", 20, "saving guest memory and devices")
        files = hv.snapshot(rt, directory)
        if not was_paused:
            hv.resume(rt)
        _progress(request, "snapshotting", 70, "hashing the snapshot files")
        manifest, stats = hash_files(directory, files.files)
    except Exception as exc:
        with contextlib.suppress(Exception):
            if not was_paused and hv.is_alive(rt):
                hv.resume(rt)
        shutil.rmtree(directory, ignore_errors=True)
        raise RequestFailed(
            f"snapshot failed: {exc}",
            state="paused" if was_paused else "running",
            snapshot_id=snapshot_id,
        ) from exc
    size = sum(f["size"] for f in manifest.values())
    if request.data.get("fork"):
        _note_hashed(snapshot_id, stats)
    with transaction.atomic():
        commands.record_snapshot_created(
            request,
            snapshot_id,
            {
                "vm_id": str(vm.pk),
                "manifest": manifest,
                "size_bytes": size,
                "files": len(manifest),
                "image_id": image_id,
            },
        )
        # The saved guest has the VM's credential of now: a restore greets it with that.
        credentials.keep_for_snapshot(vm.pk, snapshot_id)
    return "vm.snapshotted", {
        "snapshot_id": snapshot_id,
        "size_bytes": size,
        "state": "paused" if was_paused else "running",
    }


# A fork's snapshot: what each of its files was (size, mtime, ctime, inode) while this host hashed
# it for the manifest, moments before its restores: kept on this host, outside the snapshot's
# directory (so nothing that may write the files writes what vouches for them), readable by
# this user only, never in the log; gone with the snapshot (``cleanup_snapshot``).


def _stat_of(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def hash_files(
    directory: Path, paths: Iterable[Path]
) -> tuple[dict[str, dict[str, Any]], dict[str, list[int] | None]]:
    """The manifest of ``paths`` (name -> size and SHA-256), and each file's stat as it was
    while it was hashed: taken before and after hashing it, None when the two differ (the file
    changed while it was read: its hash vouches for nothing)."""
    manifest: dict[str, dict[str, Any]] = {}
    stats: dict[str, list[int] | None] = {}
    for path in sorted(paths):
        name = str(path.relative_to(directory))
        before = _stat_of(path)
        digest = runtime.sha256_file(path)
        after = _stat_of(path)
        manifest[name] = {"size": before[0], "sha256": digest}
        stats[name] = before if before == after else None
    return manifest, stats


def _hashed_path(snapshot_id: object) -> Path:
    return Path(settings.SANDBOX_RUNTIME_DIR) / f".hashed-{snapshot_id}.json"


def _note_hashed(snapshot_id: object, stats: dict[str, list[int] | None]) -> None:
    path = _hashed_path(snapshot_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(stats))
    os.replace(tmp, path)


def _forget_hashed(snapshot_id: object) -> None:
    with contextlib.suppress(OSError):
        _hashed_path(snapshot_id).unlink()


def hashed_unchanged(snap: Snapshot) -> bool:
    """A fork's snapshot whose every file was unchanged while this host hashed it for the
    manifest and is as it was then (same size, mtime, ctime and inode): its restores need not
    hash them again. False when there is no such record (another host, a reboot) or a file
    changed while it was hashed."""
    directory = runtime.snapshot_dir(snap.pk)
    try:
        noted = json.loads(_hashed_path(snap.pk).read_text())
        return bool(snap.manifest) and all(
            noted.get(name) is not None
            and noted[name] == _stat_of(directory / name)
            and noted[name][0] == entry["size"]
            for name, entry in snap.manifest.items()
        )
    except (OSError, ValueError, TypeError, KeyError, IndexError):
        return False


def verify_snapshot(snap: Snapshot) -> str | None:
    """The first file whose size or SHA-256 differs from the manifest, or None."""
    directory = runtime.snapshot_dir(snap.pk)
    for name, expected in sorted(snap.manifest.items()):
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if (
            path.stat().st_size != expected["size"]
            or runtime.sha256_file(path) != expected["sha256"]
        ):
            return f"{name} fails its SHA-256 check"
    return None


def do_restore(vm: VirtualMachine, request: store.RecordedEvent) -> tuple[str, dict[str, Any]]:
    snap = Snapshot.objects.get(pk=request.data["snapshot_id"])
    clone = bool(request.data.get("clone"))
    failed_state = "failed" if clone else ("stopped" if vm.state != "running" else "failed")
    if request.data.get("fork_of") and hashed_unchanged(snap):
        # A fork's restores follow its snapshot by seconds: the hashes the snapshot task just
        # computed stand while the files are untouched (any other restore hashes them again).
        _progress(request, "restoring", 10, "the fork's snapshot: files as hashed when taken")
        problem = None
    else:
        _progress(request, "restoring", 10, "checking the snapshot's SHA-256 manifest")
        problem = verify_snapshot(snap)
    if problem:
        commands.record_snapshot_corrupted(request, str(snap.pk), problem)
        raise RequestFailed(
            f"snapshot {snap.name} is corrupted: {problem}",
            state="failed" if clone else _untouched_state(vm),
        )
    hv, rt = runtime.hypervisor(), runtime.runtime_dir(vm.pk)
    try:
        # Saved RAM has the image's root filesystem in its page cache: restore it on the image
        # it was taken on (kept in the image cache), never on another, nor on an unknown one.
        image_id = runtime.build_spec(vm, snapshot_image(snap.image_id)).extra["image_id"]
    except ImageNotBuilt as exc:
        # Refused before anything was touched: the VM is left as it is.
        raise RequestFailed(
            f"snapshot {snap.name} cannot be restored: {exc}",
            state="failed" if clone else _untouched_state(vm),
            snapshot_image_id=snap.image_id,
            current_image_id=current_image_id(),
        ) from exc
    files = SnapshotFiles(
        directory=runtime.snapshot_dir(snap.pk),
        files=tuple(runtime.snapshot_dir(snap.pk) / name for name in snap.manifest),
    )
    # A restore gives the guest the NICs its snapshot has: a VM with a NIC restored from a
    # snapshot taken without one (networking was off then) runs without it until a cold start;
    # one taken with a NIC cannot be restored where networking is off.
    try:
        saved_nics = hv.snapshot_nics(files)
    except HypervisorError as exc:
        raise RequestFailed(
            f"snapshot {snap.name} cannot be restored: {exc}",
            state="failed" if clone else _untouched_state(vm),
        ) from exc
    nic_here = vmnet.has_nic(vm)
    if saved_nics and not nic_here:
        raise RequestFailed(
            f"snapshot {snap.name} was taken with a NIC, and this VM gets none on this host "
            "(networking is off here, or the VM has no network): restore it where it gets one",
            state="failed" if clone else _untouched_state(vm),
        )
    with_nic = nic_here and saved_nics > 0
    started = time.monotonic()
    try:
        with _launching(vm, request):
            hv.destroy(rt)  # in place: the old VMM goes; a clone has none yet
            drop_suspended(vm.pk)  # and a VM suspended to disk (vms.idle) its saved state
            rt.create()
            _ensure_data_disk(vm)
            if not with_nic:
                _unplug(vm)  # in place: the NIC of the VMM that went, if it had one
            pid = _restore_vmm(
                hv,
                vm,
                request,
                rt,
                image_id,
                files,
                with_nic=with_nic,
                step=("restoring", "starting the VMM from the snapshot"),
            )
            deflated = _deflate(vm, hv, rt)
        # The saved guest wants the snapshot's credential (its source's of then): this VM's
        # own at once, so the source's is refused here.
        _give_own_credential(
            vm, credentials.for_snapshot(snap.pk), "cloned" if clone else "restored", request
        )
        # Its own identity and a correct clock: copies of one snapshot run side by side.
        _configure_identity(vm, nic=with_nic)
    except Superseded:
        raise
    except Exception as exc:
        _kill(vm)
        raise RequestFailed(f"restore failed: {exc}", state=failed_state) from exc
    without_nic = (
        {"nic_absent": "the snapshot was taken without a NIC: none until the VM starts cold"}
        if nic_here and not with_nic
        else {}
    )
    return "vm.restored", {
        **without_nic,
        **deflated,
        "snapshot_id": str(snap.pk),
        "clone": clone,
        "pid": pid,
        "host": runtime.host_name(),
        "hypervisor": hv.name,
        "image_id": image_id,
        "seconds": round(time.monotonic() - started, 3),
    }


def _deflate(vm: VirtualMachine, hv: Any, rt: Any) -> dict[str, Any]:
    """A balloon's target is part of a saved guest's device state: a guest saved while the
    pressure loop had it ballooned comes back ballooned. A restored VM is a new VMM, which its
    read model says is not ballooned (the projector clears that on ``vm.restored``), so it gets
    all its memory back here; the outcome says what it came back with (``balloon_saved_mib``)."""
    try:
        saved = hv.balloon_mib(rt)
    except NotSupported:
        return {}
    if saved is None or saved >= vm.memory_mib:
        return {}  # no balloon device, or nothing held
    hv.balloon(rt, vm.memory_mib)
    return {"balloon_saved_mib": saved}


def _untouched_state(vm: VirtualMachine) -> str:
    """Where a VM whose restore was refused before touching it is: as its VMM says."""
    hv, rt = runtime.hypervisor(), runtime.runtime_dir(vm.pk)
    if not hv.is_alive(rt):
        return "stopped"
    try:
        return "paused" if hv.info(rt).state.value == "paused" else "running"
    except HypervisorError:
        return "running"


def do_destroy(vm: VirtualMachine, request: store.RecordedEvent) -> tuple[str, dict[str, Any]]:
    # After a start or restore of this VM has finished launching its VMM (it checked, under the
    # append lock, that no destroy was requested before it launched), so what it launched goes.
    with vm_host_lock(vm.pk, required=False) as held:
        _kill(vm)
        shutil.rmtree(runtime.vm_data_dir(vm.pk), ignore_errors=True)
        credentials.forget_vm(vm.pk)
        if held:
            with contextlib.suppress(OSError):
                host_lock_path(vm.pk).unlink()
    return "vm.destroyed", {}


Handler = Callable[[VirtualMachine, store.RecordedEvent], tuple[str, dict[str, Any]]]


def _handlers() -> dict[str, Handler]:
    """verb -> its handler, as the lifecycle table names them (a missing one fails the import)."""
    found: dict[str, Handler] = {}
    for row in lifecycle.REQUEST_VERBS:
        handler = globals().get(row.handler or "")
        if not callable(handler):
            raise ImportError(f"vms.worker has no handler {row.handler!r} for the verb {row.name}")
        found[row.name] = handler
    return found


HANDLERS: dict[str, Handler] = _handlers()


def cleanup_snapshot(snapshot_id: str) -> None:
    """Remove a deleted snapshot's files (its record stays in the log)."""
    snap = Snapshot.objects.filter(pk=snapshot_id, state=Snapshot.State.DELETED).first()
    if snap is not None:
        shutil.rmtree(runtime.snapshot_dir(snap.pk), ignore_errors=True)
        credentials.forget_snapshot(snap.pk)
        _forget_hashed(snap.pk)


def _restore_vmm(
    hv: Hypervisor,
    vm: VirtualMachine,
    request: store.RecordedEvent,
    rt: RuntimeDir,
    image_id: str,
    files: SnapshotFiles,
    *,
    with_nic: bool,
    step: tuple[str, str],
) -> int:
    """The VMM of ``vm`` restored from ``files`` into ``rt`` (its NIC plugged first when
    ``with_nic``; the TAP's descriptor closed once the VMM holds its own): its pid. The
    caller holds the launch (``_launching``) and made the runtime directory and data disk."""
    nets = vmnet.plug(vm) if with_nic else ()
    try:
        spec = runtime.build_spec(vm, image_id, nets=nets)
        runtime.record_launched_image(rt, spec)
        _progress(request, step[0], 40, step[1])
        return hv.restore(spec, rt, files)
    finally:
        vmnet.close_fds(nets)
