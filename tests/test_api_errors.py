"""Bad input answers a JSON 400, and every API error is JSON in the documented shape
(``{"detail": ...}`` or field errors), never an HTML page (issue 10, item 6)."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import path
from rest_framework.test import APIClient

from core.parsers import MAX_DEPTH, depth, loads

pytestmark = pytest.mark.django_db

DEEP = "[" * 100_000


def _json_error(response, status: int) -> dict:
    assert response.status_code == status, response.content[:300]
    assert response["Content-Type"].startswith("application/json"), response["Content-Type"]
    return response.json()


@pytest.fixture
def vm_id(make_user):
    from accounts.caller import Caller
    from vms import commands

    operator = make_user("operator")
    accepted = commands.create(
        Caller.for_user(operator), name="deep", template="linux-small", start_now=False
    )
    return operator, accepted.vm_id


def test_deeply_nested_json_is_a_400_on_create(make_user, token_client) -> None:
    client = token_client(make_user("operator"))
    response = client.post("/api/v1/vms/", DEEP, content_type="application/json")
    assert "JSON parse error" in _json_error(response, 400)["detail"]


def test_deeply_nested_json_is_a_400_on_exec(vm_id, token_client) -> None:
    operator, vm = vm_id
    response = token_client(operator).post(
        f"/api/v1/vms/{vm}/exec/", DEEP, content_type="application/json"
    )
    assert "JSON parse error" in _json_error(response, 400)["detail"]


def test_json_nested_just_past_the_limit_is_refused_and_at_it_accepted() -> None:
    at_limit = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert depth(loads(at_limit)) == MAX_DEPTH
    with pytest.raises(ValueError, match="nested"):
        loads("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))
    with pytest.raises(ValueError, match="nested"):
        loads('{"a":' * (MAX_DEPTH + 1) + "1" + "}" * (MAX_DEPTH + 1))


@pytest.mark.parametrize(
    "url", ["/api/v1/vms/", "/api/v1/events/", "/api/v1/templates/", "/api/v1/audit/exports/"]
)
@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("offset=99999999999999999999", "offset"),
        ("offset=-1", "offset"),
        ("offset=abc", "offset"),
        ("limit=0", "limit"),
        ("limit=99999999999999999999x", "limit"),
    ],
)
def test_out_of_range_pagination_is_a_400(make_user, token_client, url, query, param) -> None:
    client = token_client(make_user("admin"))
    body = _json_error(client.get(f"{url}?{query}"), 400)
    assert param in body


def test_a_huge_limit_is_lowered_to_the_maximum(make_user, token_client) -> None:
    client = token_client(make_user("admin"))
    response = client.get("/api/v1/events/?limit=99999999999999999999")
    assert response.status_code == 200
    assert "limit=1000" in (response.json()["next"] or "limit=1000")


def test_unknown_api_path_is_a_json_404() -> None:
    body = _json_error(APIClient().get("/api/v1/no-such-thing/"), 404)
    assert body == {"detail": "Not found."}
    # Outside the API, the dashboard's page (templates/404.html).
    page = Client().get("/no-such-page/")
    assert (
        page["Content-Type"].startswith("text/html") and "Page not found" in page.content.decode()
    )


def _boom(request):
    raise RuntimeError("boom")


# This module is the URLconf of the test below, with the site's error handlers.
urlpatterns = [path("api/v1/boom/", _boom), path("boom/", _boom)]
handler500 = "sandbox_site.errors.server_error"


@pytest.mark.urls("tests.test_api_errors")
def test_a_server_error_in_the_api_is_json_without_the_exception() -> None:
    from sandbox_site import urls

    assert urls.handler500 == handler500  # the site's own
    client = Client(raise_request_exception=False)
    response = client.get("/api/v1/boom/")
    body = _json_error(response, 500)
    assert "boom" not in response.content.decode()
    assert set(body) == {"detail"} and response["X-Request-ID"]
    page = client.get("/boom/")
    assert page["Content-Type"].startswith("text/html")
    html = page.content.decode()
    assert "Server error" in html and page["X-Request-ID"] in html and "boom" not in html


@pytest.mark.django_db(transaction=True)
def test_the_served_site_answers_a_malformed_form_body_in_json(
    make_user, issue_token, tmp_path
) -> None:
    """The web server hands every request to the application: daphne's HTTP layer parsed POSTed
    multipart bodies itself and answered a malformed one with an empty 400 of its own."""
    import urllib.request

    from tests.served import Served

    token = issue_token(make_user("operator"))
    server = Served(tmp_path / "serve.log").wait_ready()
    try:
        request = urllib.request.Request(  # noqa: S310 - our own server on 127.0.0.1
            f"{server.url}/api/v1/vms/",
            data=b"--c637--\r\n",
            method="POST",
            headers={
                "Authorization": f"Bearer {token}",
                "Content-Type": "multipart/form-data; boundary=c637",
            },
        )
        try:
            urllib.request.urlopen(request, timeout=30)  # noqa: S310
            raise AssertionError("a malformed body was accepted")
        except urllib.error.HTTPError as exc:
            status, content_type, body = exc.code, exc.headers["Content-Type"], exc.read()
    finally:
        server.stop()
    assert status == 400 and content_type.startswith("application/json"), body
