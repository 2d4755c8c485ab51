"""Making shareable preview links: the API endpoint, the dashboard form, the recorded event, and
the grants themselves (signature, salt, expiry)."""

from __future__ import annotations

import io
import json
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from django.test import Client

from audit import projections
from audit.models import Event
from vms import previews
from vms.models import PreviewLink, VirtualMachine


@pytest.fixture
def owner(make_user: Any) -> Any:
    return make_user("operator")


@pytest.fixture
def vm(owner: Any, db: Any) -> Any:
    from accounts.caller import Caller
    from vms import commands

    caller = Caller.for_user(owner, channel="api")
    return commands.create(caller, name="web", template="linux-small", start_now=False).vm


def post_link(client: Any, vm: Any, **body: Any) -> Any:
    return client.post(f"/api/v1/vms/{vm.pk}/previews/", body, format="json")


def test_the_owner_makes_a_link_and_it_is_recorded(token_client, owner, vm, settings):
    response = post_link(token_client(owner), vm, port=8080, expires_in=120)
    assert response.status_code == 201, response.content
    body = response.json()
    url = urlsplit(body["url"])
    assert url.hostname == f"8080-{vm.pk}.{settings.SANDBOX_PREVIEW_DOMAIN}"
    grant = previews.from_url(parse_qs(url.query)[previews.QUERY_PARAM][0])
    assert grant is not None
    assert (grant.vm_id, grant.port, grant.user_id, grant.kind) == (vm.pk, 8080, owner.pk, "link")
    assert 110 <= grant.seconds_left <= 120
    event = Event.objects.get(type="vm.preview_link_created", aggregate_id=str(vm.pk))
    data = event.data if isinstance(event.data, dict) else json.loads(event.data)
    assert data == {"link_id": body["link_id"], "port": 8080, "expires": grant.expires}
    assert event.actor_id == str(owner.pk)
    # The signed value is the credential: it is not in the log.
    assert parse_qs(url.query)[previews.QUERY_PARAM][0] not in json.dumps(data)


def test_the_default_lifetime_applies(token_client, owner, vm, settings):
    settings.SANDBOX_PREVIEW_LINK_DEFAULT_S = 300
    body = post_link(token_client(owner), vm, port=3000).json()
    grant = previews.from_url(parse_qs(urlsplit(body["url"]).query)[previews.QUERY_PARAM][0])
    assert grant is not None and 290 <= grant.seconds_left <= 300


def test_a_viewer_may_not_share(token_client, make_user, vm):
    response = post_link(token_client(make_user("viewer")), vm, port=8080)
    assert response.status_code == 403
    assert not Event.objects.filter(type="vm.preview_link_created").exists()


def test_another_operator_does_not_find_the_vm(token_client, make_user, vm):
    assert post_link(token_client(make_user("operator")), vm, port=8080).status_code == 404


def test_an_admin_may_share_anyones(token_client, make_user, vm):
    assert post_link(token_client(make_user("admin")), vm, port=8080).status_code == 201


@pytest.mark.parametrize(
    "body",
    [{"port": 0}, {"port": 65536}, {"port": "x"}, {}, {"port": 8080, "expires_in": 0}],
)
def test_bad_requests_are_400(token_client, owner, vm, body):
    assert post_link(token_client(owner), vm, **body).status_code == 400


def test_the_lifetime_is_bounded(token_client, owner, vm, settings):
    settings.SANDBOX_PREVIEW_LINK_MAX_S = 600
    assert post_link(token_client(owner), vm, port=80, expires_in=601).status_code == 400
    assert post_link(token_client(owner), vm, port=80, expires_in=600).status_code == 201


def test_a_denied_port_is_400(token_client, owner, vm, settings):
    settings.SANDBOX_PREVIEW_DENIED_PORTS = frozenset({22})
    assert post_link(token_client(owner), vm, port=22).status_code == 400


def test_a_read_only_or_unscoped_token_may_not_share(token_client, owner, vm):
    assert post_link(token_client(owner, read_only=True), vm, port=80).status_code == 403
    scoped = token_client(owner, scopes=["vms.exec_vm"])
    assert post_link(scoped, vm, port=80).status_code == 403


def test_a_destroyed_vm_gets_no_link(token_client, owner, vm):
    VirtualMachine.objects.filter(pk=vm.pk).update(state="destroyed")
    assert post_link(token_client(owner), vm, port=80).status_code == 404


def test_previews_off_means_no_links(token_client, owner, vm, settings):
    settings.SANDBOX_PREVIEW_DOMAIN = ""
    assert post_link(token_client(owner), vm, port=80).status_code == 404


def _revoked_events(vm: Any) -> list[dict[str, Any]]:
    events = Event.objects.filter(type="vm.preview_link_revoked", aggregate_id=str(vm.pk))
    return [e.data if isinstance(e.data, dict) else json.loads(e.data) for e in events]


def test_links_are_listed_without_their_signed_values(token_client, owner, vm, make_user):
    client = token_client(owner)
    made = [post_link(client, vm, port=p, expires_in=600).json() for p in (8080, 3000)]
    for reader in (client, token_client(make_user("viewer"))):
        response = reader.get(f"/api/v1/vms/{vm.pk}/previews/")
        assert response.status_code == 200
        listed = response.json()
        assert {(x["link_id"], x["port"], x["open"]) for x in listed} == {
            (m["link_id"], m["port"], True) for m in made
        }
        assert all(x["created_by"] == owner.username and x["revoked_at"] is None for x in listed)
        for m in made:  # the credential is not in the listing
            assert parse_qs(urlsplit(m["url"]).query)[previews.QUERY_PARAM][0] not in str(listed)
    assert (
        token_client(make_user("operator")).get(f"/api/v1/vms/{vm.pk}/previews/").status_code == 404
    )


def test_a_link_is_revoked_once_and_recorded(token_client, owner, vm):
    client = token_client(owner)
    link_id = post_link(client, vm, port=8080, expires_in=600).json()["link_id"]
    response = client.delete(f"/api/v1/vms/{vm.pk}/previews/{link_id}/")
    assert response.status_code == 200 and response.json() == {"revoked": [link_id]}
    assert _revoked_events(vm) == [{"link_ids": [link_id]}]
    (listed,) = client.get(f"/api/v1/vms/{vm.pk}/previews/").json()
    assert listed["open"] is False and listed["revoked_by"] == owner.username
    # Again: refused, nothing appended; an unknown link is 404.
    assert client.delete(f"/api/v1/vms/{vm.pk}/previews/{link_id}/").status_code == 400
    assert client.delete(f"/api/v1/vms/{vm.pk}/previews/nosuchlink/").status_code == 404
    assert len(_revoked_events(vm)) == 1


def test_revoking_all_takes_only_the_open_links(token_client, owner, vm, settings):
    client = token_client(owner)
    ids = [post_link(client, vm, port=p, expires_in=600).json()["link_id"] for p in (80, 81, 82)]
    client.delete(f"/api/v1/vms/{vm.pk}/previews/{ids[0]}/")
    response = client.delete(f"/api/v1/vms/{vm.pk}/previews/")
    assert response.status_code == 200 and response.json() == {"revoked": sorted(ids[1:])}
    # Nothing left open: nothing revoked, nothing recorded.
    assert client.delete(f"/api/v1/vms/{vm.pk}/previews/").json() == {"revoked": []}
    assert [e["link_ids"] for e in _revoked_events(vm)] == [[ids[0]], sorted(ids[1:])]


def test_who_may_revoke(token_client, owner, vm, make_user):
    link_id = post_link(token_client(owner), vm, port=8080).json()["link_id"]
    url = f"/api/v1/vms/{vm.pk}/previews/{link_id}/"
    assert token_client(make_user("viewer")).delete(url).status_code == 403
    assert token_client(owner, read_only=True).delete(url).status_code == 403
    assert token_client(make_user("operator")).delete(url).status_code == 404
    assert not _revoked_events(vm)
    assert token_client(make_user("admin")).delete(url).status_code == 200


def test_a_rebuild_keeps_links_and_their_revocations(token_client, owner, vm):
    client = token_client(owner)
    ids = [post_link(client, vm, port=p, expires_in=600).json()["link_id"] for p in (80, 81)]
    client.delete(f"/api/v1/vms/{vm.pk}/previews/{ids[0]}/")
    before = list(PreviewLink.objects.order_by("link_id").values())
    projections.rebuild("vms.preview_links")
    assert list(PreviewLink.objects.order_by("link_id").values()) == before


def test_the_dashboard_form_makes_a_recorded_link(owner, vm):
    client = Client()
    client.force_login(owner)
    response = client.post(
        f"/vms/{vm.pk}/preview/", {"port": "8080", "expires_in": "60"}, follow=True
    )
    assert response.status_code == 200
    assert f"8080-{vm.pk}." in response.content.decode()
    assert (
        Event.objects.filter(type="vm.preview_link_created", aggregate_id=str(vm.pk)).count() == 1
    )
    # Opening (the hand-off) is viewing: not recorded.
    assert client.get(f"/vms/{vm.pk}/preview/?port=8080").status_code == 302
    assert client.get(f"/vms/{vm.pk}/preview/8080/").status_code == 302
    assert Event.objects.filter(type="vm.preview_link_created").count() == 1


def test_the_dashboard_refuses_a_viewer_a_link_but_lets_it_open(make_user, vm):
    client = Client()
    client.force_login(make_user("viewer"))
    response = client.post(f"/vms/{vm.pk}/preview/", {"port": "8080"}, follow=True)
    assert "No link made" in response.content.decode()
    assert not Event.objects.filter(type="vm.preview_link_created").exists()
    assert client.get(f"/vms/{vm.pk}/preview/8080/").status_code == 302


def test_the_detail_page_offers_the_preview_forms(owner, vm):
    client = Client()
    client.force_login(owner)
    page = client.get(f"/vms/{vm.pk}/").content.decode()
    assert f"/vms/{vm.pk}/preview/" in page and "Make a shareable link" in page


def test_the_detail_page_lists_open_links_and_revokes_them(owner, vm, make_user, token_client):
    ids = [
        post_link(token_client(owner), vm, port=p, expires_in=600).json()["link_id"]
        for p in (8080, 8081, 8082)
    ]
    client = Client()
    client.force_login(owner)
    page = client.get(f"/vms/{vm.pk}/").content.decode()
    assert all(link_id in page for link_id in ids) and "Revoke all links" in page
    response = client.post(f"/vms/{vm.pk}/preview/revoke/", {"link_id": ids[0]}, follow=True)
    assert f"Revoked 1 preview link(s): {ids[0]}" in response.content.decode()
    assert ids[0] not in client.get(f"/vms/{vm.pk}/").content.decode()  # no longer open
    response = client.post(f"/vms/{vm.pk}/preview/revoke/", {}, follow=True)
    assert "Revoked 2 preview link(s)" in response.content.decode()
    assert [e["link_ids"] for e in _revoked_events(vm)] == [[ids[0]], sorted(ids[1:])]
    # A viewer sees no revoke button, and its POST revokes nothing.
    more = post_link(token_client(owner), vm, port=9000).json()["link_id"]
    viewer = Client()
    viewer.force_login(make_user("viewer"))
    page = viewer.get(f"/vms/{vm.pk}/").content.decode()
    assert more in page and "preview/revoke/" not in page
    response = viewer.post(f"/vms/{vm.pk}/preview/revoke/", {"link_id": more}, follow=True)
    assert "Nothing revoked" in response.content.decode()
    assert len(_revoked_events(vm)) == 2


# --- Grants -----------------------------------------------------------------------------------


def test_a_grant_round_trips_per_salt_only(vm, owner):
    grant = previews.issue(vm, 8080, owner.pk, previews.LINK, 60)
    assert previews.from_url(previews.url_value(grant)) == grant
    assert previews.from_cookie(previews.cookie_value(grant)) == grant
    assert previews.from_url(previews.cookie_value(grant)) is None
    assert previews.from_cookie(previews.url_value(grant)) is None


def test_a_grant_signed_with_another_key_is_refused(vm, owner, settings):
    value = previews.url_value(previews.issue(vm, 8080, owner.pk, previews.LINK, 60))
    settings.SECRET_KEY = "another-key-" + "x" * 40
    assert previews.from_url(value) is None


@pytest.mark.parametrize(
    ("host", "named"),
    [
        ("8080-{vm}.preview.localhost", (8080, True)),
        ("8080-{vm}.preview.localhost.evil", None),
        ("8080-{vm}.x.preview.localhost", None),
        ("{vm}.preview.localhost", None),
        ("123456-{vm}.preview.localhost", None),
        ("preview.localhost", None),
    ],
)
def test_preview_hosts(host, named, vm, settings):
    settings.SANDBOX_PREVIEW_DOMAIN = "preview.localhost"
    parsed = previews.parse_host(host.format(vm=vm.pk))
    assert (parsed is not None) == (named is not None)
    if parsed is not None:
        assert parsed == (8080, vm.pk)


def test_links_signed_before_a_django_secret_rotation_work_until_it_is_retired(
    vm, owner, settings, tmp_path
):
    from django.core.management import call_command

    from tests.keyrotation import restart_processes, use_own_secrets

    use_own_secrets(settings, tmp_path / "secrets")
    link = previews.url_value(previews.issue(vm, 8080, owner.pk, previews.LINK, 600))
    cookie = previews.cookie_value(previews.issue(vm, 8080, owner.pk, previews.SESSION, 600))
    call_command("rotate_key", "django-secret", stdout=io.StringIO())
    restart_processes(settings)
    assert previews.from_url(link) is not None and previews.from_cookie(cookie) is not None
    new_link = previews.url_value(previews.issue(vm, 8080, owner.pk, previews.LINK, 600))
    call_command("retire_key", "django-secret", "v1", stdout=io.StringIO())
    restart_processes(settings)
    assert previews.from_url(link) is None and previews.from_cookie(cookie) is None
    assert previews.from_url(new_link) is not None
