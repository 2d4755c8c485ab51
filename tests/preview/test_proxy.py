"""The preview proxy served for real (uvicorn, the product's ASGI application) in front of a
guest stand-in on 127.0.0.1: who gets through, what the guest sees, what comes back.

The VM's address is set to 127.0.0.1 in its database row (``running_vm``): the NIC wiring that
gives real guests their address is tested with real guests by the network tests.
"""

from __future__ import annotations

import json
import socket
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from django.test import Client
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect

from accounts.caller import Caller
from tests.preview.conftest import (
    DENIED_PORT,
    PREVIEW_DOMAIN,
    bearer,
    grant_cookie,
    preview_host,
    share,
)
from tests.vms.conftest import wait_for
from vms import commands, previews
from vms.models import VirtualMachine

# The served product reads what the tests write: every row must be committed.
pytestmark = [pytest.mark.timeout(120), pytest.mark.django_db(transaction=True)]


@pytest.fixture
def owner(make_user: Any) -> Any:
    return make_user("operator")


@pytest.fixture
def vm(owner: Any, running_vm: Any) -> Any:
    return running_vm(owner)


@pytest.fixture
def http(served: Any) -> Any:
    with httpx.Client(
        base_url=served.url, follow_redirects=False, trust_env=False, timeout=30
    ) as client:
        yield client


def get(http: Any, host: str, path: str = "/echo", **kwargs: Any) -> httpx.Response:
    headers = {"Host": host, **kwargs.pop("headers", {})}
    http.cookies.clear()  # each test says which cookies it sends
    return http.request(kwargs.pop("method", "GET"), path, headers=headers, **kwargs)


def seen(response: httpx.Response) -> dict[str, Any]:
    """What the guest stand-in saw, with its headers as a dict of lists."""
    assert response.status_code == 200, response.text
    data = response.json()
    headers: dict[str, list[str]] = {}
    for key, value in data["headers"]:
        headers.setdefault(key.lower(), []).append(value)
    data["headers"] = headers
    return data


def signed(
    vm: Any, port: int, user: Any, seconds: int, kind: str = previews.LINK, recorded: bool = True
) -> str:
    """A grant in a URL: a link made through the command (recorded, as every real one is), or,
    with ``recorded=False`` (and for other kinds or a past expiry), one signed with our key but
    never recorded, as a forgery or a bug would make it."""
    if kind == previews.LINK and recorded and seconds > 0:
        caller = Caller.for_user(user, channel="api")
        grant = commands.create_preview_link(caller, vm, port, seconds)
    else:
        grant = previews.issue(vm, port, user.pk, kind, seconds)
    return f"/?{previews.QUERY_PARAM}={previews.url_value(grant)}"


# --- API tokens -------------------------------------------------------------------------------


def test_a_token_whose_user_may_see_the_vm_reaches_the_guest(
    http, served, guest, vm, owner, issue_token
):
    token = issue_token(owner)
    host = preview_host(vm, guest.port, served)
    data = seen(get(http, host, "/echo?x=1&y=2", headers=bearer(token)))
    assert data["path"] == "/echo" and data["query"] == "x=1&y=2"
    assert "authorization" not in data["headers"]  # our token stays with us
    assert data["headers"]["host"] == [host]
    assert data["headers"]["x-forwarded-host"] == [host]
    assert data["headers"]["x-forwarded-proto"] == ["http"]
    assert data["headers"]["x-forwarded-for"] == ["127.0.0.1"]


def test_a_viewer_sees_every_vm_so_reaches_it(http, served, guest, vm, make_user, issue_token):
    token = issue_token(make_user("viewer"))
    assert get(http, preview_host(vm, guest.port, served), headers=bearer(token)).status_code == 200


def test_a_user_who_may_not_see_the_vm_is_refused(http, served, guest, vm, make_user, issue_token):
    stranger = issue_token(make_user("operator"))
    response = get(http, preview_host(vm, guest.port, served), headers=bearer(stranger))
    assert response.status_code == 404  # another operator's VM looks like a missing one


def test_a_token_without_vm_read_scope_is_refused(http, served, guest, vm, owner, issue_token):
    token = issue_token(owner, scopes=["accounts.view_apitoken"])
    assert get(http, preview_host(vm, guest.port, served), headers=bearer(token)).status_code == 403


def test_a_read_only_token_may_read_but_not_post(http, served, guest, vm, owner, issue_token):
    token = issue_token(owner, read_only=True)
    host = preview_host(vm, guest.port, served)
    assert get(http, host, headers=bearer(token)).status_code == 200
    assert get(http, host, method="POST", content=b"x", headers=bearer(token)).status_code == 403


def test_a_wrong_token_is_refused(http, served, guest, vm):
    response = get(http, preview_host(vm, guest.port, served), headers=bearer("sbx_abc_def"))
    assert response.status_code == 401


def test_no_credentials_is_401(http, served, guest, vm):
    response = get(http, preview_host(vm, guest.port, served))
    assert response.status_code == 401
    assert "www-authenticate" in response.headers


def test_another_authorization_scheme_is_the_guests(http, served, guest, vm, owner):
    """Basic auth for the guest's own app is not ours: it neither lets anyone in nor is hidden."""
    cookie = grant_cookie(
        get(http, preview_host(vm, guest.port, served), signed(vm, guest.port, owner, 60))
    )
    data = seen(
        get(
            http,
            preview_host(vm, guest.port, served),
            headers={"Cookie": cookie, "Authorization": "Basic dTpw"},
        )
    )
    assert data["headers"]["authorization"] == ["Basic dTpw"]
    response = get(
        http, preview_host(vm, guest.port, served), headers={"Authorization": "Basic dTpw"}
    )
    assert response.status_code == 401


# --- The dashboard's session is not a preview credential -------------------------------------


def _session_cookie(user: Any) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


def test_the_dashboard_session_cookie_is_not_accepted(http, served, guest, vm, owner):
    cookie = f"sessionid={_session_cookie(owner)}"
    response = get(http, preview_host(vm, guest.port, served), headers={"Cookie": cookie})
    assert response.status_code == 401


def test_our_cookies_and_token_never_reach_the_guest(http, served, guest, vm, owner, issue_token):
    token = issue_token(owner)
    host = preview_host(vm, guest.port, served)
    cookie = grant_cookie(get(http, host, signed(vm, guest.port, owner, 60)))
    headers = {
        **bearer(token),
        "Cookie": f"sessionid={_session_cookie(owner)}; csrftoken=abc; {cookie}; theirs=1",
        "X-Forwarded-For": "203.0.113.9",
        "Forwarded": "for=203.0.113.9",
        "Connection": "keep-alive, X-Secret",
        "X-Secret": "hop",
    }
    data = seen(get(http, host, headers=headers))
    assert data["headers"]["cookie"] == ["theirs=1"]
    assert "authorization" not in data["headers"]
    assert data["headers"]["x-forwarded-for"] == ["127.0.0.1"]  # ours, not the client's
    assert "forwarded" not in data["headers"] and "x-secret" not in data["headers"]


def test_the_dashboard_is_never_served_on_a_preview_host(http, served, vm, guest):
    for host in (
        f"{PREVIEW_DOMAIN}:{served.port}",
        f"{guest.port}-{vm.pk}.{PREVIEW_DOMAIN}.:{served.port}",  # a trailing dot is the same host
        f"x.{PREVIEW_DOMAIN}",
        f"{guest.port}-{vm.pk}.{PREVIEW_DOMAIN}",
    ):
        response = get(http, host, "/accounts/login/")
        assert response.status_code in (401, 404)
        assert "csrftoken" not in response.headers.get("set-cookie", "")
        assert "<form" not in response.text


# --- Signed links -----------------------------------------------------------------------------


def test_a_signed_link_works_and_sets_a_host_only_cookie(
    http, served, guest, vm, owner, issue_token
):
    link = share(issue_token(owner), vm, guest.port, served, expires_in=600)
    host = preview_host(vm, guest.port, served)
    first = get(http, host, link.replace("/?", "/echo?a=1&"))
    assert first.status_code == 303
    assert first.headers["location"] == "/echo?a=1"  # the grant leaves the address bar
    set_cookie = first.headers["set-cookie"]
    attributes = [a.strip().lower() for a in set_cookie.split(";")]
    assert set_cookie.startswith(f"{previews.COOKIE_NAME}=")  # plain http: no __Host- prefix
    assert "httponly" in attributes and "samesite=lax" in attributes and "path=/" in attributes
    assert not any(a.startswith("domain") for a in attributes)  # host-only
    assert 590 <= int(next(a for a in attributes if a.startswith("max-age"))[8:]) <= 600
    assert "secure" not in attributes  # set on https only
    data = seen(get(http, host, "/echo?a=1", headers={"Cookie": grant_cookie(first)}))
    assert "cookie" not in data["headers"] and data["query"] == "a=1"


def test_the_query_string_reaches_the_guest_as_sent(http, served, guest, vm, owner, issue_token):
    host = preview_host(vm, guest.port, served)
    raw = "a=b%20c&flag&x=1;y=2&e=%E2%82%AC&a=+"
    assert seen(get(http, host, f"/echo?{raw}", headers=bearer(issue_token(owner))))["query"] == raw
    link = signed(vm, guest.port, owner, 60)[2:]  # "sbx_preview=..."
    response = get(http, host, f"/echo?{raw}&{link}", method="POST")
    assert seen(response)["query"] == raw


def test_a_signed_link_for_a_post_is_proxied_with_the_cookie(http, served, guest, vm, owner):
    host = preview_host(vm, guest.port, served)
    response = get(
        http,
        host,
        signed(vm, guest.port, owner, 60).replace("/?", "/echo?"),
        method="POST",
        content=b"hello",
    )
    data = seen(response)
    assert data["body_head"] == "hello" and data["query"] == ""
    assert response.headers["set-cookie"].startswith(previews.COOKIE_NAME + "=")


def test_an_expired_link_is_refused(http, served, guest, vm, owner):
    response = get(http, preview_host(vm, guest.port, served), signed(vm, guest.port, owner, -1))
    assert response.status_code == 403 and "expired" in response.text


def test_an_expired_cookie_is_refused(http, served, guest, vm, owner):
    grant = previews.issue(vm, guest.port, owner.pk, previews.LINK, -1)
    cookie = f"{previews.COOKIE_NAME}={previews.cookie_value(grant)}"
    response = get(http, preview_host(vm, guest.port, served), headers={"Cookie": cookie})
    assert response.status_code == 403 and "expired" in response.text


def test_a_link_for_another_port_or_vm_is_refused(http, served, guest, vm, owner, running_vm):
    other_port = signed(vm, guest.port + 1, owner, 60)
    assert get(http, preview_host(vm, guest.port, served), other_port).status_code == 403
    other_vm = running_vm(owner, name="other")
    link = signed(vm, guest.port, owner, 60)
    assert get(http, preview_host(other_vm, guest.port, served), link).status_code == 403
    # A link's cookie is no good on another VM's host either.
    cookie = grant_cookie(get(http, preview_host(vm, guest.port, served), link))
    response = get(http, preview_host(other_vm, guest.port, served), headers={"Cookie": cookie})
    assert response.status_code == 403


def test_a_tampered_link_is_refused(http, served, guest, vm, owner):
    link = signed(vm, guest.port, owner, 60)
    tampered = link[:-3] + ("AAA" if not link.endswith("AAA") else "BBB")
    assert get(http, preview_host(vm, guest.port, served), tampered).status_code == 403


def test_a_cookie_value_is_not_a_url_grant(http, served, guest, vm, owner):
    grant = previews.issue(vm, guest.port, owner.pk, previews.LINK, 60)
    path = f"/?{previews.QUERY_PARAM}={previews.cookie_value(grant)}"
    assert get(http, preview_host(vm, guest.port, served), path).status_code == 403


def test_a_link_of_a_destroyed_vm_is_refused(http, served, guest, vm, owner):
    link = signed(vm, guest.port, owner, 60)
    VirtualMachine.objects.filter(pk=vm.pk).update(state="destroyed")
    assert get(http, preview_host(vm, guest.port, served), link).status_code == 404


def test_a_link_dies_with_its_makers_account(http, served, guest, vm, owner):
    link = signed(vm, guest.port, owner, 60)
    type(owner).objects.filter(pk=owner.pk).update(is_active=False)
    assert get(http, preview_host(vm, guest.port, served), link).status_code == 403


def test_a_link_made_by_a_viewer_does_not_work(http, served, guest, vm, make_user):
    """A viewer may see the VM but not share it: a link in its name (forged with our key, as a
    bug could) still fails the share check at use."""
    viewer = make_user("viewer")
    assert (
        get(
            http,
            preview_host(vm, guest.port, served),
            signed(vm, guest.port, viewer, 60, recorded=False),
        ).status_code
        == 403
    )


def test_a_link_that_was_never_recorded_is_refused(http, served, guest, vm, owner):
    """Signed with our key but not made by the command: no record, so no access."""
    response = get(
        http,
        preview_host(vm, guest.port, served),
        signed(vm, guest.port, owner, 60, recorded=False),
    )
    assert response.status_code == 403 and "revoked" in response.text


def test_a_revoked_link_and_the_cookie_it_gave_are_refused(
    http, served, guest, vm, owner, issue_token
):
    token = issue_token(owner)
    link, other = (share(token, vm, guest.port, served, expires_in=600) for _ in range(2))
    host = preview_host(vm, guest.port, served)
    cookie = grant_cookie(get(http, host, link))
    assert seen(get(http, host, "/echo", headers={"Cookie": cookie}))["path"] == "/echo"
    link_id = previews.from_url(parse_qs(urlsplit(link).query)[previews.QUERY_PARAM][0]).link_id
    revoked = httpx.delete(
        f"{served.url}/api/v1/vms/{vm.pk}/previews/{link_id}/",
        headers=bearer(token),
        trust_env=False,
    )
    assert revoked.status_code == 200 and revoked.json() == {"revoked": [link_id]}
    for response in (get(http, host, link), get(http, host, "/", headers={"Cookie": cookie})):
        assert response.status_code == 403 and "revoked" in response.text
    assert get(http, host, other).status_code == 303  # the other link still opens


# --- The VM's state and the port --------------------------------------------------------------


def test_a_stopped_vm_or_one_without_address_is_503(http, served, guest, owner, running_vm):
    for vm in (
        running_vm(owner, name="stopped", state="stopped"),
        running_vm(owner, name="noip", ip=None),
    ):
        response = get(
            http, preview_host(vm, guest.port, served), signed(vm, guest.port, owner, 60)
        )
        assert response.status_code == 503


def test_a_denied_or_impossible_port_is_refused(http, served, vm, owner, issue_token):
    token = issue_token(owner)
    assert (
        get(http, preview_host(vm, DENIED_PORT, served), headers=bearer(token)).status_code == 403
    )
    assert get(http, preview_host(vm, 70000, served), headers=bearer(token)).status_code == 403
    assert get(http, preview_host(vm, 0, served), headers=bearer(token)).status_code == 403


def test_a_host_naming_no_vm_is_404(http, served, issue_token, owner):
    token = issue_token(owner)
    for host in (
        f"8080-nope.{PREVIEW_DOMAIN}",
        f"8080-{'0' * 8}-0000-0000-0000-{'0' * 12}.{PREVIEW_DOMAIN}",
    ):
        assert get(http, host, headers=bearer(token)).status_code == 404


def test_oversized_request_headers_are_431(http, served, guest, vm, owner, issue_token):
    headers = {**bearer(issue_token(owner)), "X-Big": "a" * 40_000}
    assert get(http, preview_host(vm, guest.port, served), headers=headers).status_code == 431


# --- Relaying ---------------------------------------------------------------------------------


def test_nothing_listening_is_502_and_a_slow_guest_504(http, served, guest, vm, owner, issue_token):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    token = issue_token(owner)
    assert (
        get(http, preview_host(vm, closed_port, served), headers=bearer(token)).status_code == 502
    )
    response = get(http, preview_host(vm, guest.port, served), "/slow", headers=bearer(token))
    assert response.status_code == 504  # the served product's read timeout is 2 s


def test_redirects_are_passed_back_not_followed(http, served, guest, vm, owner, issue_token):
    response = get(
        http, preview_host(vm, guest.port, served), "/redirect", headers=bearer(issue_token(owner))
    )
    assert response.status_code == 302 and response.headers["location"] == "/elsewhere"


def test_bodies_stream_both_ways(http, served, guest, vm, owner, issue_token):
    token = issue_token(owner)
    host = preview_host(vm, guest.port, served)

    def chunks():
        for _ in range(40):
            yield b"x" * 100_000

    data = seen(get(http, host, "/echo", method="POST", content=chunks(), headers=bearer(token)))
    assert data["body_len"] == 4_000_000
    with http.stream("GET", "/stream", headers={"Host": host, **bearer(token)}) as response:
        assert response.status_code == 200
        parts = list(response.iter_text())
    assert "".join(parts) == "".join(f"chunk{i}\n" for i in range(5))


def test_the_guest_may_not_set_our_cookies_or_domain_cookies(
    http, served, guest, vm, owner, issue_token
):
    response = get(
        http, preview_host(vm, guest.port, served), "/cookies", headers=bearer(issue_token(owner))
    )
    assert response.headers.get_list("set-cookie") == ["app=1; Path=/"]


# --- Websockets -------------------------------------------------------------------------------


def _ws(served: Any, host: str, path: str = "/ws", **kwargs: Any) -> Any:
    sock = socket.create_connection(("127.0.0.1", served.port))
    return ws_connect(f"ws://{host}{path}", sock=sock, proxy=None, open_timeout=10, **kwargs)


def test_websockets_pass_through_with_a_token(served, guest, vm, owner, issue_token):
    host = preview_host(vm, guest.port, served)
    with _ws(
        served,
        host,
        "/ws?q=1",
        additional_headers=bearer(issue_token(owner)),
        subprotocols=["chat"],
    ) as ws:
        assert ws.subprotocol == "chat"
        hello = json.loads(ws.recv())
        headers = {k.lower() for k, _ in hello["headers"]}
        assert "authorization" not in headers and hello["query"] == "q=1"
        ws.send("ping")
        assert ws.recv() == "echo:ping"
        ws.send(b"\x01\x02\x03")
        assert ws.recv() == b"\x03\x02\x01"
        ws.send("close-please")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4321


def test_a_guests_websocket_redirect_is_not_followed(served, guest, vm, owner, issue_token):
    host = preview_host(vm, guest.port, served)
    with pytest.raises(InvalidStatus) as refused:
        _ws(served, host, "/ws-redirect", additional_headers=bearer(issue_token(owner)))
    assert refused.value.response.status_code == 403  # every refused handshake
    # The server logs it as it refuses: the line may reach the file just after the answer.
    wait_for(
        lambda: "redirected the websocket (302)" in served.log.read_text(),
        10,
        "the refusal's log line",
    )


def test_a_websocket_with_the_link_cookie_from_the_preview_origin(http, served, guest, vm, owner):
    host = preview_host(vm, guest.port, served)
    cookie = grant_cookie(get(http, host, signed(vm, guest.port, owner, 60)))
    with _ws(
        served, host, additional_headers={"Cookie": cookie + "; theirs=2"}, origin=f"http://{host}"
    ) as ws:
        hello = json.loads(ws.recv())
        cookies = [v for k, v in hello["headers"] if k.lower() == "cookie"]
        assert cookies == ["theirs=2"]
    # The cookie is ambient: another site's page may not open the socket with it.
    with pytest.raises(InvalidStatus) as refused:
        _ws(served, host, additional_headers={"Cookie": cookie}, origin="http://evil.example")
    assert refused.value.response.status_code == 403


def test_a_websocket_without_credentials_or_with_the_session_is_refused(served, guest, vm, owner):
    host = preview_host(vm, guest.port, served)
    with pytest.raises(InvalidStatus) as refused:
        _ws(
            served,
            host,
            additional_headers={"Cookie": f"sessionid={_session_cookie(owner)}"},
            origin=f"http://{host}",
        )
    assert refused.value.response.status_code == 403  # every refused handshake


def test_a_websocket_of_a_user_who_may_not_see_the_vm_is_refused(
    served, guest, vm, make_user, issue_token
):
    token = issue_token(make_user("operator"))
    with pytest.raises(InvalidStatus) as refused:
        _ws(served, preview_host(vm, guest.port, served), additional_headers=bearer(token))
    assert refused.value.response.status_code == 403  # every refused handshake


# --- From the dashboard -----------------------------------------------------------------------


def test_the_dashboard_hands_a_signed_in_user_over_to_the_preview_host(
    http, served, guest, vm, owner
):
    client = Client()
    client.force_login(owner)
    response = client.get(f"/vms/{vm.pk}/preview/{guest.port}/")
    assert response.status_code == 302
    location = urlsplit(response["Location"])
    assert location.hostname == f"{guest.port}-{vm.pk}.{PREVIEW_DOMAIN}"
    grant = previews.from_url(parse_qs(location.query)[previews.QUERY_PARAM][0])
    assert grant is not None and grant.kind == previews.HANDOFF and grant.seconds_left <= 60
    host = preview_host(vm, guest.port, served)
    first = get(http, host, f"/?{location.query}")
    assert first.status_code == 303
    assert seen(get(http, host, headers={"Cookie": grant_cookie(first)}))["path"] == "/echo"


def test_the_dashboard_does_not_hand_over_a_vm_the_user_may_not_see(vm, guest, make_user):
    client = Client()
    client.force_login(make_user("operator"))
    assert client.get(f"/vms/{vm.pk}/preview/{guest.port}/").status_code == 404


def test_a_session_cookie_dies_when_its_user_may_no_longer_see_the_vm(
    http, served, guest, vm, owner, make_user
):
    from django.contrib.auth.models import Group

    viewer = make_user("viewer")
    host = preview_host(vm, guest.port, served)
    cookie = grant_cookie(
        get(http, host, signed(vm, guest.port, viewer, 60, kind=previews.HANDOFF))
    )
    assert get(http, host, headers={"Cookie": cookie}).status_code == 200
    viewer.groups.set([Group.objects.get(name="operator")])
    assert get(http, host, headers={"Cookie": cookie}).status_code == 403
