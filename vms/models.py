"""Read models of the VM domain, projected from vm.*, snapshot.* and net.* events.

Only ``vms.projectors`` writes VirtualMachine, Snapshot, Usage and RequestOutcome rows, inside
the append transaction; commands and tasks change them by appending events. Templates are
configuration (edited by admins). Quotas and group budgets are settings too, changed only
through ``vms.commands.set_quota`` / ``set_group_budget``, each change a ``quota.changed`` event.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models

__all__ = [
    "ACTIVE_STATES",
    "AgentCredential",
    "EGRESS_CHOICES",
    "GroupBudget",
    "HostCapacity",
    "Network",
    "ON_EXPIRY_CHOICES",
    "PoolMember",
    "PoolTarget",
    "PortForward",
    "Quota",
    "RequestOutcome",
    "Snapshot",
    "Template",
    "Usage",
    "UsageCounter",
    "UsageHour",
    "UsageMinute",
    "UsageRollupState",
    "UsageSample",
    "VMState",
    "VMActivity",
    "VirtualMachine",
    "WorkerHeartbeat",
]


class VMState(models.TextChoices):
    CREATING = "creating"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    PAUSING = "pausing"
    PAUSED = "paused"
    RESUMING = "resuming"
    REBOOTING = "rebooting"
    RESIZING = "resizing"
    SNAPSHOTTING = "snapshotting"
    RESTORING = "restoring"
    DESTROYING = "destroying"
    DESTROYED = "destroyed"
    FAILED = "failed"
    CRASHED = "crashed"


# States that count against quotas (everything but destroyed).
ACTIVE_STATES = frozenset(s.value for s in VMState) - {VMState.DESTROYED.value}


# What a VM may reach outside its network (vms.network.ruleset.EGRESS_MODES).
EGRESS_CHOICES = [("none", "None"), ("allow-list", "Allow list"), ("internet", "Internet")]


class Network(models.Model):
    """A network VMs are attached to: a bridge in the product's network namespace with its
    subnet, the host ports its forwards are taken from and the egress new VMs get. Projected from
    net.network_* events (aggregate "network"); ``version`` is its aggregate version."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    name = models.SlugField(max_length=63, unique=True)
    subnet = models.CharField(max_length=18)  # an IPv4 CIDR, private, /16 to /29
    gateway = models.GenericIPAddressField(protocol="IPv4")  # the subnet's first host address
    bridge = models.CharField(max_length=15, unique=True)  # vms.network.names.check_ifname
    isolated = models.BooleanField(default=True)  # VMs on it cannot reach each other
    port_min = models.PositiveIntegerField()
    port_max = models.PositiveIntegerField()
    default_egress = models.CharField(max_length=16, choices=EGRESS_CHOICES, default="none")
    is_default = models.BooleanField(default=False)
    version = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField()

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(
                fields=["is_default"],
                condition=models.Q(is_default=True),
                name="vms_network_one_default",
            )
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.subnet})"


# What a VM's lifetime ends in (vms.lifetimes): the ordinary stop or destroy request.
ON_EXPIRY_CHOICES = [("stop", "Stop"), ("destroy", "Destroy")]


# Who gives way first when the host runs short (vms.pressure): low, then normal; high never.
PRIORITY_CHOICES = [("high", "High"), ("normal", "Normal"), ("low", "Low")]


class Template(models.Model):
    """A VM shape offered to users: built in, from YAML (SANDBOX_TEMPLATES_FILE) or the admin."""

    name = models.SlugField(max_length=63, unique=True)
    description = models.CharField(max_length=200, blank=True)
    boot = models.CharField(max_length=8, choices=[("linux", "Linux"), ("uefi", "UEFI")])
    image = models.CharField(max_length=63, default="linux", help_text="linux, uefi or windows")
    vcpus = models.PositiveSmallIntegerField()
    memory_mib = models.PositiveIntegerField()
    disk_mib = models.PositiveIntegerField(default=1024)
    source = models.CharField(max_length=16, default="builtin")
    enabled = models.BooleanField(default=True)
    # Secrets every VM made from it receives, by reference (``secretstore.guests``): resolved as
    # the creating user may use them, merged under what the create request names itself.
    secrets = models.JSONField(default=list, blank=True)
    # The lifetime of a VM made from it (vms.lifetimes): seconds from its create, None for none;
    # what its expiry does to it (stop or destroy).
    timeout_s = models.PositiveIntegerField(null=True, blank=True)
    on_expiry = models.CharField(max_length=8, choices=ON_EXPIRY_CHOICES, default="stop")
    # The idle policy of a VM made from it (vms.idle): paused after this many seconds without
    # exec, file transfer or console input; None: never. ``idle_to_disk``: the idle pause
    # suspends to disk (memory and device state saved to a file, the VMM stopped, its memory
    # freed) rather than keeping the paused VMM.
    idle_timeout_s = models.PositiveIntegerField(null=True, blank=True)
    idle_to_disk = models.BooleanField(default=False)
    # Its VMs' priority under host pressure, and whether they opt out of it (vms.pressure).
    priority = models.CharField(max_length=8, choices=PRIORITY_CHOICES, default="normal")
    pressure_opt_out = models.BooleanField(default=False)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class VirtualMachine(models.Model):
    """A VM as the log says it is now. ``version`` is its aggregate version."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    name = models.CharField(max_length=63)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="vms"
    )
    template = models.CharField(max_length=63)
    boot = models.CharField(max_length=8)
    image = models.CharField(max_length=63, default="linux")
    vcpus = models.PositiveSmallIntegerField()
    memory_mib = models.PositiveIntegerField()
    disk_mib = models.PositiveIntegerField()
    state = models.CharField(max_length=16, choices=VMState.choices, db_index=True)
    pending_request = models.CharField(
        max_length=64, blank=True
    )  # event id of the request in flight
    pending_type = models.CharField(max_length=64, blank=True)
    host = models.CharField(max_length=100, blank=True)
    hypervisor = models.CharField(max_length=32, blank=True)
    # The guest image (vms.images image id) its VMM was last started or restored on.
    image_id = models.CharField(max_length=64, blank=True)
    hostname = models.CharField(max_length=63)
    mac = models.CharField(max_length=17)
    ip = models.GenericIPAddressField(null=True, blank=True)
    # The NIC: its network (None: the VM has no NIC), its TAP's name, its egress policy.
    network = models.ForeignKey(
        Network, null=True, blank=True, on_delete=models.PROTECT, related_name="vms"
    )
    tap = models.CharField(max_length=15, blank=True)
    egress = models.CharField(max_length=16, choices=EGRESS_CHOICES, default="none")
    egress_allow = models.JSONField(default=list, blank=True)  # CIDRs and domain names
    source_snapshot = models.ForeignKey(
        "vms.Snapshot", null=True, blank=True, on_delete=models.SET_NULL, related_name="clones"
    )
    # The snapshot the current state descends from: the parent of the next snapshot.
    last_snapshot = models.ForeignKey(
        "vms.Snapshot", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    last_error = models.TextField(blank=True)
    progress = models.JSONField(default=dict, blank=True)
    # Secrets (secretstore) the guest receives at every start (files) and exec (variables):
    # [{"name", "owner", "env" | "file"}], from vm.created. Never a value.
    secrets = models.JSONField(default=list, blank=True)
    # Every secret the guest was ever given, by this VM's create, an exec or the VM it was
    # cloned from: [{"name", "owner"}]. What comes out of the guest is masked for these.
    secrets_seen = models.JSONField(default=list, blank=True)
    # The group whose team budget (``GroupBudget``) this VM draws from, chosen at its create
    # (vm.created's ``budget_group_id``); None: no team budget. Not a database constraint: a
    # rebuild from the log must not fail on a group deleted since (its budget went with it).
    budget_group = models.ForeignKey(
        "auth.Group",
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="+",
    )
    # Its lifetime (vm.lifetime_set; vms.lifetimes): when it ends (None: none, or already acted
    # on) and what its end does, from its template at create.
    expires_at = models.DateTimeField(null=True, blank=True)
    on_expiry = models.CharField(max_length=8, choices=ON_EXPIRY_CHOICES, default="stop")
    # Its idle policy (vm.created from its template, vm.idle_policy_set; vms.idle): paused by
    # the system after this many seconds without guest activity (None: never); ``idle_paused``:
    # its pause was the system's for idleness, so the next exec or file request resumes it.
    # ``idle_to_disk``: its idle pause suspends it to disk; ``suspended_to_disk``: it is paused
    # with no VMM, its state in a file under its data dir (vm.paused with ``to_disk``): it holds
    # no host memory or vCPUs (vms.capacity), and a resume restores it from the file.
    idle_timeout_s = models.PositiveIntegerField(null=True, blank=True)
    idle_paused = models.BooleanField(default=False)
    idle_to_disk = models.BooleanField(default=False)
    suspended_to_disk = models.BooleanField(default=False)
    # Host pressure (vms.pressure): its priority and opt-out (vm.created, vm.priority_set), and
    # the memory its balloon leaves it while the host took some back (vm.ballooned; None: none,
    # vm.balloon_released), since when.
    priority = models.CharField(max_length=8, choices=PRIORITY_CHOICES, default="normal")
    pressure_opt_out = models.BooleanField(default=False)
    balloon_target_mib = models.PositiveIntegerField(null=True, blank=True)
    ballooned_at = models.DateTimeField(null=True, blank=True)
    # ... and the CPU weight its VMM's cgroup was lowered to under CPU pressure (vm.cpu_lowered;
    # None: its own, vm.cpu_restored), since when.
    cpu_weight = models.PositiveIntegerField(null=True, blank=True)
    cpu_lowered_at = models.DateTimeField(null=True, blank=True)
    version = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()
    state_changed_at = models.DateTimeField()

    class Meta:
        ordering = ["-created_at"]
        # The API's lists: newest first, everyone's (readers of all) or one owner's.
        indexes = [
            models.Index(fields=["-created_at"], name="vms_vm_newest"),
            models.Index(fields=["owner", "-created_at"], name="vms_vm_owner_newest"),
            models.Index(fields=["mac"], name="vms_vm_mac"),
            # The lifetime tick's question: which VMs' lifetimes have ended (few have one).
            models.Index(
                fields=["expires_at"],
                condition=models.Q(expires_at__isnull=False),
                name="vms_vm_expiring",
            ),
            # A team budget's usage, summed under the append lock: its VMs not destroyed.
            models.Index(
                fields=["budget_group"],
                condition=~models.Q(state="destroyed"),
                name="vms_vm_budget_live",
            ),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["owner", "name"],
                condition=~models.Q(state="destroyed"),
                name="vms_unique_live_name_per_owner",
            )
        ]
        permissions = [
            ("operate_vm", "Can start, stop, reboot, pause, resume and resize VMs"),
            ("exec_vm", "Can run commands in guests"),
            ("read_files", "Can download files from guests"),
            ("write_files", "Can upload files into guests"),
            ("console_vm", "Can type into guest consoles"),
            ("snapshot_vm", "Can take snapshots"),
            ("rollback_snapshot", "Can restore and clone snapshots"),
            ("manage_all_vms", "Can act on every user's VMs"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.state})"

    @property
    def busy(self) -> bool:
        return bool(self.pending_request)


class VMActivity(models.Model):
    """When a VM's guest was last used (exec, file transfer, console input; vms.idle): not
    state, so not an event, and not a projection: written by the web tier when a guest request
    starts and with its outcome (console input at most once per ``vms.idle.TOUCH_EVERY_S``),
    read by the idle tick and the idle pause, deleted with the VM's ``vm.destroyed``. A VM
    without a row counts from its last change of state."""

    vm_id = models.UUIDField(primary_key=True)
    last_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.vm_id} used at {self.last_at}"


class PortForward(models.Model):
    """A host port forwarded to a port of a VM's guest. The host port comes from the VM's
    network's range and is unique with its protocol over all networks (every forward listens on
    the same host side). Projected from net.port_forward_added / _removed (aggregate "vm")."""

    PROTOCOLS = [("tcp", "TCP"), ("udp", "UDP")]

    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    vm = models.ForeignKey(VirtualMachine, on_delete=models.CASCADE, related_name="forwards")
    protocol = models.CharField(max_length=3, choices=PROTOCOLS)
    guest_port = models.PositiveIntegerField()
    host_port = models.PositiveIntegerField()
    created_at = models.DateTimeField()

    class Meta:
        ordering = ["host_port", "protocol"]
        constraints = [
            models.UniqueConstraint(
                fields=["protocol", "host_port"], name="vms_forward_unique_host_port"
            )
        ]

    def __str__(self) -> str:
        return f"{self.protocol}/{self.host_port} -> {self.vm_id}:{self.guest_port}"


class Snapshot(models.Model):
    """A saved VM state: files, SHA-256 manifest, lineage."""

    class State(models.TextChoices):
        CREATING = "creating"
        READY = "ready"
        FAILED = "failed"
        CORRUPTED = "corrupted"
        DELETED = "deleted"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    name = models.CharField(max_length=63)
    vm = models.ForeignKey(
        VirtualMachine, null=True, blank=True, on_delete=models.SET_NULL, related_name="snapshots"
    )
    vm_name = models.CharField(max_length=63)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="snapshots"
    )
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="children"
    )
    state = models.CharField(max_length=16, choices=State.choices, default=State.CREATING)
    template = models.CharField(max_length=63)
    boot = models.CharField(max_length=8)
    image = models.CharField(max_length=63, default="linux")
    vcpus = models.PositiveSmallIntegerField()
    memory_mib = models.PositiveIntegerField()
    disk_mib = models.PositiveIntegerField()
    size_bytes = models.BigIntegerField(default=0)
    manifest = models.JSONField(default=dict, blank=True)  # relative path -> {size, sha256}
    # The guest image it was taken on: it is restored on that image only (blank: taken before
    # images had ids, restored on the current one).
    image_id = models.CharField(max_length=64, blank=True)
    last_error = models.TextField(blank=True)
    version = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField()
    deleted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} of {self.vm_name} ({self.state})"


class PreviewLink(models.Model):
    """A shareable preview link (``vms.previews``, kind ``link``): who made it, for which port, its
    expiry, and whether it was revoked. The signed value is the credential and is kept nowhere;
    a link whose row is missing or revoked opens nothing. Projected from
    vm.preview_link_created / vm.preview_link_revoked (aggregate "vm")."""

    link_id = models.CharField(primary_key=True, max_length=32)
    vm_id = models.UUIDField(db_index=True)
    port = models.PositiveIntegerField()
    created_by = models.CharField(max_length=150)  # the actor's name when it was made
    created_at = models.DateTimeField()
    expires_at = models.DateTimeField()
    revoked_at = models.DateTimeField(null=True, blank=True)
    revoked_by = models.CharField(max_length=150, blank=True)

    class Meta:
        ordering = ["-created_at", "link_id"]

    def __str__(self) -> str:
        return f"preview link {self.link_id} to {self.vm_id}:{self.port}"


class Usage(models.Model):
    """Projection: what each user holds now, for quotas."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, primary_key=True, on_delete=models.CASCADE
    )
    vms = models.IntegerField(default=0)
    vcpus = models.IntegerField(default=0)
    memory_mib = models.BigIntegerField(default=0)
    disk_mib = models.BigIntegerField(default=0)
    snapshots = models.IntegerField(default=0)

    def __str__(self) -> str:
        return f"usage of {self.user_id}"


class Quota(models.Model):
    """Limits for a user, or for everyone in a group, resolved per resource (``vms.quotas``): a
    user's own field wins; else the most generous of its groups' fields; else the defaults in
    settings. An empty field inherits; it never means "no limit"."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="quota",
    )
    group = models.OneToOneField(
        "auth.Group", null=True, blank=True, on_delete=models.CASCADE, related_name="quota"
    )
    max_vms = models.PositiveIntegerField(null=True, blank=True)
    max_vcpus = models.PositiveIntegerField(null=True, blank=True)
    max_memory_mib = models.PositiveIntegerField(null=True, blank=True)
    max_disk_mib = models.PositiveIntegerField(null=True, blank=True)
    max_snapshots = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=models.Q(user__isnull=False, group__isnull=True)
                | models.Q(user__isnull=True, group__isnull=False),
                name="vms_quota_user_xor_group",
            )
        ]

    def __str__(self) -> str:
        return f"quota of {self.user or self.group}"


class GroupBudget(models.Model):
    """A team budget: what the VMs drawing from ``group`` may hold together (``vms.quotas``).

    A group ``Quota`` is an allowance per member; a budget is shared: the VMs charged to the
    group (``VirtualMachine.budget_group``, chosen at create) and their snapshots must stay
    within it, each member's own limits applying inside it too. An empty field puts no team
    limit on that resource. Changed only through ``vms.commands.set_group_budget``.
    """

    group = models.OneToOneField("auth.Group", on_delete=models.CASCADE, related_name="budget")
    max_vms = models.PositiveIntegerField(null=True, blank=True)
    max_vcpus = models.PositiveIntegerField(null=True, blank=True)
    max_memory_mib = models.PositiveIntegerField(null=True, blank=True)
    max_disk_mib = models.PositiveIntegerField(null=True, blank=True)
    max_snapshots = models.PositiveIntegerField(null=True, blank=True)

    def __str__(self) -> str:
        return f"team budget of {self.group}"


class RequestOutcome(models.Model):
    """One outcome per request event: the unique key makes a retried task's second outcome fail."""

    request_event_id = models.CharField(max_length=64, primary_key=True)
    outcome_event_id = models.CharField(max_length=64)
    outcome_type = models.CharField(max_length=64)
    position = models.BigIntegerField()

    def __str__(self) -> str:
        return f"{self.request_event_id} -> {self.outcome_type}"


class WorkerHeartbeat(models.Model):
    """The last heartbeat of the worker cluster serving one queue (operational state, not part
    of the log): the cluster's main process sends a heartbeat task through the broker, a worker
    process runs it and stamps ``beat_at``. ``/readyz`` is not ready when no worker took one
    recently, so a dead pusher, dead or stuck workers or a broken database connection in the
    worker show up there (``vms.heartbeat``)."""

    queue = models.CharField(max_length=100, primary_key=True)
    host = models.CharField(max_length=255)
    pid = models.IntegerField()  # the cluster's main process
    started_at = models.DateTimeField()  # when that cluster started
    sent_at = models.DateTimeField()  # the newest heartbeat sent
    beat_at = models.DateTimeField(null=True)  # when a worker last ran a heartbeat
    beat_sent_at = models.DateTimeField(null=True)  # ... and when that one had been sent

    def __str__(self) -> str:
        return f"worker heartbeat of {self.queue}"


class HostCapacity(models.Model):
    """What one hypervisor host has and really uses, as its worker last measured it
    (operational state, not part of the log): refreshed by each heartbeat a worker on the host
    runs (``vms.capacity``). What VMs are *committed* to a host is not stored here: it is summed
    from the VMs placed on it."""

    host = models.CharField(max_length=255, primary_key=True)
    cpus = models.PositiveIntegerField()  # os.cpu_count()
    memory_mib = models.PositiveIntegerField()  # /proc/meminfo MemTotal
    available_mib = models.PositiveIntegerField(null=True)  # MemAvailable
    load1 = models.FloatField(null=True)  # 1-minute load average
    cpu_pressure = models.FloatField(null=True)  # /proc/pressure/cpu "some avg10", percent
    memory_pressure = models.FloatField(null=True)  # /proc/pressure/memory "some avg10"
    measured_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"capacity of {self.host}"


class Task(models.Model):
    """One request on a VM (a lifecycle verb or a guest access) as the task log shows it: who
    asked, its progress, and how it ended. A read model folded from the request, ``vm.progress``
    and outcome events (``vms.projectors.TaskProjector``); ``version`` is the position of the
    last event applied, so a live push older than what was sent is dropped."""

    STATES = ("pending", "succeeded", "failed", "superseded")

    request_event_id = models.CharField(max_length=64, primary_key=True)
    position = models.BigIntegerField(unique=True)  # the request's
    version = models.BigIntegerField()
    vm = models.ForeignKey(
        VirtualMachine, on_delete=models.DO_NOTHING, db_constraint=False, related_name="tasks"
    )
    verb = models.CharField(max_length=32)
    kind = models.CharField(max_length=8)  # "request" (the worker's) or "guest" (exec, files)
    actor = models.CharField(max_length=150)
    actor_type = models.CharField(max_length=16)
    actor_id = models.CharField(max_length=64, blank=True)
    channel = models.CharField(max_length=16, blank=True)
    requested_at = models.DateTimeField()
    state = models.CharField(max_length=12, default="pending")
    step = models.CharField(max_length=64, blank=True)
    pct = models.PositiveSmallIntegerField(null=True)
    message = models.CharField(max_length=200, blank=True)
    outcome_type = models.CharField(max_length=64, blank=True)
    outcome_position = models.BigIntegerField(null=True)
    error = models.CharField(max_length=500, blank=True)
    finished_at = models.DateTimeField(null=True)

    class Meta:
        ordering = ["-position"]
        indexes = [
            models.Index(fields=["vm", "-position"], name="task_vm_position"),
            models.Index(fields=["state", "-position"], name="task_state_position"),
        ]

    def __str__(self) -> str:
        return f"{self.verb} of {self.vm_id} ({self.state})"

    @property
    def duration_s(self) -> float | None:
        if self.finished_at is None:
            return None
        return round((self.finished_at - self.requested_at).total_seconds(), 3)


# --- Usage history (``vms.usage``) -------------------------------------------------------------
# Operational measurements, not part of the log: the sampler writes them, the roll-up job folds
# and prunes them. Times are epoch seconds (UTC) of the start of a slot, so that bucketing is
# integer arithmetic on PostgreSQL and SQLite alike. The primary key (vm, ts) is the one index a
# query needs: every read is "one VM (or a few), a time range".


class UsageSample(models.Model):
    """One VM's usage over a 10 s slot (the fine tier, kept a day): VMM CPU in % of one core,
    VMM resident memory in bytes, disk and network in bytes per second. A metric that could not
    be read in that slot (the VMM busy with a request, the first sample after a start) is null."""

    pk = models.CompositePrimaryKey("vm_id", "ts")
    # No index of its own: the primary key (vm, ts) starts with it.
    vm = models.ForeignKey(
        VirtualMachine, on_delete=models.CASCADE, related_name="+", db_index=False
    )
    ts = models.BigIntegerField()
    cpu = models.FloatField(null=True)
    mem = models.FloatField(null=True)
    disk_read = models.FloatField(null=True)
    disk_write = models.FloatField(null=True)
    net_rx = models.FloatField(null=True)
    net_tx = models.FloatField(null=True)

    def __str__(self) -> str:
        return f"usage of {self.vm_id} at {self.ts}"


class UsageRollup(models.Model):
    """A coarser slot folded from the finer tier: per metric the sum and the count of the
    samples that had it, and their maximum, so an average over any union of slots is
    sum(sum) / sum(count) and a maximum is max(max), both exact."""

    pk = models.CompositePrimaryKey("vm_id", "ts")
    # No index of its own: the primary key (vm, ts) starts with it.
    vm = models.ForeignKey(
        VirtualMachine, on_delete=models.CASCADE, related_name="+", db_index=False
    )
    ts = models.BigIntegerField()
    cpu_sum = models.FloatField(default=0.0)
    cpu_count = models.IntegerField(default=0)
    cpu_max = models.FloatField(null=True)
    mem_sum = models.FloatField(default=0.0)
    mem_count = models.IntegerField(default=0)
    mem_max = models.FloatField(null=True)
    disk_read_sum = models.FloatField(default=0.0)
    disk_read_count = models.IntegerField(default=0)
    disk_read_max = models.FloatField(null=True)
    disk_write_sum = models.FloatField(default=0.0)
    disk_write_count = models.IntegerField(default=0)
    disk_write_max = models.FloatField(null=True)
    net_rx_sum = models.FloatField(default=0.0)
    net_rx_count = models.IntegerField(default=0)
    net_rx_max = models.FloatField(null=True)
    net_tx_sum = models.FloatField(default=0.0)
    net_tx_count = models.IntegerField(default=0)
    net_tx_max = models.FloatField(null=True)

    class Meta:
        abstract = True

    def __str__(self) -> str:
        return f"usage of {self.vm_id} at {self.ts}"


class UsageMinute(UsageRollup):
    """1 min slots, kept a week."""


class UsageHour(UsageRollup):
    """1 h slots, kept a year."""


class UsageRollupState(models.Model):
    """How far each coarse tier has been folded: every slot before ``until`` (epoch seconds) is
    in the tier. Written in the same transaction as the rows it covers, so a fold runs once."""

    tier = models.CharField(max_length=16, primary_key=True)
    until = models.BigIntegerField()

    def __str__(self) -> str:
        return f"{self.tier} folded until {self.until}"


class UsageCounter(models.Model):
    """The cumulative counters of a VM at its last sample, whichever worker process took it, so
    the next sample's rates cover the time between them (a restarted VMM resets its counters:
    a counter that went down gives no rate for that slot)."""

    vm = models.OneToOneField(
        VirtualMachine, primary_key=True, on_delete=models.CASCADE, related_name="+"
    )
    at = models.FloatField()  # epoch seconds of the sample
    pid = models.IntegerField(null=True)
    cpu_seconds = models.FloatField(null=True)
    disk_read_bytes = models.BigIntegerField(null=True)
    disk_write_bytes = models.BigIntegerField(null=True)
    net_rx_bytes = models.BigIntegerField(null=True)
    net_tx_bytes = models.BigIntegerField(null=True)

    def __str__(self) -> str:
        return f"counters of {self.vm_id}"


class AgentCredential(models.Model):
    """The credential a VM's guest agent wants (``vms.agent.credentials``), encrypted at rest
    under the secrets store's keys (AES-256-GCM, bound to its holder), one per VM and one per
    snapshot (the credential its saved guest has, so a restore can talk to it).

    Not a projection of the log: no event holds the value, not even encrypted. Written only by
    ``vms.agent.credentials``."""

    # "vm:<uuid>" or "snapshot:<uuid>": what holds the credential.
    holder = models.CharField(max_length=64, unique=True)
    key_id = models.CharField(max_length=32, db_index=True)
    nonce = models.BinaryField(max_length=12)
    ciphertext = models.BinaryField()
    created_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"agent credential of {self.holder}"

    @property
    def aad(self) -> bytes:
        """What the ciphertext is bound to: a copy on another row does not decrypt."""
        return f"agent-credential:{self.holder}".encode()


class PoolMember(models.Model):
    """A VM of a template's warm pool (``vms.pools``), as the log says: restored from the
    template's saved state on ``host`` and kept paused (or running), owned by nobody, until a
    create hands it out. Its id is the id the VM it becomes will have (its runtime directory,
    data disk and agent credential are keyed by it already). Not a ``VirtualMachine``: users'
    lists and quotas never see it. Handed out or evicted, its row goes (the log keeps it)."""

    class State(models.TextChoices):
        WARMING = "warming"
        READY = "ready"

    id = models.UUIDField(primary_key=True)
    template = models.CharField(max_length=63, db_index=True)
    host = models.CharField(max_length=100)
    state = models.CharField(max_length=8, choices=State.choices)
    vcpus = models.PositiveSmallIntegerField()
    memory_mib = models.PositiveIntegerField()
    disk_mib = models.PositiveIntegerField()
    # The guest image it was restored on (vms.images): a member of an older image is evicted.
    image_id = models.CharField(max_length=64, blank=True)
    paused = models.BooleanField(default=True)
    created_at = models.DateTimeField()
    ready_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["created_at"]
        indexes = [models.Index(fields=["template", "host", "state"])]

    def __str__(self) -> str:
        return f"{self.template} pool member {self.pk} ({self.state})"


class PoolTarget(models.Model):
    """A template's pool target set by an administrator (``pool.target_set``); a template
    without a row has the target of ``SANDBOX_POOLS`` (zero when it names none)."""

    template = models.CharField(max_length=63, primary_key=True)
    target = models.PositiveIntegerField()
    set_by = models.CharField(max_length=150, blank=True)
    set_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.template}: {self.target}"
