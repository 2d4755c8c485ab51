"""Which VMs an API token reaches follows the token, not only its user: an admin's token scoped to
``vms.exec_vm`` reaches the admin's own VMs only; with ``vms.manage_all_vms`` (to act) or
``vms.view_virtualmachine`` (to see) among its scopes, every user's."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from django.core.exceptions import PermissionDenied
from rest_framework.test import APIClient

from accounts.caller import Caller
from accounts.models import APIToken
from vms import commands, console, guest, policy
from vms.agent.client import ExecResult

pytestmark = pytest.mark.django_db


@pytest.fixture
def world(make_user: Any, make_running_vm: Any) -> dict[str, Any]:
    admin, operator = make_user("admin"), make_user("operator")
    return {
        "admin": admin,
        "theirs": make_running_vm(Caller.for_user(operator, channel="api"), "theirs"),
        "mine": make_running_vm(Caller.for_user(admin, channel="api"), "mine"),
    }


@pytest.fixture
def ran(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    argvs: list[list[str]] = []

    class Agent:
        def exec(self, argv: list[str], **_: Any) -> ExecResult:
            argvs.append(argv)
            return ExecResult(0, b"", b"", False, 0.01, stdout_size=0, stderr_size=0)

    @contextlib.contextmanager
    def session(vm: Any, **_: Any) -> Any:
        yield Agent()

    monkeypatch.setattr(guest, "agent_session", session)
    return argvs


def api(issue_token: Any, user: Any, scopes: list[str]) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {issue_token(user, scopes=scopes)}")
    return client


def test_an_exec_scoped_admin_token_reaches_only_the_admins_own_vms(
    world, issue_token, ran
) -> None:
    client = api(issue_token, world["admin"], ["vms.exec_vm"])
    listed = {vm["name"] for vm in client.get("/api/v1/vms/").json()["results"]}
    assert listed == {"mine"}
    theirs = world["theirs"].pk
    assert client.get(f"/api/v1/vms/{theirs}/").status_code == 404
    refused = client.post(f"/api/v1/vms/{theirs}/exec/", {"argv": ["id"]}, format="json")
    assert refused.status_code == 404
    mine = client.post(f"/api/v1/vms/{world['mine'].pk}/exec/", {"argv": ["id"]}, format="json")
    assert mine.status_code == 200, mine.content
    assert ran == [["id"]]


def test_manage_all_vms_in_the_scopes_reaches_every_users_vms(world, issue_token, ran) -> None:
    client = api(issue_token, world["admin"], ["vms.exec_vm", "vms.manage_all_vms"])
    listed = {vm["name"] for vm in client.get("/api/v1/vms/").json()["results"]}
    assert listed == {"mine", "theirs"}
    theirs = world["theirs"].pk
    done = client.post(f"/api/v1/vms/{theirs}/exec/", {"argv": ["id"]}, format="json")
    assert done.status_code == 200, done.content
    assert ran == [["id"]]


def test_a_view_scoped_token_sees_every_vm_but_acts_on_none_of_theirs(world, issue_token) -> None:
    client = api(issue_token, world["admin"], ["vms.view_virtualmachine", "vms.operate_vm"])
    listed = {vm["name"] for vm in client.get("/api/v1/vms/").json()["results"]}
    assert listed == {"mine", "theirs"}
    refused = client.post(f"/api/v1/vms/{world['theirs'].pk}/stop/")
    assert refused.status_code == 403, refused.content


def test_an_unscoped_admin_token_still_reaches_every_vm(world, issue_token) -> None:
    client = api(issue_token, world["admin"], [])
    listed = {vm["name"] for vm in client.get("/api/v1/vms/").json()["results"]}
    assert listed == {"mine", "theirs"}


def test_commands_ask_the_caller_not_the_user(world) -> None:
    token = APIToken(user=world["admin"], scopes=["vms.operate_vm", "vms.view_virtualmachine"])
    scoped = Caller(user=world["admin"], token=token)
    assert policy.sees_all_vms(scoped)
    assert not policy.may_act_on(scoped, world["theirs"].owner_id)
    with pytest.raises(PermissionDenied):
        commands.stop(scoped, world["theirs"])
    widened = Caller(
        user=world["admin"], token=APIToken(scopes=[*token.scopes, "vms.manage_all_vms"])
    )
    assert policy.may_act_on(widened, world["theirs"].owner_id)


def test_a_console_scoped_admin_token_does_not_type_into_other_users_consoles(world) -> None:
    token = APIToken(user=world["admin"], scopes=["vms.console_vm"])
    assert console.access_for(world["admin"], world["theirs"].pk, token) is None
    assert console.access_for(world["admin"], world["mine"].pk, token).mode == "write"
    viewer = APIToken(user=world["admin"], scopes=["vms.console_vm", "vms.view_virtualmachine"])
    assert console.access_for(world["admin"], world["theirs"].pk, viewer).mode == "read"
    # Without a token (the dashboard), the admin's role decides.
    assert console.access_for(world["admin"], world["theirs"].pk).mode == "write"


def test_a_scoped_token_reads_the_requests_of_its_own_reach_only(world, issue_token) -> None:
    theirs = commands.stop(
        Caller.for_user(world["theirs"].owner, channel="api"), world["theirs"]
    ).request
    url = f"/api/v1/requests/{theirs.event_id}/"
    assert api(issue_token, world["admin"], ["vms.exec_vm"]).get(url).status_code == 404
    wider = api(issue_token, world["admin"], ["vms.exec_vm", "vms.manage_all_vms"])
    assert wider.get(url).json()["request"]["type"] == "vm.stop_requested"
