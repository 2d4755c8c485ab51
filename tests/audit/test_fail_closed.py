"""Fail closed: when the event store cannot take the request event, nothing is done."""

from __future__ import annotations

import psycopg
import pytest
from django.db import connection
from django.test import override_settings
from rest_framework.test import APIClient

from accounts.models import APIToken
from audit.models import Event
from audit.store import LOCK_SQL


@pytest.mark.django_db(transaction=True)
@override_settings(SANDBOX_EVENT_LOCK_TIMEOUT_MS=200)
def test_action_refused_with_503_when_the_log_is_locked(postgres_only, make_user) -> None:
    user = make_user("operator", "pat")
    client = APIClient()
    client.force_login(user)
    before = Event.objects.count()
    params = connection.get_connection_params()
    other = psycopg.connect(
        **{k: v for k, v in params.items() if k in {"host", "port", "user", "password", "dbname"}}
    )
    try:
        other.execute("BEGIN")
        other.execute(LOCK_SQL)  # the append lock, held by another session
        response = client.post("/api/v1/tokens/", {"name": "ci"}, format="json")
    finally:
        other.rollback()
        other.close()
    assert response.status_code == 503
    assert "nothing was done" in response.json()["detail"]
    assert APIToken.objects.filter(user=user).count() == 0
    assert Event.objects.count() == before
    # And once the store is back, the same request works.
    assert client.post("/api/v1/tokens/", {"name": "ci"}, format="json").status_code == 201
