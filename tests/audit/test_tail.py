"""A tail that cannot be cut (issue 11, items 2, 6 and 8).

Digests are chained (sequence number and the previous document's SHA-256), made every minute
also when idle, and copied as made to a write-once sink outside the database. Deleting the
newest events together with their digests is found from the sink; signing over a broken chain
is refused with an event that names the break; a verification never takes a cut position.
"""

from __future__ import annotations

import io
import json
import stat
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command

from audit import digests, signing, sink
from audit.actor import Actor
from audit.commands import sign_digest, verify_chain
from audit.integrity import verify_store
from audit.models import Digest, Event
from tests.audit.forgery import sql
from tests.audit.helpers import append_user_events

pytestmark = pytest.mark.django_db
SHELL = Actor.system(channel="shell", name="tests")
WORKER = Actor.system(channel="worker", name="digest-signer")


@pytest.fixture(autouse=True)
def _own_keys(settings: Any, tmp_path: Path) -> None:
    settings.SANDBOX_DIGEST_ED25519_DIR = tmp_path / "keys"
    settings.SANDBOX_DIGEST_ED25519_KEYS = ""
    settings.SANDBOX_DIGEST_ED25519_CURRENT = "ed25519-1"
    settings.SANDBOX_DIGEST_ALGORITHM = "ed25519"


def run(command: str, *args: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command(command, *args, stdout=out, stderr=err)
    except SystemExit as exc:
        return int(exc.code), err.getvalue()
    return 0, out.getvalue()


def _three_digests() -> list[Digest]:
    made = []
    for user in ("1", "2", "3"):
        append_user_events(user, 3)
        made.append(digests.sign_pending())
    return made


def test_digests_are_chained_by_number_and_previous_document() -> None:
    first, second, third = _three_digests()
    assert [d.sequence for d in (first, second, third)] == [1, 2, 3]
    assert first.prev_digest_sha256 == signing.GENESIS_DIGEST
    assert second.prev_digest_sha256 == signing.document_sha256(first.document)
    doc = json.loads(third.document)
    assert (doc["sequence"], doc["prev_digest_sha256"]) == (3, third.prev_digest_sha256)
    assert verify_store().ok


def test_a_removed_middle_digest_is_found(tamper: Any) -> None:
    _three_digests()
    with tamper():
        sql("DELETE FROM audit_digest WHERE sequence = 2")
    report = verify_store()
    assert report.problem is not None and report.problem.kind == "digest"


def test_an_idle_digest_covers_time_when_nothing_happened() -> None:
    append_user_events("1", 2)
    busy = sign_digest(WORKER, scheduled=True)
    idle = sign_digest(WORKER, scheduled=True)
    assert (busy.event_count, idle.event_count) == (2, 0)
    assert (idle.start_position, idle.end_position) == (3, 2)
    assert idle.start_prev_hash == idle.end_hash == busy.end_hash
    assert idle.sequence == busy.sequence + 1
    # The worker's own signing leaves no event behind, so the log does not grow by itself.
    assert not Event.objects.filter(type="audit.digest_signed").exists()
    append_user_events("2", 1)
    after = sign_digest(WORKER, scheduled=True)
    assert after.start_position == 3 and after.event_count == 1
    assert verify_store().ok


def test_the_worker_signs_every_minute() -> None:
    from django_q.models import Schedule

    from audit.apps import ensure_schedules

    ensure_schedules()
    schedule = Schedule.objects.get(name="audit.sign_digest")
    assert (schedule.schedule_type, schedule.minutes) == (Schedule.MINUTES, 1)


def test_every_digest_is_copied_to_a_write_once_sink(settings: Any) -> None:
    made = _three_digests()
    copies = sink.configured().read()
    assert sorted(copies) == [1, 2, 3]
    assert [(c.document, c.signature) for c in copies.values()] == [
        (d.document, d.signature) for d in made
    ]
    path = Path(settings.SANDBOX_DIGEST_SINK_DIR) / "00000000" / "000000000002.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    with pytest.raises(sink.SinkError, match="already holds a different digest"):
        sink.configured().write(sink.SinkEntry(2, made[0].document, made[0].signature))


def test_a_cut_tail_with_its_digests_is_found_from_the_sink(tamper: Any) -> None:
    _three_digests()  # positions 1..9, digests 1..3
    with tamper():
        sql("DELETE FROM audit_event WHERE position >= 7")
        sql("DELETE FROM audit_digest WHERE end_position >= 7")
    code, text = run("verify_audit_chain")
    assert code == 1
    assert "position 7: missing" in text and "digest sink holds digests up to number 3" in text


def test_signing_after_a_cut_is_refused_with_an_event_naming_the_break(tamper: Any) -> None:
    _three_digests()
    with tamper():
        sql("DELETE FROM audit_event WHERE position >= 7")
        sql("DELETE FROM audit_digest WHERE end_position >= 7")
    append_user_events("4", 1)  # a new event after the cut
    code, text = run("sign_audit_digest")
    assert code == 1 and "REFUSED: the chain is broken" in text
    assert Digest.objects.count() == 2
    failed = Event.objects.filter(type="audit.digest_signing_failed").get()
    assert failed.payload["reason"] == "chain_broken" and failed.payload["kind"] == "missing"
    assert "number 3" in failed.payload["detail"]
    assert failed.position > 9  # not one of the positions the cut digest had signed


def test_signing_over_an_altered_unsigned_event_is_refused(tamper: Any) -> None:
    append_user_events("1", 3)
    digests.sign_pending()
    append_user_events("2", 3)
    with tamper():
        sql("UPDATE audit_event SET actor_name = 'mallory' WHERE position = 5")
    with pytest.raises(digests.ChainBroken) as refused:
        sign_digest(SHELL)
    assert (refused.value.problem.position, refused.value.problem.kind) == (5, "altered")
    failed = Event.objects.filter(type="audit.digest_signing_failed").get()
    assert failed.payload["position"] == 5 and failed.payload["kind"] == "altered"


def test_a_signing_failure_of_the_worker_is_recorded_once_while_it_lasts(tamper: Any) -> None:
    append_user_events("1", 3)
    with tamper():
        sql("UPDATE audit_event SET actor_name = 'mallory' WHERE position = 2")
    for _ in range(3):
        with pytest.raises(digests.ChainBroken):
            sign_digest(WORKER, scheduled=True)
    assert Event.objects.filter(type="audit.digest_signing_failed").count() == 1


def test_a_digest_re_signed_after_a_cut_differs_from_its_sink_copy(
    settings: Any, tmp_path: Path, tamper: Any
) -> None:
    """The cut is made while the signer writes to another sink (say, a fresh directory)."""
    _three_digests()
    sink_dir = settings.SANDBOX_DIGEST_SINK_DIR
    with tamper():
        sql("DELETE FROM audit_event WHERE position >= 7")
        sql("DELETE FROM audit_digest WHERE end_position >= 7")
    append_user_events("4", 2)
    settings.SANDBOX_DIGEST_SINK_DIR = tmp_path / "fresh-sink"
    replacement = digests.sign_pending()
    assert replacement.sequence == 3 and replacement.end_position == 8
    settings.SANDBOX_DIGEST_SINK_DIR = sink_dir
    report = verify_store()
    assert report.problem is not None
    assert "digest number 3 differs from its copy in the digest sink" in report.problem.detail


def test_the_verification_event_does_not_take_a_cut_position(tamper: Any) -> None:
    """Issue 11, item 8: the event used to be appended at the first deleted position."""
    append_user_events("1", 5)
    append_user_events("2", 5)
    sign_digest(SHELL)  # signs 1..10
    with tamper():
        sql("DELETE FROM audit_event WHERE position >= 9")
    report = verify_chain(SHELL)
    assert not report.ok
    recorded = Event.objects.filter(type="audit.chain_verified").get()
    assert recorded.position == 11 and recorded.prev_hash == Event.objects.get(position=8).hash
    assert not Event.objects.filter(position__in=[9, 10]).exists()


def test_require_intact_names_the_break_of_a_range(tamper: Any) -> None:
    """What exports call before vouching for a range (audit.integrity)."""
    from audit.integrity import ChainBroken, check_range, require_intact

    _three_digests()  # positions 1..9
    require_intact(1, 9)
    require_intact(4, 6)
    with tamper():
        sql("UPDATE audit_event SET actor_name = 'mallory' WHERE position = 5")
    with pytest.raises(ChainBroken) as broken:
        require_intact(4, 6)
    assert (broken.value.problem.position, broken.value.problem.kind) == (5, "altered")
    assert check_range(7, 9) is None  # a range that does not hold the altered event


def test_require_intact_finds_a_cut_tail_from_the_sink(tamper: Any) -> None:
    from audit.integrity import check_range

    _three_digests()
    with tamper():
        sql("DELETE FROM audit_event WHERE position >= 7")
        sql("DELETE FROM audit_digest WHERE end_position >= 7")
    problem = check_range(1, 6)
    assert problem is not None and problem.kind == "missing" and problem.position == 7


def test_each_host_s_sink_catches_up_with_digests_signed_elsewhere(
    settings: Any, tmp_path: Path
) -> None:
    """Several hosts, one database: each host's sink is a witness of its own."""
    host_a = settings.SANDBOX_DIGEST_SINK_DIR
    append_user_events("1", 2)
    digests.sign_pending()  # 1, on host A
    settings.SANDBOX_DIGEST_SINK_DIR = tmp_path / "host-b-sink"
    append_user_events("2", 2)
    digests.sign_pending()  # 2, on host B (same key: this test's key directory)
    settings.SANDBOX_DIGEST_SINK_DIR = host_a
    assert verify_store().ok  # host A's sink is behind, not contradicted
    append_user_events("3", 2)
    digests.sign_pending()  # 3, on host A, which first copies 2
    assert sorted(sink.configured().read()) == [1, 2, 3]
    assert verify_store().ok
