"""Dashboard forms of the VM domain. They parse input only: limits, quotas and state rules are
checked by ``vms.commands``, whose errors the views attach to these forms."""

from __future__ import annotations

import shlex
import uuid
from typing import Any

from django import forms

from vms.models import EGRESS_CHOICES, Template, VMState


def template_choices() -> list[tuple[str, str]]:
    return [
        (t.name, f"{t.name} — {t.vcpus} vCPU, {t.memory_mib} MiB, {t.disk_mib} MiB disk")
        for t in Template.objects.filter(enabled=True)
    ]


class CreateVMForm(forms.Form):
    name = forms.CharField(max_length=63, help_text="letters, digits, '-', '_' or '.'")
    template = forms.ChoiceField(choices=[])
    vcpus = forms.IntegerField(min_value=1, required=False, help_text="empty: the template's")
    memory_mib = forms.IntegerField(min_value=128, required=False, label="Memory (MiB)")
    disk_mib = forms.IntegerField(min_value=64, required=False, label="Disk (MiB)")
    start = forms.BooleanField(required=False, initial=True, label="Start it now")
    timeout_s = forms.IntegerField(
        min_value=0,
        required=False,
        label="Lifetime (seconds)",
        help_text="stopped or destroyed (as its template says) this long after its creation; "
        "empty: the template's, 0: none",
    )
    priority = forms.ChoiceField(
        required=False,
        choices=[("", "the template's"), ("high", "High"), ("normal", "Normal"), ("low", "Low")],
        label="Priority under host pressure",
        help_text="low gives memory back first when the host runs short; high never does",
    )
    secrets = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 3, "spellcheck": "false", "autocomplete": "off"}),
        help_text="one per line: NAME=VARIABLE or NAME=/path/in/guest (a group's: NAME@group=…); "
        "the template's own are given too",
    )

    budget = forms.ChoiceField(
        required=False,
        label="Team budget",
        help_text="the group whose shared budget this VM draws from",
    )

    def __init__(self, *args: Any, budgets: list[str] | None = None, **kwargs: Any) -> None:
        """``budgets``: the names of the user's groups with a team budget (none: no field)."""
        super().__init__(*args, **kwargs)
        self.fields["template"].choices = template_choices()  # type: ignore[attr-defined]
        if not budgets:
            del self.fields["budget"]
        elif len(budgets) == 1:
            self.fields["budget"].choices = [(budgets[0], budgets[0])]  # type: ignore[attr-defined]
        else:
            self.fields["budget"].required = True  # several: the user must choose
            self.fields["budget"].choices = [("", "choose one"), *((b, b) for b in budgets)]  # type: ignore[attr-defined]

    def clean_secrets(self) -> list[dict[str, str]]:
        """References in the API's shape (``secretstore.guests`` checks them further)."""
        refs = []
        for n, line in enumerate(self.cleaned_data["secrets"].splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            name, sep, target = (part.strip() for part in line.partition("="))
            if not sep or not name or not target:
                raise forms.ValidationError(f"line {n}: write NAME=VARIABLE or NAME=/path")
            ref = {"name": name}
            if "@" in name:
                ref["name"], ref["group"] = (part.strip() for part in name.split("@", 1))
            ref["file" if target.startswith("/") else "env"] = target
            refs.append(ref)
        return refs


class ResizeForm(forms.Form):
    vcpus = forms.IntegerField(min_value=1, required=False)
    memory_mib = forms.IntegerField(min_value=128, required=False, label="Memory (MiB)")


class SnapshotForm(forms.Form):
    name = forms.CharField(max_length=63, required=False)


class CloneForm(forms.Form):
    name = forms.CharField(max_length=63)


class LifetimeForm(forms.Form):
    timeout_s = forms.IntegerField(
        min_value=0,
        label="Ends in (seconds)",
        help_text="from now; 0 clears it",
    )


class ForkForm(forms.Form):
    """A fork's count; its range is ``commands.validate_fork_count``'s (SANDBOX_FORK_MAX)."""

    count = forms.IntegerField(label="New VMs", initial=1)


class IdleForm(forms.Form):
    """An idle policy: whole seconds (``commands.validate_idle_timeout`` bounds them), or off."""

    idle_timeout_s = forms.CharField(
        max_length=12,
        label="Pause when idle for (seconds)",
        help_text='"off": never',
    )
    idle_to_disk = forms.BooleanField(
        required=False,
        label="to disk",
        help_text="suspend it to disk and free its memory (restored on the next use)",
    )

    def clean_idle_timeout_s(self) -> int | None:
        value = self.cleaned_data["idle_timeout_s"].strip().lower()
        if value in ("off", "never", "none"):
            return None
        try:
            return int(value)
        except ValueError:
            raise forms.ValidationError('whole seconds, or "off"') from None


class PoolTargetForm(forms.Form):
    """A warm pool's target; its range is ``commands.set_pool_target``'s."""

    target = forms.IntegerField(label="Target")


class StopForm(forms.Form):
    force = forms.BooleanField(required=False)


class ExecForm(forms.Form):
    command = forms.CharField(max_length=65536, help_text="split like a shell would (no shell)")
    timeout = forms.FloatField(min_value=0.1, max_value=600, initial=30, required=False)

    def clean_command(self) -> list[str]:
        try:
            argv = shlex.split(self.cleaned_data["command"])
        except ValueError as exc:
            raise forms.ValidationError(f"cannot split the command: {exc}") from exc
        if not argv:
            raise forms.ValidationError("give a command")
        return argv


# The VM list's sort keys: the query's value -> the column it orders by (name breaks ties).
SORTS = {
    "name": "name", "owner": "owner__username", "state": "state", "template": "template",
    "vcpus": "vcpus", "memory": "memory_mib", "ip": "ip", "since": "state_changed_at",
    "created": "created_at",
}  # fmt: skip


class FilterForm(forms.Form):
    q = forms.CharField(required=False, label="Search", max_length=63)
    state = forms.ChoiceField(
        required=False, choices=[("", "live (not destroyed)"), ("all", "all")] + VMState.choices
    )
    template = forms.CharField(required=False, max_length=63)
    owner = forms.CharField(required=False, max_length=150)
    sort = forms.ChoiceField(
        required=False,
        choices=[("", "newest first")]
        + [
            (f"{d}{k}", f"{k} {'descending' if d else 'ascending'}")
            for k in SORTS
            for d in ("", "-")
        ],
    )
    page = forms.IntegerField(required=False, min_value=1, max_value=10**6)


# What the list's bulk bar may ask of many VMs at once (each VM's own rules still apply).
BULK_VERBS = ("start", "stop", "reboot", "pause", "resume", "destroy")


class BulkForm(forms.Form):
    """A verb for the VMs ticked on the list (``ids``, repeated); ``confirm`` once reviewed."""

    verb = forms.ChoiceField(choices=[(v, v) for v in BULK_VERBS])
    force = forms.BooleanField(required=False, label="Force (stop at once, no shutdown)")
    confirm = forms.BooleanField(required=False)

    MAX = 200

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        raw = self.data.getlist("ids") if hasattr(self.data, "getlist") else []
        if not raw:
            raise forms.ValidationError("tick at least one VM")
        if len(raw) > self.MAX:
            raise forms.ValidationError(f"at most {self.MAX} VMs at once")
        try:
            data["ids"] = list(dict.fromkeys(uuid.UUID(v) for v in raw))
        except ValueError as exc:
            raise forms.ValidationError("not a VM's id") from exc
        return data


class NetworkForm(forms.Form):
    """A network's settings (the networks page, admins). Names, subnets, bridges, overlaps and
    what may change while VMs are on the network are ``vms.commands``' to check."""

    name = forms.CharField(max_length=63, help_text="lowercase letters, digits and '-'")
    subnet = forms.CharField(
        max_length=18, help_text="a private IPv4 network, /16 to /29, e.g. 10.77.0.0/24"
    )
    bridge = forms.CharField(max_length=15, help_text="the bridge's interface name")
    port_min = forms.IntegerField(min_value=1024, max_value=65535, label="Host ports from")
    port_max = forms.IntegerField(min_value=1024, max_value=65535, label="Host ports to")
    default_egress = forms.ChoiceField(
        choices=EGRESS_CHOICES, initial="none", label="Default egress of new VMs"
    )
    isolated = forms.BooleanField(
        required=False, initial=True, label="Isolated (its VMs cannot reach each other)"
    )
    is_default = forms.BooleanField(required=False, label="Default network for new VMs")


class QuotaForm(forms.Form):
    """One level's limits (administrators): a user's quota, a group's quota per member or a
    group's team budget, every resource at once (an empty one: inherit, or no team limit)."""

    LEVELS = [
        ("user", "A user's own quota"),
        ("group", "A group's quota, for each member"),
        ("budget", "A group's team budget, shared"),
    ]
    level = forms.ChoiceField(choices=LEVELS)
    name = forms.CharField(max_length=150, help_text="the user's or the group's name")
    vms = forms.IntegerField(min_value=0, max_value=2_147_483_647, required=False, label="VMs")
    vcpus = forms.IntegerField(min_value=0, max_value=2_147_483_647, required=False, label="vCPUs")
    memory_mib = forms.IntegerField(
        min_value=0, max_value=2_147_483_647, required=False, label="Memory (MiB)"
    )
    disk_mib = forms.IntegerField(
        min_value=0, max_value=2_147_483_647, required=False, label="Disk (MiB)"
    )
    snapshots = forms.IntegerField(
        min_value=0, max_value=2_147_483_647, required=False, label="Snapshots"
    )
