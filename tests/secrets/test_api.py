"""The secrets API and dashboard page: values go in and never come out; metadata is listed to
whom may see it; input is validated; token scopes apply."""

from __future__ import annotations

import pytest
from django.test import Client

from audit.models import Event
from secretstore.models import Secret

VALUE = "api-value-Zq9-never-shown"


@pytest.mark.django_db
def test_create_list_update_delete_never_return_the_value(make_user, token_client) -> None:
    alice = make_user("operator", "alice")
    client = token_client(alice)
    r = client.post("/api/v1/secrets/", {"name": "API_KEY", "value": VALUE}, format="json")
    assert r.status_code == 201, r.content
    body = r.json()
    assert body["name"] == "API_KEY" and body["owner"] == "user:alice" and body["version"] == 1
    assert "value" not in body and VALUE not in r.content.decode()
    sid = body["id"]
    listed = client.get("/api/v1/secrets/")
    assert listed.status_code == 200 and VALUE not in listed.content.decode()
    assert [s["name"] for s in listed.json()["results"]] == ["API_KEY"]
    r = client.patch(f"/api/v1/secrets/{sid}/", {"value": VALUE + "2"}, format="json")
    assert r.status_code == 200 and r.json()["version"] == 2
    r = client.put(
        f"/api/v1/secrets/{sid}/", {"value": VALUE + "3", "expected_version": 1}, format="json"
    )
    assert r.status_code == 409, r.content
    assert client.delete(f"/api/v1/secrets/{sid}/").status_code == 204
    assert not Secret.objects.exists()
    assert all(VALUE not in e.data for e in Event.objects.all())


@pytest.mark.django_db
def test_bad_input_is_a_400_and_changes_nothing(make_user, token_client) -> None:
    client = token_client(make_user("operator", "alice"))
    before = Event.objects.count()
    for body in [
        {"name": "9LIVES", "value": VALUE},
        {"name": "A-B", "value": VALUE},
        {"name": "SHORT", "value": "abc"},
        {"name": "BIG", "value": "x" * 70000},
        {"name": "NOVALUE"},
        {"name": "GROUPLESS", "value": VALUE, "group": "admin"},
    ]:
        r = client.post("/api/v1/secrets/", body, format="json")
        assert r.status_code == 400, (body, r.content)
    assert Event.objects.count() == before


@pytest.mark.django_db
def test_other_users_secrets_look_missing_and_auditors_see_metadata_only(
    make_user, token_client
) -> None:
    alice, bob = make_user("operator", "alice"), make_user("operator", "bob")
    auditor = make_user("auditor", "audrey")
    sid = (
        token_client(alice)
        .post("/api/v1/secrets/", {"name": "MINE", "value": VALUE}, format="json")
        .json()["id"]
    )
    bob_client = token_client(bob)
    assert bob_client.get(f"/api/v1/secrets/{sid}/").status_code == 404
    assert bob_client.delete(f"/api/v1/secrets/{sid}/").status_code == 404
    assert bob_client.get("/api/v1/secrets/").json()["results"] == []
    audit_client = token_client(auditor)
    assert [s["name"] for s in audit_client.get("/api/v1/secrets/").json()["results"]] == ["MINE"]
    assert audit_client.delete(f"/api/v1/secrets/{sid}/").status_code == 403
    assert (
        audit_client.post("/api/v1/secrets/", {"name": "X", "value": VALUE}, format="json")
    ).status_code == 403


@pytest.mark.django_db
def test_token_scopes_and_read_only_apply(make_user, token_client) -> None:
    alice = make_user("operator", "alice")
    reader = token_client(alice, read_only=True)
    assert reader.get("/api/v1/secrets/").status_code == 200
    assert (
        reader.post("/api/v1/secrets/", {"name": "A", "value": VALUE}, format="json").status_code
        == 403
    )
    vm_only = token_client(alice, scopes=["vms.exec_vm"])
    assert vm_only.get("/api/v1/secrets/").status_code == 403
    adder = token_client(alice, scopes=["secretstore.add_secret"])
    r = adder.post("/api/v1/secrets/", {"name": "A", "value": VALUE}, format="json")
    assert r.status_code == 201
    assert adder.delete(f"/api/v1/secrets/{r.json()['id']}/").status_code == 403


@pytest.mark.django_db
def test_the_dashboard_page_stores_and_never_shows_a_value(make_user) -> None:
    alice = make_user("operator", "alice")
    client = Client()
    client.force_login(alice)
    page = client.get("/secrets/")
    assert page.status_code == 200
    html = page.content.decode()
    assert 'type="password"' in html and 'autocomplete="off"' in html
    r = client.post("/secrets/", {"name": "FROM_FORM", "value": VALUE, "group": ""})
    assert r.status_code == 302
    secret = Secret.objects.get(name="FROM_FORM")
    listing = client.get("/secrets/").content.decode()
    assert "FROM_FORM" in listing and VALUE not in listing
    # A form with an error does not echo the value back.
    bad = client.post("/secrets/", {"name": "bad name", "value": VALUE}).content.decode()
    assert VALUE not in bad and "environment variable" in bad
    page = client.get(f"/secrets/{secret.pk}/value/")
    assert page.status_code == 200 and VALUE not in page.content.decode()
    r = client.post(f"/secrets/{secret.pk}/value/", {"value": VALUE + "!", "expected_version": 1})
    assert r.status_code == 302 and Secret.objects.get().version == 2
    confirm = client.get(f"/secrets/{secret.pk}/delete/")
    assert confirm.status_code == 200 and "Delete the secret" in confirm.content.decode()
    assert Secret.objects.exists()
    assert client.post(f"/secrets/{secret.pk}/delete/").status_code == 302
    assert not Secret.objects.exists()
