"""A VM's page shows its egress evidence (``net.egress_refused`` and ``net.dns_lookups``, as the
worker's collector appends them through ``commands.record_net_evidence``): one row per period,
newest first, bounded, with the counts; readable by whoever sees the VM, and recorded as part of
the page's one trail read."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.test import Client

from accounts.caller import Caller
from audit.models import Event
from vms import commands, views
from vms.models import VirtualMachine

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _urls(settings: Any) -> None:
    settings.ROOT_URLCONF = "tests.dashboard.urls"


def client_for(user: Any) -> Client:
    c = Client()
    c.force_login(user)
    return c


def _running(owner: Any, name: str = "box") -> VirtualMachine:
    accepted = commands.create(
        Caller.for_user(owner, channel="api"), name=name, template="linux-small"
    )
    assert commands.record_outcome(accepted.request, "vm.started", {"host": "h1"}) is not None
    return VirtualMachine.objects.get(pk=accepted.vm_id)


def _period(vm: VirtualMachine, minute: int, **evidence: Any) -> list[Any]:
    return commands.record_net_evidence(
        str(vm.pk),
        since=f"2026-11-30T10:{minute:02d}:00+00:00",
        until=f"2026-11-30T10:{minute + 1:02d}:00+00:00",
        **evidence,
    )


def _section(html: str) -> str:
    found = re.search(r'<section class="card" id="vm-egress-evidence".*?</section>', html, re.S)
    assert found is not None, "no egress evidence section"
    return found.group(0)


def _rows(section: str) -> list[str]:
    return re.findall(r"<tr data-positions=.*?</tr>", section, re.S)


def test_the_page_shows_each_periods_refusals_and_lookups_with_counts(make_user, settings) -> None:
    settings.SANDBOX_NET_EVIDENCE_MAX_ROWS = 2
    owner = make_user("operator")
    vm = _running(owner)
    _period(vm, 0, lookups_allowed={"pypi.org": 7})
    _period(
        vm,
        1,
        refused=[
            {"dst": "203.0.113.9", "proto": "tcp", "port": 443, "packets": 12},
            {"dst": "198.51.100.7", "proto": "udp", "port": 53, "packets": 3},
            {"dst": "203.0.113.10", "proto": "icmp", "port": None, "packets": 1},
        ],
        lookups_allowed={"example.com": 4},
        lookups_refused={"evil.test": 9, "<b>x</b>.test": 2},
    )
    section = _section(client_for(owner).get(f"/vms/{vm.pk}/").content.decode())
    newest, oldest = _rows(section)
    assert "2026-11-30 10:01:00" in newest and "2026-11-30 10:02:00" in newest
    assert "<code>203.0.113.9</code> tcp/443 × 12" in newest
    assert "<code>198.51.100.7</code> udp/53 × 3" in newest
    # The command kept the two biggest (SANDBOX_NET_EVIDENCE_MAX_ROWS) and counted the rest.
    assert "203.0.113.10" not in newest and "and 1 more not listed" in newest
    assert "<code>example.com</code> × 4" in newest and "<code>evil.test</code> × 9" in newest
    # Names come from the guest's traffic: shown as text, never as markup.
    assert "<code>&lt;b&gt;x&lt;/b&gt;.test</code> × 2" in section and "<b>x</b>" not in section
    assert "<code>pypi.org</code> × 7" in oldest and "10:00:00" in oldest
    assert "pypi.org" not in newest
    positions = [
        e.position for e in Event.objects.filter(type__in=("net.egress_refused", "net.dns_lookups"))
    ]
    assert f'data-positions="{positions[2]} {positions[1]}"' in newest
    assert f'data-positions="{positions[0]}"' in oldest


def test_only_the_last_periods_are_shown_newest_first(make_user, monkeypatch) -> None:
    monkeypatch.setattr(views, "EVIDENCE_PERIODS", 3)
    owner = make_user("operator")
    vm = _running(owner)
    for minute in range(5):
        _period(vm, minute, lookups_refused={f"n{minute}.test": minute + 1})
    section = _section(client_for(owner).get(f"/vms/{vm.pk}/").content.decode())
    shown = [re.search(r"<code>(n\d)\.test</code>", row).group(1) for row in _rows(section)]
    assert shown == ["n4", "n3", "n2"]
    assert "the last 3 periods" in section


def test_whoever_sees_the_vm_reads_its_evidence_and_nobody_else(make_user) -> None:
    owner = make_user("operator")
    vm = _running(owner)
    _period(vm, 0, refused=[{"dst": "192.0.2.1", "proto": "tcp", "port": 22, "packets": 5}])
    for role in ("admin", "viewer", "auditor"):
        page = client_for(make_user(role)).get(f"/vms/{vm.pk}/")
        assert "<code>192.0.2.1</code> tcp/22 × 5" in _section(page.content.decode()), role
    assert client_for(make_user("operator")).get(f"/vms/{vm.pk}/").status_code == 404


def test_the_section_links_to_the_vms_evidence_in_the_trail(make_user) -> None:
    owner = make_user("operator")
    vm = _running(owner)
    auditor = _section(client_for(make_user("auditor")).get(f"/vms/{vm.pk}/").content.decode())
    link = f"/audit/?aggregate_type=vm&amp;aggregate_id={vm.pk}&amp;type=net.egress_refused"
    assert link in auditor
    trail = client_for(make_user("auditor")).get(link.replace("&amp;", "&"))
    assert trail.status_code == 200
    own = _section(client_for(owner).get(f"/vms/{vm.pk}/").content.decode())
    assert "/audit/" not in own and f"/api/v1/vms/{vm.pk}/events/" in own
    assert "No egress evidence recorded" in own


def test_a_vm_without_a_nic_says_so(make_user) -> None:
    owner = make_user("operator")
    vm = _running(owner)
    VirtualMachine.objects.filter(pk=vm.pk).update(network=None, ip=None)
    section = _section(client_for(owner).get(f"/vms/{vm.pk}/").content.decode())
    assert "No network interface: nothing to record." in section


def test_the_pages_one_trail_read_names_the_evidence_shown(make_user, monkeypatch) -> None:
    monkeypatch.setattr(views, "EVIDENCE_PERIODS", 2)
    owner = make_user("operator")
    vm = _running(owner)
    for minute in range(3):
        _period(vm, minute, lookups_allowed={"a.test": 1})
    evidence = list(
        Event.objects.filter(type="net.dns_lookups")
        .order_by("position")
        .values_list("position", flat=True)
    )
    c = client_for(owner)
    before = Event.objects.filter(type="audit.trail_read").count()
    assert c.get(f"/vms/{vm.pk}/").status_code == 200
    reads = Event.objects.filter(type="audit.trail_read").order_by("position")
    assert reads.count() == before + 1
    read = reads.last().payload
    assert read["what"] == "dashboard.vm_timeline" and read["filters"] == {"vm": str(vm.pk)}
    # Every event of the VM is in its timeline (fewer than 100), the evidence among them: each
    # position is named once.
    assert read["returned"] == Event.objects.filter(aggregate_id=str(vm.pk)).count()
    # Evidence older than the timeline's events is named too (here: an empty timeline).
    monkeypatch.setattr(views.live, "vm_timeline", lambda vm, limit: [])
    assert c.get(f"/vms/{vm.pk}/").status_code == 200
    read = Event.objects.filter(type="audit.trail_read").latest("position").payload
    assert (read["returned"], read["first_position"], read["last_position"]) == (
        2,
        evidence[1],
        evidence[2],
    )
