"""Shared fixtures: users per role, API clients, and test-only handling of append-only tables."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

# Keep this module importable without Django configured: the guest and hypervisor suites run
# with ``-p no:django`` and share this conftest.


def _disable_triggers_sql(vendor: str) -> list[str]:
    from audit import db as audit_db

    if vendor == "postgresql":
        return [f"ALTER TABLE {t} DISABLE TRIGGER USER" for t in audit_db.PROTECTED_TABLES]
    return audit_db.drop_statements(vendor)


def _enable_triggers_sql(vendor: str) -> list[str]:
    from audit import db as audit_db

    if vendor == "postgresql":
        return [f"ALTER TABLE {t} ENABLE TRIGGER USER" for t in audit_db.PROTECTED_TABLES]
    return audit_db.create_statements(vendor)


def _act_as_owner(cur: Any, vendor: str) -> str | None:
    """When the suite runs as the runtime role (see ``django_db_setup`` below), act as the
    session's own login, the schema owner, in this session; returns the role to go back to."""
    if vendor != "postgresql":
        return None
    cur.execute("SELECT current_user, session_user")
    current, session = cur.fetchone()
    if current == session:
        return None
    cur.execute("SET ROLE " + _quote_role(session))
    return current


def _quote_role(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@contextlib.contextmanager
def acting_as_owner(conn: Any = None) -> Iterator[None]:
    """Test-only: act as the schema owner in this session (a no-op unless the suite runs as the
    runtime role). Enter it outside any ``atomic`` block that may fail inside it."""
    if conn is None:
        from django.db import connection as conn
    with conn.cursor() as cur:
        back_to = _act_as_owner(cur, conn.vendor)
    try:
        yield
    finally:
        if back_to is not None:
            with conn.cursor() as cur:
                cur.execute("SET ROLE " + _quote_role(back_to))


@contextlib.contextmanager
def append_only_guard_lifted(conn: Any = None) -> Iterator[None]:
    """Test-only: act as the schema owner and lift the append-only triggers, as an attacker
    holding the owner's or a superuser's credentials could (the product's role cannot)."""
    if conn is None:
        from django.db import connection as conn
    with acting_as_owner(conn):
        with conn.cursor() as cur:
            for sql in _disable_triggers_sql(conn.vendor):
                cur.execute(sql)
        try:
            yield
        finally:
            with conn.cursor() as cur:
                for sql in _enable_triggers_sql(conn.vendor):
                    cur.execute(sql)


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup: None, django_db_blocker: Any) -> Iterator[None]:
    """Run the suite as the product's runtime role when one is configured.

    DATABASE_URL's user (the schema owner) makes and migrates the test database, and the
    migration grants SANDBOX_DB_RUNTIME_ROLE its privileges (``audit.roles``); from then on every
    connection acts as that role (``SET ROLE`` at connect), as the product would, and test-only
    code that must act as the owner (flushes, tampering) switches in its own session. CI runs
    so (.ci/run; ``setup_database_roles --owner-can-act-as-runtime``).
    """
    from django.conf import settings
    from django.db import connections

    role = settings.SANDBOX_DB_RUNTIME_ROLE
    conn = connections["default"]
    if not role or conn.vendor != "postgresql" or role == conn.settings_dict.get("USER"):
        yield
        return
    options = conn.settings_dict.setdefault("OPTIONS", {})
    before = options.get("options", "")

    def reconnect(with_options: str) -> None:
        options["options"] = with_options
        with django_db_blocker.unblock():
            conn.close()
            conn.close_pool()

    reconnect(f"{before} -c role={role}".strip())
    yield
    reconnect(before)


@pytest.fixture(scope="session", autouse=True)
def _flush_around_append_only_tables(request: pytest.FixtureRequest) -> Iterator[None]:
    """Transactional tests end with a flush (TRUNCATE/DELETE of every table), which the
    append-only triggers rightly refuse; lift them around the flush, in tests only."""
    if not request.config.pluginmanager.hasplugin("django"):
        yield
        return
    from django.db.backends.base.operations import BaseDatabaseOperations

    original = BaseDatabaseOperations.execute_sql_flush

    def execute_sql_flush(self: Any, sql_list: list[str]) -> None:
        with append_only_guard_lifted(self.connection):
            original(self, sql_list)

    BaseDatabaseOperations.execute_sql_flush = execute_sql_flush  # type: ignore[method-assign]
    yield
    BaseDatabaseOperations.execute_sql_flush = original  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def _own_digest_sink(request: pytest.FixtureRequest, tmp_path_factory: Any) -> None:
    """Each test's database starts empty, so its digests need a sink of their own: a sink
    shared across tests would hold digests that the next test's database never had."""
    if not request.config.pluginmanager.hasplugin("django"):
        return
    settings = request.getfixturevalue("settings")
    settings.SANDBOX_DIGEST_SINK_DIR = tmp_path_factory.mktemp("digest-sink")


@pytest.fixture(autouse=True)
def _fresh_login_throttle(request: pytest.FixtureRequest) -> Iterator[None]:
    """Failed-login counters live in the cache, which outlives a test: each test counts from
    zero under a namespace of its own."""
    if not request.config.pluginmanager.hasplugin("django"):
        yield
        return
    import uuid

    from accounts import throttle

    saved = throttle.NAMESPACE
    throttle.NAMESPACE = f"login-throttle-test-{uuid.uuid4().hex}"
    yield
    throttle.NAMESPACE = saved


@pytest.fixture(autouse=True)
def _fresh_channel_layers() -> Iterator[None]:
    """Each test's event loop gets its own channel layer: channels_redis keeps a receive lock per
    layer, bound to the loop that created it, and a receive left pending when a test's loop
    closed would make every later test's receive fail ("bound to a different event loop"). A
    served process has one loop, so this is a test-only concern."""
    yield
    try:
        from channels.layers import channel_layers
    except ImportError:
        return
    channel_layers.backends.clear()


@pytest.fixture
def tamper() -> Callable[[], contextlib.AbstractContextManager[None]]:
    return append_only_guard_lifted


@pytest.fixture
def make_user(db: Any) -> Callable[..., Any]:
    from accounts import commands
    from audit.actor import Actor

    counter = iter(range(1, 10_000))

    def make(
        role: str = "operator", username: str | None = None, password: str = "pw-Long-enough-1"
    ) -> Any:
        name = username or f"{role}{next(counter)}"
        return commands.create_user(
            Actor.system(channel="shell", name="tests"),
            username=name,
            password=password,
            role=role,
        )

    return make


@pytest.fixture
def issue_token(db: Any) -> Callable[..., str]:
    from accounts import commands
    from audit.actor import Actor

    def issue(user: Any, **kwargs: Any) -> str:
        kwargs.setdefault("name", "test")
        return commands.create_token(
            Actor.system(channel="shell", name="tests"), user, **kwargs
        ).plaintext

    return issue


@pytest.fixture
def token_client(issue_token: Callable[..., str]) -> Callable[..., Any]:
    from rest_framework.test import APIClient

    def client_for(user: Any, **kwargs: Any) -> APIClient:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {issue_token(user, **kwargs)}")
        return client

    return client_for


@pytest.fixture
def postgres_only(db: Any) -> None:
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL (set DATABASE_URL); SQLite has no equivalent")
