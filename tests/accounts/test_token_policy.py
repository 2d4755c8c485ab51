"""What an API token may do: its read-only flag and scopes hold on every endpoint, whatever the
view's own permissions, and a token issued by a token never exceeds it (issue 10, items 1, 2, 11).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.utils import timezone
from rest_framework.test import APIClient

from accounts import commands
from accounts.models import APIToken, User
from audit.actor import Actor
from audit.models import Event

pytestmark = pytest.mark.django_db


def changes() -> int:
    """Events other than refused token uses (which are recorded: see the test of that)."""
    return Event.objects.exclude(type="auth.token_rejected").count()


SHELL = Actor.system(channel="shell", name="tests")


def bearer(token: str, addr: str = "127.0.0.1") -> APIClient:
    client = APIClient(REMOTE_ADDR=addr)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


def row(token: str) -> APIToken:
    return APIToken.objects.get(key=token.split("_")[1])


@pytest.fixture
def admin(make_user) -> Any:
    return make_user("admin", "root")


# --- Item 1: a read-only token reads, everywhere ------------------------------------------


def test_read_only_token_cannot_create_users_or_change_roles(admin, make_user, issue_token):
    client = bearer(issue_token(admin, read_only=True))
    victim = make_user("viewer", "victim")
    before = changes()
    created = client.post(
        "/api/v1/users/", {"username": "mallory", "role": "admin", "password": "x" * 12}
    )
    assert created.status_code == 403
    assert not User.objects.filter(username="mallory").exists()
    changed = client.post(f"/api/v1/users/{victim.pk}/role/", {"role": "admin"}, format="json")
    assert changed.status_code == 403
    assert User.objects.get(pk=victim.pk).role == "viewer"
    assert changes() == before
    assert client.get("/api/v1/users/").status_code == 200  # reading is what it is for


@pytest.mark.parametrize(
    "url",
    [
        "/api/v1/events/verify/",
        "/api/v1/audit/digests/",
        "/api/v1/audit/bundles/",
        "/api/v1/audit/reports/",
        "/api/v1/audit/archives/",
    ],
)
def test_read_only_token_cannot_write_to_the_audit_endpoints(admin, issue_token, url):
    client = bearer(issue_token(admin, read_only=True))
    before = changes()
    response = client.post(url, {}, format="json")
    assert response.status_code == 403
    assert response.json()["detail"] == "This API token is read-only."
    assert changes() == before


def test_a_view_with_its_own_permission_classes_keeps_the_token_limits(admin, issue_token):
    """A view that allows anyone (its own permission_classes) still refuses a read-only
    token's write and a scoped token's call outside its scope."""
    from rest_framework.permissions import AllowAny
    from rest_framework.response import Response
    from rest_framework.test import APIRequestFactory
    from rest_framework.views import APIView

    from accounts.scopes import needs

    class Open(APIView):
        permission_classes = [AllowAny]
        token_scopes = {"post": needs("vms.add_virtualmachine")}

        def post(self, request: Any) -> Response:
            return Response({"wrote": True}, status=201)

    class Undeclared(APIView):
        permission_classes = [AllowAny]

        def post(self, request: Any) -> Response:
            return Response({"wrote": True}, status=201)

    factory = APIRequestFactory()

    def post(view: Any, token: str) -> Any:
        request = factory.post("/x/", {}, HTTP_AUTHORIZATION=f"Bearer {token}")
        return view.as_view()(request)

    assert post(Open, issue_token(admin)).status_code == 201
    assert post(Open, issue_token(admin, read_only=True)).status_code == 403
    assert post(Open, issue_token(admin, scopes=["vms.exec_vm"])).status_code == 403
    assert post(Open, issue_token(admin, scopes=["vms.add_virtualmachine"])).status_code == 201
    # A view that states no scope: refused to every scoped token, fail closed.
    assert (
        post(Undeclared, issue_token(admin, scopes=["vms.add_virtualmachine"])).status_code == 403
    )
    assert post(Undeclared, issue_token(admin)).status_code == 201


def test_refused_token_uses_are_recorded_once_a_minute(admin, issue_token):
    read_only, scoped = (
        issue_token(admin, read_only=True),
        issue_token(admin, scopes=["vms.exec_vm"]),
    )
    for _ in range(3):
        assert bearer(read_only).post("/api/v1/events/verify/").status_code == 403
        assert bearer(scoped).get("/api/v1/events/").status_code == 403
    rejected = Event.objects.filter(type="auth.token_rejected").order_by("position")
    assert [(e.payload["token_id"], e.payload["reason"]) for e in rejected] == [
        (row(read_only).key, "read_only"),
        (row(scoped).key, "out_of_scope"),
    ]


# --- Item 2: scopes hold on every endpoint -------------------------------------------------


def test_exec_scoped_token_cannot_issue_tokens(make_user, issue_token):
    user = make_user("operator")
    client = bearer(issue_token(user, scopes=["vms.exec_vm"]))
    before = APIToken.objects.count()
    response = client.post("/api/v1/tokens/", {"name": "wider"}, format="json")
    assert response.status_code == 403
    assert APIToken.objects.count() == before
    assert client.post("/api/v1/vms/", {"name": "x"}, format="json").status_code == 403


def test_admin_token_scoped_to_exec_is_limited_to_exec(admin, make_user, issue_token):
    other = make_user("operator", "other")
    theirs = row(issue_token(other))
    client = bearer(issue_token(admin, scopes=["vms.exec_vm"]))
    before = changes()
    assert client.post("/api/v1/users/", {"username": "u2", "role": "admin"}).status_code == 403
    assert client.get("/api/v1/users/").status_code == 403
    assert client.get("/api/v1/events/").status_code == 403
    assert client.delete(f"/api/v1/tokens/{theirs.pk}/").status_code == 403
    assert client.post("/api/v1/audit/bundles/", {}, format="json").status_code == 403
    assert client.get("/api/v1/audit/exports/").status_code == 403
    assert APIToken.objects.get(pk=theirs.pk).revoked_at is None
    assert changes() == before
    # What the scope is for still works: the VMs it may exec in are visible.
    assert client.get("/api/v1/vms/").status_code == 200


def test_token_scoped_to_manage_own_tokens_does_not_see_other_users_tokens(
    admin, make_user, issue_token
):
    issue_token(make_user("operator", "someone"))
    listing = bearer(issue_token(admin, scopes=["accounts.view_apitoken"])).get("/api/v1/tokens/")
    assert listing.status_code == 200
    assert {t["username"] for t in listing.json()["results"]} == {"root"}
    unscoped = bearer(issue_token(admin)).get("/api/v1/tokens/").json()
    assert {t["username"] for t in unscoped["results"]} == {"root", "someone"}


def test_scopes_name_known_permissions_the_user_holds(make_user):
    client = APIClient()
    client.force_login(make_user("operator"))
    bad = client.post("/api/v1/tokens/", {"name": "x", "scopes": ["vms.nonsense"]}, format="json")
    assert bad.status_code == 400 and "scopes" in bad.json()
    beyond = client.post(
        "/api/v1/tokens/", {"name": "x", "scopes": ["audit.view_audit_trail"]}, format="json"
    )
    assert beyond.status_code == 400 and "scopes" in beyond.json()
    own = client.post(
        "/api/v1/tokens/",
        {"name": "x", "scopes": ["vms.exec_vm", "accounts.add_apitoken"]},
        format="json",
    )
    assert own.status_code == 201, own.json()


# --- A token issued by a token never exceeds it -------------------------------------------


def issue_with(token: str, addr: str = "127.0.0.1", **payload: Any) -> Any:
    payload.setdefault("name", "child")
    return bearer(token, addr).post("/api/v1/tokens/", payload, format="json")


def test_child_of_a_scoped_token_inherits_or_narrows_its_scopes(make_user, issue_token):
    user = make_user("operator")
    parent = issue_token(user, scopes=["accounts.add_apitoken", "vms.exec_vm"])
    inherited = issue_with(parent)
    assert inherited.status_code == 201, inherited.json()
    assert inherited.json()["detail"]["scopes"] == ["accounts.add_apitoken", "vms.exec_vm"]
    # The child cannot create VMs either: no unscoped token comes out of a scoped one.
    child = bearer(inherited.json()["token"])
    assert child.post("/api/v1/vms/", {"name": "x"}, format="json").status_code == 403
    narrower = issue_with(parent, scopes=["vms.exec_vm"])
    assert narrower.status_code == 201 and narrower.json()["detail"]["scopes"] == ["vms.exec_vm"]
    wider = issue_with(parent, scopes=["vms.exec_vm", "vms.add_virtualmachine"])
    assert wider.status_code == 400 and "scopes" in wider.json()


def test_child_expires_no_later_than_its_parent(make_user, issue_token):
    user = make_user("operator")
    parent = issue_token(user, expires_days=5)
    later = issue_with(parent, expires_days=30)
    assert later.status_code == 400 and "expires_days" in later.json()
    default = issue_with(parent)
    assert default.status_code == 201
    assert row(default.json()["token"]).expires_at == row(parent).expires_at
    sooner = issue_with(parent, expires_days=2)
    assert sooner.status_code == 201
    assert row(sooner.json()["token"]).expires_at < row(parent).expires_at


def test_child_of_an_ip_restricted_token_stays_inside_its_networks(make_user, issue_token):
    user = make_user("operator")
    parent = issue_token(user, allowed_ips=["10.0.0.0/8"])
    outside = issue_with(parent, addr="10.1.2.3", allowed_ips=["192.168.0.0/16"])
    assert outside.status_code == 400 and "allowed_ips" in outside.json()
    everywhere = issue_with(parent, addr="10.1.2.3", allowed_ips=["0.0.0.0/0"])
    assert everywhere.status_code == 400
    inside = issue_with(parent, addr="10.1.2.3", allowed_ips=["10.5.0.0/16"])
    assert inside.status_code == 201 and inside.json()["detail"]["allowed_ips"] == ["10.5.0.0/16"]


def test_read_only_token_cannot_issue_tokens_even_through_the_command(make_user, issue_token):
    user = make_user("operator")
    parent = row(issue_token(user, read_only=True))
    with pytest.raises(PermissionDenied):
        commands.create_token(SHELL, user, name="x", by=user, parent=parent)
    assert issue_with(issue_token(user, read_only=True), read_only=True).status_code == 403


def test_the_issuing_token_is_recorded(make_user, issue_token):
    user = make_user("operator")
    parent = issue_token(user)
    assert issue_with(parent).status_code == 201
    created = Event.objects.filter(type="token.created").order_by("-position").first()
    assert created is not None and created.payload["issued_by_token"] == row(parent).key


# --- Item 11: no way around the token limits ----------------------------------------------


def test_null_expiry_is_refused_through_the_api(make_user, issue_token):
    user = make_user("operator")
    client = APIClient()
    client.force_login(user)
    with_token = bearer(issue_token(user))
    before = changes()
    for c in (client, with_token):
        response = c.post("/api/v1/tokens/", {"name": "x", "expires_days": None}, format="json")
        assert response.status_code == 400 and "expires_days" in response.json()
    assert not APIToken.objects.filter(expires_at__isnull=True).exists()
    assert Event.objects.filter(type="token.created").count() == 1  # the issuing one only
    assert changes() == before


def test_left_out_expiry_gets_the_default(make_user):
    client = APIClient()
    client.force_login(make_user("operator"))
    response = client.post("/api/v1/tokens/", {"name": "x"}, format="json")
    assert response.status_code == 201
    expires = row(response.json()["token"]).expires_at
    assert expires is not None
    assert timedelta(days=89) < expires - timezone.now() <= timedelta(days=90)


def test_users_cannot_make_never_expiring_tokens_through_any_front_end(make_user):
    user = make_user("operator")
    with pytest.raises(ValidationError):
        commands.create_token(SHELL, user, name="x", expires_days=None, by=user)
    client = APIClient()
    client.force_login(user)
    page = client.post("/accounts/tokens/", {"name": "dash", "expires_days": ""})
    assert page.status_code == 200
    assert not APIToken.objects.filter(name="dash").exists()
    # The shell (the host's operator) still can.
    assert (
        commands.create_token(SHELL, user, name="cli", expires_days=None).token.expires_at is None
    )


def test_ip_restricted_token_cannot_issue_an_unrestricted_one(make_user, issue_token):
    user = make_user("operator")
    parent = issue_token(user, allowed_ips=["10.0.0.0/8"])
    response = issue_with(parent, addr="10.1.2.3", allowed_ips=[])
    assert response.status_code == 201
    child = response.json()["token"]
    assert row(child).allowed_ips == ["10.0.0.0/8"]
    assert bearer(child, "192.0.2.1").get("/api/v1/me/").status_code == 401
    assert bearer(child, "10.9.9.9").get("/api/v1/me/").status_code == 200


def test_schema_states_the_expiry_rules() -> None:
    from drf_spectacular.generators import SchemaGenerator

    schema = SchemaGenerator().get_schema(request=None, public=True)
    field = schema["components"]["schemas"]["TokenCreate"]["properties"]["expires_days"]
    assert field.get("nullable") is not True
    assert field["maximum"] == 365 and field["minimum"] == 1
    assert "null is refused" in field["description"]


def test_shell_issues_scoped_tokens_and_refuses_unknown_scopes(make_user) -> None:
    import io

    from django.core.management import CommandError, call_command

    make_user("operator", "opal")
    out, err = io.StringIO(), io.StringIO()
    call_command("create_token", "opal", "--scope", "vms.exec_vm", stdout=out, stderr=err)
    assert row(out.getvalue().strip()).scopes == ["vms.exec_vm"]
    assert "scopes vms.exec_vm" in err.getvalue()
    with pytest.raises(CommandError, match="does not hold"):
        call_command("create_token", "opal", "--scope", "audit.view_audit_trail", stdout=out)


def test_an_allowed_address_with_a_zone_is_refused(make_user, issue_token):
    """A zone ("%eth0") names one host's interface; forwarded client addresses never carry one,
    so such an entry is refused (400), nothing issued."""
    user = make_user("operator")
    client = bearer(issue_token(user))
    before = APIToken.objects.count()
    for entry in ("fe80::1%eth0", "fe80::%1/64"):
        response = client.post(
            "/api/v1/tokens/", {"name": "zoned", "allowed_ips": [entry]}, format="json"
        )
        assert response.status_code == 400, response.content
        assert "zone" in str(response.json()["allowed_ips"])
    assert APIToken.objects.count() == before
    with pytest.raises(ValidationError):
        commands.create_token(SHELL, user, name="zoned", allowed_ips=["fe80::1%eth0"])
