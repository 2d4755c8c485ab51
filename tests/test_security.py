"""Issue 10: forwarded headers only from configured proxies (item 5), /metrics closed to the
world (item 10), the schema's Bearer auth and error answers, the API page behind login, security
headers on every response, and ``check --deploy`` clean under production settings (item 15)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from rest_framework.test import APIClient

from audit.models import Event
from tests.served import ROOT, Served

PASSWORD = "pw-Long-enough-1"


# --- Item 5: X-Forwarded-For ------------------------------------------------------------------


async def _client_seen(peer: str, forwarded: bytes | None) -> Any:
    """The client address and scheme the site's ASGI middleware hands on to the application."""
    from sandbox_site.proxies import TrustedProxyHeaders

    seen: dict[str, Any] = {}

    async def probe(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.update(client=scope["client"][0], scheme=scope["scheme"])

    headers = [(b"x-forwarded-proto", b"https")]
    if forwarded is not None:
        headers.append((b"x-forwarded-for", forwarded))
    scope = {"type": "http", "scheme": "http", "headers": headers, "client": (peer, 40000)}
    await TrustedProxyHeaders(probe)(scope, None, None)
    return seen["client"], seen["scheme"]


def test_the_site_is_wrapped_in_the_proxy_middleware() -> None:
    from sandbox_site.asgi import application
    from sandbox_site.proxies import TrustedProxyHeaders

    assert isinstance(application, TrustedProxyHeaders)  # HTTP and websockets alike


@pytest.mark.asyncio
async def test_forwarded_headers_from_an_untrusted_peer_are_ignored(settings) -> None:
    settings.SANDBOX_TRUSTED_PROXIES = []
    assert await _client_seen("203.0.113.9", b"10.1.2.3") == ("203.0.113.9", "http")
    settings.SANDBOX_TRUSTED_PROXIES = ["198.51.100.0/24"]
    assert await _client_seen("203.0.113.9", b"10.1.2.3") == ("203.0.113.9", "http")


@pytest.mark.asyncio
async def test_forwarded_headers_from_a_trusted_proxy_are_believed(settings) -> None:
    settings.SANDBOX_TRUSTED_PROXIES = ["203.0.113.0/24"]
    # The right-most address that is not a trusted proxy is the client's: what the client
    # itself wrote in front of it is not believed.
    chain = b"10.1.2.3, 6.6.6.6, 203.0.113.7"
    assert await _client_seen("203.0.113.9", chain) == ("6.6.6.6", "https")
    assert await _client_seen("203.0.113.9", None) == ("203.0.113.9", "https")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "forwarded",
    [b"garbage", b"x" * 80, b"1.2.3.4.5", b"10.0.0.1, not-an-address", b"fe80::1%eth0"],
)
async def test_a_forwarded_value_that_is_no_ip_address_is_not_believed(
    settings, forwarded: bytes, caplog
) -> None:
    """Filed: with a trusted proxy, any text in X-Forwarded-For became the client address
    (and the audit log's source_ip, a 45-character column)."""
    settings.SANDBOX_TRUSTED_PROXIES = ["203.0.113.0/24"]
    with caplog.at_level("WARNING", logger="sandbox.site"):
        assert await _client_seen("203.0.113.9", forwarded) == ("203.0.113.9", "https")
    assert "names no IP address" in caplog.text


@pytest.mark.asyncio
async def test_a_forwarded_ip_address_is_believed_in_its_normal_form(settings) -> None:
    settings.SANDBOX_TRUSTED_PROXIES = ["203.0.113.0/24"]
    assert await _client_seen("203.0.113.9", b"2001:DB8::0:1") == ("2001:db8::1", "https")


def test_a_trusted_proxy_setting_must_name_addresses(monkeypatch) -> None:
    from django.core.exceptions import ImproperlyConfigured

    from sandbox_site.settings import env_networks

    monkeypatch.setenv("SANDBOX_TRUSTED_PROXIES", "10.0.0.1, fd00::/8")
    assert env_networks("SANDBOX_TRUSTED_PROXIES", "") == ["10.0.0.1/32", "fd00::/8"]
    monkeypatch.setenv("SANDBOX_TRUSTED_PROXIES", "10.0.0.1, proxy.example")
    with pytest.raises(ImproperlyConfigured, match="SANDBOX_TRUSTED_PROXIES"):
        env_networks("SANDBOX_TRUSTED_PROXIES", "")


def _serving_modes() -> list[Any]:
    modes = [pytest.param(1, id="one-web-process")]
    modes.append(
        pytest.param(
            2,
            id="several-web-processes",
            marks=pytest.mark.skipif(
                not os.environ.get("REDIS_URL"), reason="several web processes need REDIS_URL"
            ),
        )
    )
    return modes


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("web_workers", _serving_modes())
def test_the_real_servers_believe_forwarded_for_only_from_a_configured_proxy(
    web_workers: int, make_user, issue_token, tmp_path: Path
) -> None:
    """A token bound to 10.1.2.3 and a client on 127.0.0.1 claiming to be 10.1.2.3: refused,
    and the log names 127.0.0.1, unless 127.0.0.1 is a configured proxy."""
    token = issue_token(make_user("operator", "ipbound"), allowed_ips=["10.1.2.3/32"])
    headers = {"Authorization": f"Bearer {token}", "X-Forwarded-For": "10.1.2.3"}
    answers = {}
    for trusted in ("", "127.0.0.1"):
        server = Served(
            tmp_path / "serve.log", web_workers=web_workers, SANDBOX_TRUSTED_PROXIES=trusted
        )
        try:
            answers[trusted] = server.wait_ready().request("/api/v1/me/", headers)[0]
        finally:
            server.stop()
    assert answers == {"": 401, "127.0.0.1": 200}
    rejected = Event.objects.get(type="auth.token_rejected")
    assert rejected.source_ip == "127.0.0.1"


# --- Item 10: /metrics ------------------------------------------------------------------------


@pytest.mark.django_db
def test_metrics_are_refused_to_other_addresses(settings) -> None:
    settings.SANDBOX_METRICS_TOKEN = ""
    assert Client(REMOTE_ADDR="203.0.113.9").get("/metrics").status_code == 403
    assert Client(REMOTE_ADDR="127.0.0.1").get("/metrics").status_code == 200  # loopback


@pytest.mark.django_db
def test_metrics_with_the_scrape_token(settings) -> None:
    settings.SANDBOX_METRICS_TOKEN = "scrape-secret-1"
    settings.SANDBOX_METRICS_ALLOWED_IPS = []
    far = Client(REMOTE_ADDR="203.0.113.9")
    missing = far.get("/metrics")
    assert missing.status_code == 401 and missing["WWW-Authenticate"].startswith("Bearer")
    assert far.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    ok = far.get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-secret-1")
    assert ok.status_code == 200 and b"sandbox_event_store_head_position" in ok.content
    # An API token is not a scrape token, nor is an empty allow-list open.
    assert Client(REMOTE_ADDR="127.0.0.1").get("/metrics").status_code == 401


@pytest.mark.django_db
def test_metrics_allow_list_takes_networks(settings) -> None:
    settings.SANDBOX_METRICS_TOKEN = ""
    settings.SANDBOX_METRICS_ALLOWED_IPS = ["10.9.0.0/16"]
    assert Client(REMOTE_ADDR="10.9.8.7").get("/metrics").status_code == 200
    assert Client(REMOTE_ADDR="10.10.0.1").get("/metrics").status_code == 403
    assert Client(REMOTE_ADDR="127.0.0.1").get("/metrics").status_code == 403


# --- Item 15: schema, API page, headers, deploy checks ----------------------------------------


@pytest.fixture
def schema(make_user) -> dict[str, Any]:
    client = APIClient()
    client.force_login(make_user("viewer"))
    response = client.get("/api/v1/schema/", HTTP_ACCEPT="application/json")
    assert response.status_code == 200
    return response.json()


@pytest.mark.django_db
def test_schema_declares_the_bearer_token(schema) -> None:
    schemes = schema["components"]["securitySchemes"]
    bearer = [n for n, s in schemes.items() if s.get("scheme") == "bearer"]
    assert bearer, schemes
    me = schema["paths"]["/api/v1/me/"]["get"]
    assert {bearer[0]: []} in me["security"]


@pytest.mark.django_db
def test_schema_documents_the_error_answers(schema) -> None:
    assert schema["components"]["schemas"]["Error"]["required"] == ["detail"]
    destroy = schema["paths"]["/api/v1/vms/{id}/"]["delete"]["responses"]
    assert {"400", "401", "403", "404", "409"} <= set(destroy)
    listing = schema["paths"]["/api/v1/vms/"]["get"]["responses"]
    assert {"400", "401", "403"} <= set(listing) and "409" not in listing
    offset = next(
        p for p in schema["paths"]["/api/v1/vms/"]["get"]["parameters"] if p["name"] == "offset"
    )
    assert offset["schema"]["minimum"] == 0 and offset["schema"]["maximum"] < 2**63


@pytest.mark.django_db
def test_schema_and_api_page_need_a_login(make_user) -> None:
    anonymous = Client()
    page = anonymous.get("/api/v1/docs/")
    assert page.status_code == 302 and page["Location"].startswith("/accounts/login/")
    assert anonymous.get("/api/v1/schema/").status_code in (401, 403)
    client = Client()
    client.force_login(make_user("viewer"))
    page = client.get("/api/v1/docs/")
    assert page.status_code == 200 and b"swagger-ui" in page.content
    assert b"<script>" not in page.content  # its script is a file: no inline script for CSP


@pytest.mark.django_db
@pytest.mark.parametrize(
    "path",
    [
        "/accounts/login/",
        "/api/v1/me/",
        "/api/v1/nothing/",
        "/healthz",
        "/metrics",
        "/static/css/app.css",
    ],
)
def test_security_headers_on_every_response(path: str) -> None:
    response = Client().get(path)
    csp = response["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    script_src = csp.split("script-src")[1].split(";")[0]
    assert script_src.split()[0] == "'self'" and "unsafe" not in script_src
    assert response["X-Frame-Options"] == "DENY"
    assert response["Referrer-Policy"] == "same-origin"
    assert response["X-Content-Type-Options"] == "nosniff"
    assert "Strict-Transport-Security" not in response  # plain http: no HSTS


@pytest.mark.django_db
def test_hsts_when_served_over_tls(settings) -> None:
    settings.SECURE_HSTS_SECONDS = 31_536_000
    response = Client().get("/healthz", secure=True)
    assert response["Strict-Transport-Security"].startswith("max-age=31536000")


@pytest.mark.django_db
def test_tls_redirects_plain_http_but_not_probes(settings) -> None:
    settings.SECURE_SSL_REDIRECT = True
    assert Client().get("/accounts/login/").status_code == 301
    assert Client().get("/healthz").status_code == 200


@pytest.fixture
def deploy_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "PYTEST"))}
    env.update(
        SANDBOX_HTTPS="true",
        DJANGO_SECURE_HSTS_PRELOAD="true",
        DJANGO_ALLOWED_HOSTS="sandbox.example.com",
        SANDBOX_PREVIEW_DOMAIN="preview.example.net",
        SANDBOX_DATA_DIR=str(tmp_path),
    )
    env.pop("SANDBOX_TESTING", None)
    yield env


def test_check_deploy_is_clean_under_production_settings(deploy_env) -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT, env=deploy_env, capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "security.W" not in result.stdout + result.stderr


def test_check_deploy_warns_without_them(deploy_env) -> None:
    deploy_env.pop("SANDBOX_HTTPS")
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy"],
        cwd=ROOT, env=deploy_env, capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    for warning in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert warning in result.stderr + result.stdout


def _preview_domain(env: dict[str, str]) -> tuple[str, str]:
    """(the preview domain the settings arrive at, what ``check`` says) under ``env``."""
    code = "from django.conf import settings; print(repr(settings.SANDBOX_PREVIEW_DOMAIN))"
    shown = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    checked = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    return shown.stdout.strip().splitlines()[-1], checked.stdout + checked.stderr


def test_preview_urls_are_off_on_a_public_dashboard_until_a_domain_is_set(deploy_env) -> None:
    deploy_env.pop("SANDBOX_PREVIEW_DOMAIN")
    domain, said = _preview_domain(deploy_env)
    assert domain == "''"
    assert "sandbox.W040" in said and "SANDBOX_PREVIEW_DOMAIN" in said
    # Set to empty on purpose: off, and nothing to warn about.
    deploy_env["SANDBOX_PREVIEW_DOMAIN"] = ""
    domain, said = _preview_domain(deploy_env)
    assert domain == "''" and "sandbox.W040" not in said


def test_a_local_dashboard_gets_preview_urls_under_localhost(deploy_env) -> None:
    deploy_env.pop("SANDBOX_PREVIEW_DOMAIN")
    deploy_env["DJANGO_ALLOWED_HOSTS"] = "127.0.0.1,localhost"
    domain, said = _preview_domain(deploy_env)
    assert domain == "'preview.localhost'" and "sandbox.W040" not in said


def test_no_template_needs_inline_script() -> None:
    """The Content-Security-Policy blocks inline event handlers and scripts without the
    response's nonce: a template with one would silently stop working."""
    import re

    handler = re.compile(r"""\son[a-z]+\s*=\s*["']""", re.IGNORECASE)
    script = re.compile(r"<script(?![^>]*\b(src|nonce)=)[^>]*>", re.IGNORECASE)
    offenders = [
        f"{path.relative_to(ROOT)}: {m.group(0)}"
        for path in sorted((ROOT / "templates").rglob("*.html"))
        for pattern in (handler, script)
        for m in pattern.finditer(path.read_text())
    ]
    assert not offenders, offenders
