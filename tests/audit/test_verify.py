"""Tampering done with the triggers lifted is found, and the position is named."""

from __future__ import annotations

import io

import pytest
from django.core.management import call_command
from django.db import connection

from audit.actor import Actor
from tests.audit.helpers import append_user_events

pytestmark = pytest.mark.django_db


@pytest.fixture
def chain() -> None:
    append_user_events("1", 5)
    append_user_events("2", 5)


def run_verify() -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command("verify_audit_chain", stdout=out, stderr=err)
    except SystemExit as exc:
        return int(exc.code), err.getvalue()
    return 0, out.getvalue()


def sql(statement: str, params: list | None = None) -> None:
    with connection.cursor() as cur:
        cur.execute(statement, params or [])


def test_intact_chain_verifies(chain: None) -> None:
    code, text = run_verify()
    assert code == 0
    assert "chain intact up to position 10" in text


def test_changed_data_is_found(chain: None, tamper) -> None:
    with tamper():
        sql("UPDATE audit_event SET data = %s WHERE position = 4", ['{"i":99}'])
    code, text = run_verify()
    assert code == 1
    assert "position 4: altered" in text


def test_changed_actor_is_found(chain: None, tamper) -> None:
    with tamper():
        sql("UPDATE audit_event SET actor_name = 'mallory' WHERE position = 7")
    code, text = run_verify()
    assert (code, "position 7: altered" in text) == (1, True)


def test_deleted_row_is_found(chain: None, tamper) -> None:
    with tamper():
        sql("DELETE FROM audit_event WHERE position = 6")
    code, text = run_verify()
    assert code == 1
    assert "position 6: missing" in text


def test_deleted_row_with_renumbering_is_found(chain: None, tamper) -> None:
    with tamper():
        sql("DELETE FROM audit_event WHERE position = 6")
        for p in range(7, 11):
            sql("UPDATE audit_event SET position = %s WHERE position = %s", [p - 1, p])
    code, text = run_verify()
    assert code == 1
    assert "position 6: missing" in text


def test_swapped_rows_are_found(chain: None, tamper) -> None:
    with tamper():
        sql("UPDATE audit_event SET position = -1 WHERE position = 3")
        sql("UPDATE audit_event SET position = 3 WHERE position = 4")
        sql("UPDATE audit_event SET position = 4 WHERE position = -1")
    code, text = run_verify()
    assert code == 1
    assert "position 3: reordered" in text


def test_inserted_row_is_found(chain: None, tamper) -> None:
    """A forged event with a correct hash, slipped in at position 5 by shifting the rest."""
    from audit.hashing import event_hash
    from audit.store import COLUMNS, RecordedEvent

    with connection.cursor() as cur:
        cur.execute(f"SELECT {', '.join(COLUMNS)} FROM audit_event WHERE position = 4")
        prev = RecordedEvent.from_row(cur.fetchone())
    with tamper():
        for p in range(10, 4, -1):
            sql("UPDATE audit_event SET position = %s WHERE position = %s", [p + 1, p])
        fields = prev.hashed_fields()
        fields.update(
            event_id="00000000-0000-0000-0000-000000000001", aggregate_id="666", version=1
        )
        forged_hash = event_hash(fields, prev.data_json, prev.hash)
        with connection.cursor() as cur:
            cur.execute(
                "INSERT INTO audit_event (position, event_id, aggregate_type, aggregate_id, version, type, schema_version, data,"
                " actor_type, actor_id, actor_name, token_id, channel, source_ip, request_id, correlation_id, causation_id,"
                " recorded_at, prev_hash, hash) SELECT 5, %s, aggregate_type, '666', 1, type, schema_version, data, actor_type,"
                " actor_id, actor_name, token_id, channel, source_ip, request_id, correlation_id, causation_id, recorded_at,"
                " %s, %s FROM audit_event WHERE position = 4",
                [
                    "00000000000000000000000000000001"
                    if connection.vendor == "sqlite"
                    else "00000000-0000-0000-0000-000000000001",
                    prev.hash,
                    forged_hash,
                ],
            )
    code, text = run_verify()
    assert code == 1
    assert "position 5: inserted" in text


def test_cut_tail_is_found_by_the_signed_digest(chain: None, tamper) -> None:
    from audit.commands import sign_digest

    sign_digest(Actor.system())
    with tamper():
        sql("DELETE FROM audit_event WHERE position >= 9")
    code, text = run_verify()
    assert code == 1
    assert "position 9: missing" in text and "digest" in text


def test_forged_digest_signature_is_found(chain: None, tamper) -> None:
    from audit import digests

    digests.sign_pending()
    with tamper():
        sql("UPDATE audit_digest SET signature = 'AAAA'")
    code, text = run_verify()
    assert code == 1
    assert "bad signature" in text


def test_verification_is_itself_recorded(chain: None) -> None:
    from audit.models import Event

    run_verify()
    last = Event.objects.order_by("-position").first()
    assert last.type == "audit.chain_verified"
    assert last.payload["ok"] is True and last.payload["checked"] == 10
