"""Warm pools: VMs restored from a template's saved state and kept ready, so that a create is a
hand-out (about a tenth of a second) instead of a restore or a boot.

A member (``PoolMember``) is a VMM with no owner, warmed on its host by the worker (``refill``):
``pool.vm_warming`` counts it from the start against the system's pool budget
(``SANDBOX_POOL_BUDGET_MIB``, never a user's quota), the template's saved guest is restored
(``TemplateCache.start`` with no fallback), its agent gets a credential of the member's own
(the template's is refused from then on), it is paused (unless ``SANDBOX_POOL_RUNNING``) and
``pool.vm_warmed`` makes it ready. Its id is the id of the VM it will become: its runtime
directory, data disk, credential and TAP are already that VM's.

Where VMs get a NIC (networking on), a member is restored with one, on a TAP of its own
(``identity.tap_for`` of its id: its VM's TAP to be) in the product namespace on no bridge
(``vmnet.member_nic``), with its cable out (``set_link``) and its NIC down in the guest, with
the template's MAC (as the template saved it): it has no network, address or rules until it is
a VM. The reconciler leaves its TAP alone (``vmnet.remove_orphans``); it goes with the member.

A create that a member can serve (``create``, ``commands.create(from_pool=True)``: a started VM
of its template's own shape, without file secrets, on a network whose bridge is in place where
VMs get a NIC) takes the oldest ready member of this host in its own transaction
(``pool.vm_handed_out`` with ``vm.created`` and the start request: the VM exists, owned and
named, and the member is gone from the pool, so no second create can have it; the create leased
the VM's MAC and address on its network as for any VM). ``finish_handout`` then, in the web
process and under the VM's host lock: plugs the TAP into the VM's network's bridge with the
VM's rules and resolver (``vmnet.attach_begin``, on a thread while the guest resumes), resumes
it (QMP ``cont``), plugs its cable in once the rules are in place, gives it its identity
(hostname, clock and fresh entropy, and the VM's MAC, address, gateway and resolver) and
rotates its credential to a fresh one of the VM's, in one round trip (the agent's ``hello``,
``configure`` and ``rotate`` sent at once: ``AgentClient.pipeline``), and appends
``vm.agent_credential_rotated`` and ``vm.started`` (``from_pool``, with the timings and the
NIC) in one append. When anything fails, the NIC is unplugged (its evidence recorded, its rules
and TAP gone), the VMM goes, ``pool.vm_evicted`` says why, and the start request is enqueued
for the worker, the ordinary way (a template restore). A VM handed out never returns to a pool.
Where VMs get no NIC the guest's part (resume, identity, credential) begins inside the create's
transaction as soon as the member is taken, on a thread beside the create's appends
(``_Begun``); a create that then does not commit evicts the member.

The refill runs after every hand-out (on commit), after a target change, and from a tick of the
worker's main process; one at a time per host (a file lock). It evicts what no longer belongs
(members of an older image, a disabled or changed template, over the target, a dead VMM, one
left warming by a refill that died, one without its TAP where VMs get a NIC), then warms
members until each template is at its target or the budget is full.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Q, Sum

from accounts.caller import Caller
from vms import commands, enqueue, guest, identity, runtime, vmnet, worker
from vms.agent import credentials, readiness
from vms.agent.client import AgentClient
from vms.hypervisors.base import Hypervisor, NetSpec, RuntimeDir, VMSpec
from vms.images import current_image_id, make_data_disk
from vms.models import Network, PoolMember, Template, VirtualMachine

__all__ = [
    "create",
    "finish_handout",
    "poolable_here",
    "refill",
    "report",
    "tick",
]

log = logging.getLogger("sandbox.vms.pools")

HANDOUT_LOCK_WAIT_S = 5.0
HANDOUT_AGENT_TIMEOUT_S = 5.0
# After a hand-out the refill waits this long: the new VM's first commands (on 2 cores under TCG)
# go before the refill's restore takes a core. The pool is one short meanwhile.
REFILL_AFTER_HANDOUT_S = 1.0
REFILL_DELAY_MAX_S = 10.0
# Commands a warm runs in the member before pausing it (see ``warm_one``).
WARM_EXECS = 2
# While a refill just enqueued may still be waiting for a worker, the tick enqueues no other.
_TICK_EVERY_S = 10
_enqueued_at: datetime | None = None


# --- Hand-out (the web process) ---------------------------------------------------------------


def poolable_here() -> bool:
    """Whether creates on this host may be served from a pool: where VMs get no NIC, or where
    the product's network namespace is in place (a hand-out plugs the member's TAP there)."""
    return vmnet.namespace_in_place()


def create(caller: Caller, **fields: Any) -> commands.Accepted:
    """``commands.create``, served from a warm pool when one can: the API's and the dashboard's
    create. A hand-out answers with the VM running (``Accepted.pooled`` set); otherwise the
    start is queued as always. Where VMs get no NIC, the guest's part of the hand-out begins
    as soon as the create has taken the member (``_Begun``), beside the create's appends."""
    begun = _Begun()
    try:
        accepted = commands.create(
            caller,
            from_pool=_serves(fields.get("network")),
            on_pool_member=begun.begin,
            **fields,
        )
    except BaseException as exc:
        begun.undo(f"the create was not recorded ({exc.__class__.__name__})")
        raise
    if accepted.pooled is not None and not finish_handout(accepted, begun):
        return commands.Accepted(accepted.vm_id, accepted.request)
    return accepted


class _Begun:
    """The guest's part of a hand-out, begun inside the create's transaction the moment the
    member is taken (``commands.create``'s ``on_pool_member``), where VMs get no NIC: the
    member's host lock is taken and its credential read, and a fresh one of the VM's kept, in
    the create's transaction; then, on a thread, its agent is connected, the member resumed and
    given its identity and the fresh credential (``AgentClient.pipeline``) while the create
    appends the VM's events and commits. ``finish_handout`` waits for the thread and records
    the start (``vm.started``), as the hand-out without it does; if the create does not commit,
    ``undo`` evicts the member (its guest may have run) with the reason.

    Where VMs get a NIC the hand-out stays in one piece after the create
    (``finish_handout``): its identity rides with the NIC's settings, which need the VM's
    records committed first."""

    def __init__(self) -> None:
        self.member_id: uuid.UUID | None = None
        self.client: AgentClient | None = None
        self.key_id = ""
        self.timings: dict[str, float] = {}
        self.error: BaseException | None = None
        self._t0 = 0.0
        self._lock = contextlib.ExitStack()
        self._thread: threading.Thread | None = None

    @property
    def started(self) -> bool:
        return self._thread is not None

    def begin(self, member: PoolMember, hostname: str) -> None:
        """In the create's transaction, under the append lock: begin, or leave the hand-out to
        ``finish_handout`` (VMs get a NIC here, or the member's host lock is held)."""
        if vmnet.host() is not None:
            return
        self._t0 = time.perf_counter()
        held = self._lock.enter_context(
            worker.vm_host_lock(member.pk, wait_s=HANDOUT_LOCK_WAIT_S, required=False)
        )
        if not held:
            self._lock.close()
            return  # finish_handout waits for it again, and fails the ordinary way
        self.timings["lock_ms"] = _ms(self._t0)
        hv, rt = runtime.hypervisor(), runtime.runtime_dir(member.pk)
        self.client = AgentClient.from_hypervisor(
            hv,
            rt,
            connect_timeout=HANDOUT_AGENT_TIMEOUT_S,
            timeout=HANDOUT_AGENT_TIMEOUT_S,
            credential=credentials.for_vm(member.pk),
        )
        # Kept in the create's transaction, before the guest has it: if the create does not
        # commit, neither does the credential, and the member is evicted (``undo``).
        fresh, self.key_id = credentials.keep_new(member.pk)
        self.member_id = member.pk
        self._thread = threading.Thread(
            target=self._guest,
            args=(hv, rt, member.paused, hostname, fresh),
            name=f"handout-{member.pk.hex[:8]}",
            daemon=True,
        )
        self._thread.start()

    def _guest(
        self, hv: Hypervisor, rt: RuntimeDir, paused: bool, hostname: str, fresh: str
    ) -> None:
        client = self.client
        assert client is not None
        try:
            # Connected before the guest runs: it sees a host at once (``warm_one``).
            client.connect(HANDOUT_AGENT_TIMEOUT_S)
            self.timings["connect_ms"] = _ms(self._t0)
            if paused:
                hv.resume(rt)
            self.timings["resume_ms"] = _ms(self._t0)
            client.pipeline(
                [
                    client.hello_request(),
                    client.configure_request(time=time.time(), hostname=hostname),
                    client.rotate_request(fresh),
                ],
                timeout=HANDOUT_AGENT_TIMEOUT_S,
            )
            self.timings["identity_ms"] = _ms(self._t0)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiter
            self.error = exc

    def wait(self) -> None:
        """Until the guest's part is done; raises what failed in it."""
        assert self._thread is not None and self.client is not None
        self._thread.join(3 * HANDOUT_AGENT_TIMEOUT_S + 5.0)
        if self._thread.is_alive():
            self.client.close()  # its pipeline fails and the thread ends
            raise RuntimeError("the guest's identity step did not finish in time")
        if self.error is not None:
            raise self.error

    def seconds(self) -> float:
        return time.perf_counter() - self._t0

    def release(self) -> None:
        """The member's host lock (before a teardown, which takes it again)."""
        self._lock.close()

    def undo(self, reason: str) -> None:
        """The create that took the member did not commit: the member is still in its pool as
        far as the log says, but its guest may have been resumed and given another credential.
        It is evicted with ``reason`` and torn down."""
        if not self.started or self.member_id is None:
            self.release()
            return
        with contextlib.suppress(Exception):
            self.wait()
        if self.client is not None:
            self.client.close()
        self.release()
        try:
            commands.record_pool_evicted(self.member_id, f"hand-out failed: {reason}")
        except Exception:  # the refill evicts it (its VMM is gone)
            log.exception("recording the eviction of pool member %s failed", self.member_id)
        _teardown(self.member_id, drop_lock=True)
        enqueue.pool_refill()


def _serves(network: str | None) -> bool:
    """Whether a create on ``network`` (its name; None: the default) may be handed a member:
    where VMs get a NIC, only once the network's bridge is in place (a hand-out plugs into it
    and sets up nothing of the namespace itself; the worker makes bridges). The create checks
    the name itself."""
    if not poolable_here():
        return False
    if vmnet.host() is None:
        return True
    found = Network.objects.filter(**({"name": network} if network else {"is_default": True}))
    net = found.first()
    # None: no such network (the create says so), or no default one yet (it makes it).
    return net is not None and vmnet.network_in_place(net)


def _stand_in(
    member_id: uuid.UUID,
    *,
    template: str,
    vcpus: int,
    memory_mib: int,
    disk_mib: int,
    boot: str = "linux",
    image: str = "linux",
    hostname: str = "",
) -> VirtualMachine:
    """An unsaved VM of the member's id and shape: what ``runtime`` and ``credentials`` take
    (never saved: the member is no VM until it is handed out)."""
    return VirtualMachine(
        id=member_id,
        name=hostname or f"pool-{member_id.hex[:8]}",
        template=template,
        boot=boot,
        image=image,
        vcpus=vcpus,
        memory_mib=memory_mib,
        disk_mib=disk_mib,
        hostname=hostname or f"pool-{member_id.hex[:8]}",
    )


def finish_handout(accepted: commands.Accepted, begun: _Begun | None = None) -> bool:
    """Resume the member handed out to ``accepted``'s create as its VM, give it its identity
    and a credential of its own, and record it started (``begun``: the guest's part begun in
    the create, ``_Begun``). False (the VMM gone, the member's eviction recorded, the start
    request enqueued for the worker) when anything failed."""
    member = accepted.pooled
    assert member is not None
    if begun is not None and begun.started:
        return _finish_begun(accepted, begun)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    hv, rt = runtime.hypervisor(), runtime.runtime_dir(accepted.vm_id)
    hostname = accepted.hostname
    vm: VirtualMachine | None = None
    try:
        # Its network, address, MAC and TAP, as the create leased them (the TAP is the
        # member's: ``identity.tap_for`` of their one id).
        if vmnet.host() is not None:
            vm = VirtualMachine.objects.select_related("network").get(pk=accepted.vm_id)
        nets = vmnet.netspecs(vm) if vm is not None else ()
        with worker.vm_host_lock(accepted.vm_id, wait_s=HANDOUT_LOCK_WAIT_S):
            timings["lock_ms"] = _ms(t0)
            client = AgentClient.from_hypervisor(
                hv,
                rt,
                connect_timeout=HANDOUT_AGENT_TIMEOUT_S,
                timeout=HANDOUT_AGENT_TIMEOUT_S,
                credential=credentials.for_vm(accepted.vm_id),
            )
            pluggings: tuple[Any, ...] = ()
            try:
                with transaction.atomic():
                    # The VM's fresh credential, kept before the guest runs; handed over below.
                    fresh, key_id = credentials.keep_new(accepted.vm_id)
                    # Connected before the guest runs: it sees a host at once (``warm_one``).
                    client.connect(HANDOUT_AGENT_TIMEOUT_S)
                    timings["connect_ms"] = _ms(t0)
                    # The TAP's bridge port, resolver and rules, while the guest resumes (its
                    # NIC is down in the guest and its cable out until they are in place).
                    pluggings = vmnet.attach_begin(vm) if vm is not None else ()
                    if member.paused:
                        hv.resume(rt)
                    timings["resume_ms"] = _ms(t0)
                    nic: dict[str, Any] = {}
                    if nets:
                        vmnet.wait_plugged(pluggings)
                        timings["plugged_ms"] = _ms(t0)
                        _cable(hv, rt, nets, up=True)
                        # The VM's MAC (the guest's NIC has the template's), address, gateway
                        # and resolver ride with the clock and hostname, as after a restore.
                        spec = VMSpec(vm_id=accepted.vm_id.hex[:12], nets=nets)
                        nic = readiness.nic_settings(spec, hv.nic_macs(rt))[0]
                    # Hello, identity and the credential in one round trip: the agent checks
                    # and starts them in this order, each with the member's credential.
                    client.pipeline(
                        [
                            client.hello_request(),
                            client.configure_request(time=time.time(), hostname=hostname, **nic),
                            client.rotate_request(fresh),
                        ],
                        timeout=HANDOUT_AGENT_TIMEOUT_S,
                    )
                    if nets:
                        readiness.check_macs(hv, rt, spec)
                    timings["identity_ms"] = _ms(t0)
                    # The credential row goes back with this block if the start is not recorded.
                    _record_started(
                        accepted, key_id, time.perf_counter() - t0, timings, _nic_data(nets)
                    )
            except BaseException:
                client.close()
                raise
            finally:
                vmnet.join_plugged(pluggings)  # never unplug (on failure) while it still plugs
        # Its first session in this process (an exec, mostly) needs no new connection.
        guest.park(accepted.vm_id, client)
    except _Superseded:
        _unplug(vm)
        _teardown(accepted.vm_id)
        return True  # the destroy's request is the VM's now; the worker carries it out
    except Exception as exc:
        _unplug(vm)
        return _handout_failed(accepted, exc)
    enqueue.pool_refill(REFILL_AFTER_HANDOUT_S)
    return True


def _finish_begun(accepted: commands.Accepted, begun: _Begun) -> bool:
    """``finish_handout`` of a hand-out whose guest part began in the create: wait for it,
    then record the start."""
    assert begun.client is not None
    try:
        try:
            begun.wait()
            _record_started(accepted, begun.key_id, begun.seconds(), begun.timings, {})
        except BaseException:
            begun.client.close()
            raise
        finally:
            begun.release()
        guest.park(accepted.vm_id, begun.client)
    except _Superseded:
        _teardown(accepted.vm_id)
        return True
    except Exception as exc:
        return _handout_failed(accepted, exc)
    enqueue.pool_refill(REFILL_AFTER_HANDOUT_S)
    return True


def _record_started(
    accepted: commands.Accepted,
    key_id: str,
    seconds: float,
    timings: dict[str, float],
    nic: dict[str, Any],
) -> None:
    """``vm.agent_credential_rotated`` and ``vm.started`` of a hand-out (``record_handout``);
    ``_Superseded`` when a destroy came first (nothing recorded: the VM must not run), and an
    error when it was not recorded (another outcome or a conflict came first: the VM must not
    run as if started)."""
    member = accepted.pooled
    assert member is not None
    hv, rt = runtime.hypervisor(), runtime.runtime_dir(accepted.vm_id)
    data = {
        "host": member.host,
        "hypervisor": hv.name,
        "pid": rt.pid(),
        "from_template": True,
        "from_pool": True,
        "image_id": member.image_id,
        "seconds": round(seconds, 4),
        "handout_ms": {k: round(v, 2) for k, v in timings.items()},
        **nic,
    }
    outcome = commands.record_handout(accepted.request, key_id, data)
    if outcome is commands.SUPERSEDED:
        raise _Superseded()
    if outcome is None:
        raise RuntimeError("its start could not be recorded")


def _handout_failed(accepted: commands.Accepted, exc: Exception) -> bool:
    """A hand-out that did not finish (its NIC already unplugged): the VMM goes, the member's
    eviction says why, and the VM's start request goes to the worker. False."""
    log.warning("hand-out of pool member %s failed: %s", accepted.vm_id, exc)
    _teardown(accepted.vm_id)
    with contextlib.suppress(Exception):
        commands.record_pool_evicted(
            accepted.vm_id,
            f"hand-out failed: {exc}; the VM starts from its template",
            handed_out_vm=accepted.vm_id,
        )
    enqueue.request(accepted.request.event_id)
    enqueue.pool_refill()
    return False


class _Superseded(Exception):
    pass


def _cable(hv: Hypervisor, rt: RuntimeDir, nets: tuple[NetSpec, ...], *, up: bool) -> None:
    """Plug or unplug the NICs' cables where the VMM can (QEMU ``set_link``): a member's guest
    sees no carrier until its hand-out. Its NIC is down in the guest anyway (the template's
    guest took it down before it was saved)."""
    set_link = getattr(hv, "set_link", None)
    if set_link is None:
        return
    for i, net in enumerate(nets):
        set_link(rt, net.id or f"net{i}", up)


def _nic_data(nets: tuple[NetSpec, ...]) -> dict[str, Any]:
    if not nets:
        return {}
    net = nets[0]
    return {"nic": {"tap": net.tap, "mac": net.mac, "address": net.address, "netns": net.netns}}


def _unplug(vm: VirtualMachine | None) -> None:
    """A hand-out that did not finish: its VM's last evidence, rules, resolver and TAP go."""
    if vm is None:
        return
    try:
        errors = vmnet.unplug(vm)
    except Exception:  # the teardown goes on; the reconciler removes what is left
        log.exception("unplugging the NIC of %s failed", vm.pk)
        return
    if errors:
        log.warning("unplugging the NIC of %s: %s", vm.pk, "; ".join(errors))


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


def _teardown(member_id: uuid.UUID, *, drop_lock: bool = False) -> None:
    """The member's VMM, TAP, disk and credential go (whatever became of each); ``drop_lock``: its
    host lock file too (an evicted member: nothing waits on it; a failed hand-out's VM lives on
    and its start takes the lock)."""
    with worker.vm_host_lock(member_id, required=False, wait_s=30.0) as held:
        with contextlib.suppress(Exception):
            runtime.hypervisor().destroy(runtime.runtime_dir(member_id))
        with contextlib.suppress(Exception):
            vmnet.unplug_member(member_id)  # its TAP (after its VMM: nothing holds it then)
        shutil.rmtree(runtime.vm_data_dir(member_id), ignore_errors=True)
        credentials.forget_vm(member_id)
        if held and drop_lock:  # as a destroy does: no lock file left per member
            with contextlib.suppress(OSError):
                worker.host_lock_path(member_id).unlink()


# --- Refill (the worker) ----------------------------------------------------------------------


@contextlib.contextmanager
def _refill_lock() -> Iterator[bool]:
    path = Path(settings.SANDBOX_RUNTIME_DIR) / "pool-refill.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _evict(member: PoolMember, reason: str) -> bool:
    """Out of the pool first (so no create takes it), then its VMM goes."""
    if commands.record_pool_evicted(member.pk, reason) is None:
        return False
    _teardown(member.pk, drop_lock=True)
    return True


def _stale_reason(member: PoolMember, templates: dict[str, Template], image_id: str) -> str:
    tpl = templates.get(member.template)
    if tpl is None or not tpl.enabled:
        return "template disabled or removed"
    if (tpl.vcpus, tpl.memory_mib, tpl.disk_mib) != (
        member.vcpus,
        member.memory_mib,
        member.disk_mib,
    ):
        return "template shape changed"
    if member.image_id != image_id:
        return "guest image changed"
    return ""


def refill(delay_s: float = 0.0) -> dict[str, int]:
    """Evict this host's members that no longer belong, then warm members up to each
    template's target within the budget. Returns counts (``busy``: another refill runs).
    ``delay_s``: wait first (capped at ``REFILL_DELAY_MAX_S``)."""
    counts = {"evicted": 0, "warmed": 0, "failed": 0, "busy": 0}
    if delay_s > 0:
        time.sleep(min(float(delay_s), REFILL_DELAY_MAX_S))
    with _refill_lock() as held:
        if not held:
            counts["busy"] = 1
            return counts
        host = runtime.host_name()
        hv = runtime.hypervisor()
        try:
            image_id = current_image_id() or ""
        except Exception as exc:
            log.warning("pools: no guest image: %s", exc)
            image_id = ""
        templates = {t.name: t for t in Template.objects.all()}
        targets = commands.pool_targets() if poolable_here() else {}
        taps = vmnet.member_taps()  # None: VMs get no NIC here
        mine = list(PoolMember.objects.filter(host=host).order_by("-created_at"))
        kept: dict[str, int] = {}
        for member in mine:
            if member.state == PoolMember.State.WARMING:
                # Under the refill lock no warm of this host is under way: left by one that died.
                reason = "left warming by a refill that stopped"
            elif not hv.is_alive(runtime.runtime_dir(member.pk)):
                reason = "its VMM is gone"
            elif taps is not None and identity.tap_for(member.pk) not in taps:
                reason = "it has no TAP (VMs get a NIC here)"
            else:
                reason = _stale_reason(member, templates, image_id)
            if not reason and kept.get(member.template, 0) >= targets.get(member.template, 0):
                reason = "over the target"  # the newest go first
            if reason:
                counts["evicted"] += _evict(member, reason)
            else:
                kept[member.template] = kept.get(member.template, 0) + 1
        if not image_id:
            return counts
        for name, target in sorted(targets.items()):
            tpl = templates.get(name)
            if tpl is None or not tpl.enabled or tpl.boot != "linux" or tpl.image != "linux":
                continue
            failures = 0
            while kept.get(name, 0) < target and failures < 2:
                outcome = warm_one(tpl, host, image_id)
                if outcome is None:
                    break  # at the target or out of budget
                if outcome:
                    kept[name] = kept.get(name, 0) + 1
                    counts["warmed"] += 1
                else:
                    failures += 1
                    counts["failed"] += 1
    return counts


def warm_one(tpl: Template, host: str, image_id: str) -> bool | None:
    """Warm one member of ``tpl``'s pool: True when ready, False when it failed (evicted with
    the reason), None when the pool is at its target or the budget is full."""
    member_id = commands.record_pool_warming(tpl, host, image_id)
    if member_id is None:
        return None
    t0 = time.monotonic()
    vm = _stand_in(
        member_id,
        template=tpl.name,
        vcpus=tpl.vcpus,
        memory_mib=tpl.memory_mib,
        disk_mib=tpl.disk_mib,
        boot=tpl.boot,
        image=tpl.image,
    )
    hv, rt = runtime.hypervisor(), runtime.runtime_dir(member_id)
    running = bool(settings.SANDBOX_POOL_RUNNING)
    try:
        with worker.vm_host_lock(member_id):
            rt.create()
            disk = runtime.vm_data_dir(member_id) / "data.img"
            disk.parent.mkdir(parents=True, exist_ok=True)
            make_data_disk(disk, tpl.disk_mib)
            # Where VMs get a NIC: one on a TAP of its own on no bridge (``vmnet.member_nic``).
            nic = vmnet.member_nic(member_id)
            nets = (nic,) if nic is not None else ()
            try:
                spec = runtime.build_spec(vm, nets=nets)
                runtime.record_launched_image(rt, spec)
                cache = hv.template_cache(_MEMBER_HOOKS)
                if cache is None:
                    raise RuntimeError("this hypervisor has no saved-state templates")
                result = cache.start(spec, rt, fallback=False)
            finally:
                vmnet.close_fds(nets)  # the VMM holds its own copy
            # No carrier until the hand-out (the guest's NIC is down, with the template's MAC).
            _cable(hv, rt, nets, up=False)
            if result.guest_secret is None:
                raise RuntimeError("the template keeps no credential for its guest")
            # A credential of the member's own (kept under its VM's id): the template's is
            # refused from now on. No VM event: the member is no VM yet (pool.vm_warmed
            # records the key id).
            client = AgentClient.from_hypervisor(
                hv, rt, credential=result.guest_secret, timeout=30.0
            )
            with client:
                client.hello(timeout=30.0, interval=0.05)
                with transaction.atomic():
                    key_id = credentials.keep_fresh(member_id, client)
                # Under TCG a restored VMM starts with an empty translation cache: the guest's
                # first exec and configure would be translated on the user's time. Done here,
                # the cache (kept while paused) already holds them.
                for _ in range(WARM_EXECS):
                    client.exec(["true"], timeout=30.0)
                client.configure(time=time.time(), hostname=vm.hostname)
                if not running:
                    # Paused while a host is still connected: its agent waits in read(), not
                    # in its 100 ms poll for a host, so a hand-out that connects before it
                    # resumes is answered at once.
                    hv.pause(rt)
        commands.record_pool_warmed(
            member_id,
            {
                "seconds": round(time.monotonic() - t0, 3),
                "paused": not running,
                "pid": result.pid,
                "image_id": spec.extra.get("image_id", image_id),
                "key_id": key_id,
                **({"tap": nets[0].tap} if nets else {}),
                "ready": PoolMember.objects.filter(
                    template=tpl.name, host=host, state=PoolMember.State.READY
                ).count()
                + 1,
            },
        )
    except Exception as exc:
        log.warning("warming a member of pool %s failed: %s", tpl.name, exc)
        with contextlib.suppress(Exception):
            commands.record_pool_evicted(member_id, f"warm failed: {exc}")
        _teardown(member_id)
        return False
    return True


def _member_identity(
    hv: Hypervisor, rt: RuntimeDir, spec: VMSpec, credential: str | None = None
) -> None:
    """After a member's restore: its clock and hostname only. Its NIC keeps the template's MAC
    and stays down until the hand-out gives it its VM's MAC, address and rules."""
    readiness.reset_identity(hv, rt, spec.replace(nets=()), credential)


_MEMBER_HOOKS = dataclasses.replace(worker.TEMPLATE_HOOKS, reset_identity=_member_identity)


# --- Reports and the tick ---------------------------------------------------------------------


def report() -> dict[str, Any]:
    """Per template: target, ready and warming members (all hosts), and the budget. A constant
    number of queries, whatever the number of templates (one grouped count of the members)."""
    targets = commands.pool_targets()
    none: dict[str, Any] = {}
    counted: dict[str, dict[str, Any]] = {
        row["template"]: dict(row)
        for row in PoolMember.objects.values("template").annotate(
            ready=Count("pk", filter=Q(state=PoolMember.State.READY)),
            warming=Count("pk", filter=Q(state=PoolMember.State.WARMING)),
            memory_mib=Sum("memory_mib"),
        )
    }
    pools = [
        {
            "template": name,
            "target": targets.get(name, 0),
            "ready": counted.get(name, none).get("ready", 0),
            "warming": counted.get(name, none).get("warming", 0),
            "memory_mib": counted.get(name, none).get("memory_mib") or 0,
        }
        for name in sorted(set(targets) | set(counted))
    ]
    return {
        "pools": pools,
        "budget_mib": settings.SANDBOX_POOL_BUDGET_MIB,
        "used_mib": sum(p["memory_mib"] for p in pools),
        "running": bool(settings.SANDBOX_POOL_RUNNING),
        "serves_creates_here": poolable_here(),
    }


def tick(now: datetime) -> None:
    """``core.ticks``: enqueue a refill every ``_TICK_EVERY_S`` while any template has a
    target or this host has members (a crashed member, a changed image are found so)."""
    global _enqueued_at
    if _enqueued_at is not None and now - _enqueued_at < timedelta(seconds=_TICK_EVERY_S):
        return
    _enqueued_at = now
    if not any(commands.pool_targets().values()) and not PoolMember.objects.exists():
        return
    enqueue.pool_refill()
