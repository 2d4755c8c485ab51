"""Reading the trail is recorded once per request, with only validated filters in the event
(review of issue 11: F3 a NUL in the query string, F4 reads that left no event)."""

from __future__ import annotations

import pytest
from django.test import Client

from audit.models import Event
from tests.audit_exports.mix import Mix

pytestmark = pytest.mark.django_db


def _reads() -> int:
    return Event.objects.filter(type="audit.trail_read").count()


def _last_read() -> Event:
    return Event.objects.filter(type="audit.trail_read").latest("position")


def _login(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.mark.parametrize("param", ["x", "actor_id", "channel", "token_id", "event_id", "page"])
def test_unknown_query_parameters_are_not_recorded_even_with_a_nul(
    mix: Mix, token_client, param: str
) -> None:
    client = token_client(mix.auditor)
    before = _reads()
    response = client.get(f"/api/v1/events/?{param}=%00&type=vm.started")
    assert response.status_code == 200, response.content
    assert _reads() == before + 1
    read = _last_read()
    assert read.payload["filters"] == {"type": "vm.started"}
    assert "\x00" not in read.data


@pytest.mark.parametrize(
    "param", ["type", "type_prefix", "aggregate_type", "aggregate_id", "actor", "correlation_id"]
)
@pytest.mark.parametrize("value", ["%00", "a%0Ab", "%1B%5B31m"])
def test_a_filter_with_control_characters_is_a_json_400_and_no_read(
    mix: Mix, token_client, param: str, value: str
) -> None:
    client = token_client(mix.auditor)
    before = _reads()
    response = client.get(f"/api/v1/events/?{param}={value}")
    assert response.status_code == 400, response.content
    assert param in response.json()
    assert _reads() == before


def test_api_read_records_the_validated_filters_and_page(mix: Mix, token_client) -> None:
    client = token_client(mix.auditor)
    response = client.get("/api/v1/events/", {"actor": mix.operator.username, "limit": "3"})
    assert response.status_code == 200
    assert _last_read().payload["filters"] == {"actor": mix.operator.username, "limit": "3"}


@pytest.mark.parametrize(
    "query", ["x=%00", "type=%00", "actor=%00", "q=%00", "aggregate_id=%00", "actor=a%1Bb"]
)
def test_the_dashboard_trail_answers_a_nul_with_a_form_error_and_records_no_text(
    mix: Mix, query: str
) -> None:
    client = _login(mix.auditor)
    before = _reads()
    response = client.get(f"/audit/?{query}")
    assert response.status_code == 200
    assert _reads() == before + 1
    read = _last_read()
    assert "\x00" not in read.data and "\x1b" not in read.data
    name = query.split("=")[0]
    if name == "x":
        assert read.payload["filters"] == {"page": "1"}
    else:
        assert read.payload["invalid"] == [name] and read.payload["returned"] == 0
        assert response.context["form"].errors[name]


def test_the_dashboard_sessions_page_ignores_unknown_parameters(mix: Mix) -> None:
    response = _login(mix.auditor).get("/audit/sessions/?x=%00&page=%00")
    assert response.status_code == 200
    assert _last_read().payload["filters"] == {"page": "1"}


@pytest.mark.parametrize("reason", ["a\x00b", "a\x1b[2Jb", "x" * 501])
def test_legal_hold_reasons_with_control_characters_are_refused(
    mix: Mix, token_client, reason: str
) -> None:
    client = token_client(mix.auditor)
    dashboard = _login(mix.auditor)
    before = Event.objects.count()
    response = client.post("/api/v1/audit/legal-holds/", {"reason": reason}, format="json")
    assert response.status_code == 400 and "reason" in response.json()
    response = client.post(
        "/api/v1/audit/legal-holds/abc/release/", {"reason": reason}, format="json"
    )
    assert response.status_code == 400 and "reason" in response.json()
    page = dashboard.post("/audit/retention/", {"action": "place", "reason": reason}, follow=True)
    assert page.status_code == 200
    assert Event.objects.count() == before


# --- F4: every path that returns events records the read, once per request ------------------

# Each API operation whose answer holds events (found in the schema), and how to call it.
EVENT_OPERATIONS = {
    "/api/v1/events/": lambda w: "/api/v1/events/",
    "/api/v1/events/{position}/": lambda w: f"/api/v1/events/{w['position']}/",
    "/api/v1/requests/{event_id}/": lambda w: f"/api/v1/requests/{w['request']}/",
    "/api/v1/vms/{id}/events/": lambda w: f"/api/v1/vms/{w['vm']}/events/",
}


def _event_operations() -> set[str]:
    """(path) of every schema operation whose 2xx answer includes the Event component."""
    from drf_spectacular.generators import SchemaGenerator

    schema = SchemaGenerator().get_schema(request=None, public=True)
    components = schema["components"]["schemas"]

    def refs(node: object, seen: set[str]) -> set[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref":
                    name = value.rsplit("/", 1)[-1]
                    if name not in seen:
                        seen.add(name)
                        refs(components.get(name, {}), seen)
                else:
                    refs(value, seen)
        elif isinstance(node, list):
            for value in node:
                refs(value, seen)
        return seen

    found = set()
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            answers = {c: r for c, r in operation.get("responses", {}).items() if c[:1] == "2"}
            if "Event" in refs(answers, set()):
                found.add(path)
    return found


def test_every_api_operation_returning_events_is_covered_here() -> None:
    # A new endpoint that answers with events must record the read and be listed above.
    assert _event_operations() == set(EVENT_OPERATIONS)


@pytest.fixture
def world(mix: Mix) -> dict[str, str]:
    from accounts.caller import Caller
    from vms import commands

    # The operator's: reading another user's request is reading the trail.
    created = commands.create(
        Caller.for_user(mix.operator, channel="api"),
        name="reader",
        template="linux-small",
        start_now=False,
    )
    return {
        "vm": str(created.vm.pk),
        "request": str(created.request.event_id),
        "position": str(created.request.position),
    }


@pytest.mark.parametrize("operation", sorted(EVENT_OPERATIONS))
def test_each_api_read_of_events_is_one_event_and_a_head_none(
    mix: Mix, world: dict[str, str], token_client, operation: str
) -> None:
    mix.admin.is_superuser = True
    mix.admin.save()
    client = token_client(mix.admin)
    url = EVENT_OPERATIONS[operation](world)
    before = _reads()
    response = client.get(url)
    assert response.status_code == 200, response.content
    assert _reads() == before + 1
    read = _last_read()
    assert read.actor_name == mix.admin.username
    assert client.head(url).status_code == 200
    assert _reads() == before + 1


def test_a_vm_timeline_read_names_the_vm_and_what_it_returned(
    mix: Mix, world: dict[str, str], token_client
) -> None:
    mix.admin.is_superuser = True
    mix.admin.save()
    body = token_client(mix.admin).get(f"/api/v1/vms/{world['vm']}/events/").json()
    read = _last_read().payload
    assert read["what"] == "api.vms.events" and read["filters"] == {"vm": world["vm"]}
    assert read["returned"] == len(body["results"]) >= 1
    token_client(mix.admin).get(f"/api/v1/requests/{world['request']}/")
    read = _last_read().payload
    assert read == {
        "what": "api.requests.retrieve",
        "event_id": world["request"],
        "positions": [int(world["position"])],
    }


def test_polling_ones_own_request_is_not_a_trail_read(
    mix: Mix, world: dict[str, str], token_client
) -> None:
    client = token_client(mix.operator)
    before = _reads()
    for _ in range(3):
        response = client.get(f"/api/v1/requests/{world['request']}/")
        assert response.status_code == 200, response.content
    assert _reads() == before


def test_dashboard_pages_showing_events_record_one_read(mix: Mix, world: dict[str, str]) -> None:
    mix.admin.is_superuser = True
    mix.admin.save()
    client = _login(mix.admin)
    for url, what in (("/", "dashboard.home"), (f"/vms/{world['vm']}/", "dashboard.vm_timeline")):
        before = _reads()
        assert client.get(url).status_code == 200
        assert _reads() == before + 1
        assert _last_read().payload["what"] == what


def test_serving_code_that_reads_events_records_the_read() -> None:
    """An ast scan of the views, APIs and consumers: a function (or class) that queries events
    records ``audit.trail_read`` itself, or is a helper whose every caller in its module does."""
    import ast
    from pathlib import Path

    from tests.astutil import parse

    root = Path(__file__).resolve().parents[2]
    serving = ("views", "api", "consumer", "consumers")  # also review_api, exec_consumer...
    problems = []
    scanned = []
    for path in sorted(root.glob("*/*.py")):
        if not path.stem.endswith(serving) or path.parts[-2] in ("tests", "bench", "sdk"):
            continue
        scanned.append(str(path.relative_to(root)))
        tree = parse(path.read_text())
        units = [
            node
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        ]

        def names(node: ast.AST) -> set[str]:
            found = set()
            for n in ast.walk(node):
                if isinstance(n, ast.Name):
                    found.add(n.id)
                elif isinstance(n, ast.Attribute):
                    found.add(n.attr)
            return found

        def reads(node: ast.AST) -> bool:
            if isinstance(node, ast.ClassDef):
                # A view class's queryset of events (a serializer's model is no read).
                return any(
                    isinstance(n, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == "queryset" for t in n.targets)
                    and "Event" in names(n.value)
                    for n in node.body
                )
            return bool(names(node) & {"Event", "vm_timeline"})

        for node in units:
            if not reads(node) or "record_trail_read" in names(node):
                continue
            callers = [
                other
                for other in units
                if other is not node
                and not isinstance(other, ast.ClassDef)
                and node.name in names(other)
            ]
            where = f"{path.relative_to(root)}: {node.name}"
            if not node.name.startswith("_") or not callers:
                problems.append(where)
            elif not all("record_trail_read" in names(c) for c in callers):
                problems.append(f"{where} (a caller records nothing)")
    assert {"audit/api.py", "audit/views.py", "vms/api.py", "vms/consumers.py"} <= set(scanned)
    assert {"vms/views.py", "sandbox_site/views.py"} <= set(scanned)
    assert problems == []


def test_head_of_an_export_download_records_no_download(mix: Mix, token_client) -> None:
    from datetime import UTC, datetime, timedelta

    now = datetime.now(UTC)
    period = {
        "since": (now - timedelta(hours=1)).isoformat(),
        "until": (now + timedelta(hours=1)).isoformat(),
    }
    client = token_client(mix.auditor)
    job = client.post(
        "/api/v1/audit/reports/", {"framework": "hipaa", "format": "csv", **period}
    ).json()
    dashboard = _login(mix.auditor)
    for c, url in (
        (client, job["download_url"]),
        (dashboard, f"/audit/exports/{job['id']}/download/"),
    ):
        # Headers only (the dashboard allows no HEAD at all): no file was sent.
        assert c.head(url).status_code in (200, 405)
    assert not Event.objects.filter(type="audit.export_downloaded").exists()
    assert client.get(job["download_url"]).status_code == 200
    assert Event.objects.filter(type="audit.export_downloaded").count() == 1


def test_a_bundle_name_with_control_characters_is_recorded_escaped(mix: Mix, tmp_path) -> None:
    from audit.commands import verify_chain
    from tests.audit_exports.mix import SHELL

    verify_chain(SHELL, since_bundle=str(tmp_path / "evil\x00\x1b[2J.zip"))
    recorded = Event.objects.filter(type="audit.chain_verified").latest("position")
    assert recorded.payload["since_bundle"] == "evil\\x00\\x1b[2J.zip"
