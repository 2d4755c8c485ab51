"""Naming secrets for a VM or an exec: validated, checked against what the caller may use,
recorded by name, owner, version and HMAC, and projected into the VM's read model the same
way when the projection is rebuilt from the log."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured, ValidationError

from accounts.caller import Caller
from audit import projections
from audit.models import Event
from secretstore import commands as secrets
from vms import commands, guest, templates_config
from vms.models import Template, VirtualMachine

VALUE = "vm-ref-value-1234"


def vm_count() -> int:
    return VirtualMachine.objects.count()


@pytest.mark.django_db
@pytest.mark.parametrize(
    "refs",
    [
        "API_KEY",
        [{"name": "API_KEY"}],
        [{"name": "API_KEY", "env": "A", "file": "/x"}],
        [{"name": "API_KEY", "env": "1A"}],
        [{"name": "API_KEY", "file": "relative/path"}],
        [{"name": "API_KEY", "file": "/run/../etc/passwd"}],
        [{"name": "API_KEY", "env": "A"}, {"name": "API_KEY", "env": "A"}],
        [{"name": "API_KEY", "env": "A", "extra": "x"}],
        [{"name": "NOPE", "env": "A"}],
    ],
)
def test_bad_references_are_400_and_create_nothing(make_user, token_client, refs) -> None:
    alice = make_user("operator", "alice")
    secrets.create_secret(Caller.for_user(alice), name="API_KEY", value=VALUE)
    client = token_client(alice)
    before, events = vm_count(), Event.objects.count()
    r = client.post(
        "/api/v1/vms/",
        {"name": "v", "template": "linux-small", "start": False, "secrets": refs},
        format="json",
    )
    assert r.status_code == 400, r.content
    assert "secrets" in r.json(), r.json()
    assert (vm_count(), Event.objects.count()) == (before, events)


@pytest.mark.django_db
def test_another_users_secret_cannot_be_given_to_a_vm(make_user, token_client) -> None:
    alice, bob = make_user("operator", "alice"), make_user("operator", "bob")
    secrets.create_secret(Caller.for_user(alice), name="ALICES", value=VALUE)
    r = token_client(bob).post(
        "/api/v1/vms/",
        {
            "name": "v",
            "template": "linux-small",
            "start": False,
            "secrets": [{"name": "ALICES", "env": "X"}],
        },
        format="json",
    )
    assert r.status_code == 400 and "no such secret" in str(r.json())
    assert vm_count() == 0


@pytest.mark.django_db
def test_a_token_without_use_secret_may_not_give_secrets(make_user, token_client) -> None:
    alice = make_user("operator", "alice")
    secrets.create_secret(Caller.for_user(alice), name="API_KEY", value=VALUE)
    client = token_client(alice, scopes=["vms.add_virtualmachine"])
    body = {"name": "v", "template": "linux-small", "start": False}
    refs = [{"name": "API_KEY", "env": "K"}]
    r = client.post("/api/v1/vms/", {**body, "secrets": refs}, format="json")
    assert r.status_code == 403, r.content
    assert client.post("/api/v1/vms/", body, format="json").status_code == 201


@pytest.mark.django_db
def test_an_exec_naming_a_missing_secret_asks_the_guest_nothing(make_user, make_running_vm) -> None:
    alice = Caller.for_user(make_user("operator", "alice"))
    vm = make_running_vm(alice)
    before = Event.objects.count()
    with pytest.raises(Exception, match="no such secret"):
        guest.run_exec(alice, vm, ["true"], secrets=[{"name": "NOPE", "env": "X"}])
    secrets.create_secret(alice, name="K", value=VALUE)
    with pytest.raises(Exception, match="given by secrets too"):
        guest.run_exec(alice, vm, ["true"], env={"X": "1"}, secrets=[{"name": "K", "env": "X"}])
    assert Event.objects.count() == before + 1  # the secret's creation only


@pytest.mark.django_db
def test_the_vm_records_its_secrets_and_a_rebuild_gives_the_same(make_user) -> None:
    alice = Caller.for_user(make_user("operator", "alice"))
    secrets.create_secret(alice, name="API_KEY", value=VALUE)
    secrets.create_secret(alice, name="SHARED", value=VALUE + "-g", group="operator")
    vm = commands.create(
        alice,
        name="v",
        template="linux-small",
        start_now=False,
        secrets=[
            {"name": "API_KEY", "env": "API_KEY"},
            {"name": "SHARED", "file": "/run/secrets/shared"},
        ],
    ).vm
    row = VirtualMachine.objects.get(pk=vm.pk)
    assert [(s["name"], s["owner"], s["version"]) for s in row.secrets] == [
        ("API_KEY", "user:alice", 1),
        ("SHARED", "group:operator", 1),
    ]
    assert row.secrets_seen == [
        {"name": "API_KEY", "owner": "user:alice"},
        {"name": "SHARED", "owner": "group:operator"},
    ]
    created = Event.objects.get(type="vm.created", aggregate_id=str(vm.pk))
    assert VALUE not in created.data and len(created.payload["secrets"][0]["hmac"]) == 64
    projections.rebuild("vms.state")
    again = VirtualMachine.objects.get(pk=vm.pk)
    assert (again.secrets, again.secrets_seen) == (row.secrets, row.secrets_seen)


@pytest.mark.django_db
def test_a_templates_secrets_are_given_as_the_creator_may_use_them(make_user) -> None:
    """A template names secrets; each VM made from it receives them, resolved for its creator,
    and a create request's own reference wins for the same variable."""
    alice = Caller.for_user(make_user("operator", "alice"))
    bob = Caller.for_user(make_user("operator", "bob"))
    secrets.create_secret(alice, name="REGISTRY", value=VALUE)
    secrets.create_secret(alice, name="OTHER", value=VALUE + "-o")
    Template.objects.filter(name="linux-small").update(
        secrets=[{"name": "REGISTRY", "env": "TOKEN"}, {"name": "REGISTRY", "file": "/run/r"}]
    )
    vm = commands.create(
        alice,
        name="v",
        template="linux-small",
        start_now=False,
        secrets=[{"name": "OTHER", "env": "TOKEN"}],
    ).vm
    given = [(s["name"], s.get("env") or s.get("file")) for s in vm.secrets]
    assert given == [("REGISTRY", "/run/r"), ("OTHER", "TOKEN")]
    # Bob cannot use Alice's secret: the template's reference is refused by name, nothing made.
    before, events = vm_count(), Event.objects.count()
    with pytest.raises(ValidationError) as info:
        commands.create(bob, name="w", template="linux-small", start_now=False)
    assert "template linux-small: REGISTRY" in str(info.value.message_dict["secrets"])
    assert (vm_count(), Event.objects.count()) == (before, events)


def test_templates_from_yaml_have_their_secret_references_checked(tmp_path) -> None:
    path = tmp_path / "t.yaml"
    base = "templates:\n  - {name: t1, boot: linux, vcpus: 1, memory_mib: 256, secrets: %s}\n"
    path.write_text(base % "[{name: TOKEN, env: TOKEN}]")
    assert templates_config.load_yaml(path)[0]["secrets"] == [{"name": "TOKEN", "env": "TOKEN"}]
    path.write_text(base % "[{name: TOKEN, file: ../etc/passwd}]")
    with pytest.raises(ImproperlyConfigured, match="template t1: secrets"):
        templates_config.load_yaml(path)


@pytest.mark.django_db
def test_the_create_page_gives_secrets_by_line_and_shows_errors_inline(make_user, client) -> None:
    alice = make_user("operator", "alice")
    secrets.create_secret(Caller.for_user(alice), name="API_KEY", value=VALUE)
    client.force_login(alice)
    page = client.get("/vms/new/")
    assert b"API_KEY" in page.content and VALUE.encode() not in page.content
    form = {"name": "v", "template": "linux-small", "memory_mib": "", "vcpus": "", "disk_mib": ""}
    r = client.post("/vms/new/", {**form, "secrets": "API_KEY=KEY\nAPI_KEY = /run/k\n"})
    assert r.status_code == 302, r.content.decode()[:2000]
    vm = VirtualMachine.objects.get(name="v")
    assert [(s["name"], s.get("env"), s.get("file")) for s in vm.secrets] == [
        ("API_KEY", "KEY", None),
        ("API_KEY", None, "/run/k"),
    ]
    for bad, says in [("API_KEY", "write NAME=VARIABLE"), ("NOPE=X", "no such secret")]:
        events = Event.objects.count()
        r = client.post("/vms/new/", {**form, "name": "w", "secrets": bad})
        assert r.status_code == 200 and says in r.content.decode()
        assert Event.objects.count() == events and not VirtualMachine.objects.filter(name="w")
