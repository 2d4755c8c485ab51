"""The agent's credential (protocol 2), against the real agent file on this host: nothing but
``enroll`` is served without it, a fresh agent takes one credential (trust on first use), a
rotation makes the old one useless, and the agent keeps only the credential's SHA-256."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from vms.agent.client import AgentClient, AgentError, encode_frame

from .conftest import CREDENTIAL, RawConnection, RunningAgent, authed, start_agent, stop_agent

OTHER = "another-credential-that-is-long-enough-0123"


def refused(conn: RawConnection, header: dict, payload: bytes = b"") -> str:
    conn.send(encode_frame(header, payload))
    head = conn.frame()[0]
    assert head["kind"] == "error", head
    assert head["id"] == header["id"]
    return str(head["code"])


def test_every_op_without_the_credential_is_refused_and_does_nothing(
    raw: Callable[[], RawConnection], short_dir: str
) -> None:
    conn = raw()
    marker = f"{short_dir}/ran"
    requests = [
        {"op": "hello", "id": 1, "protocol": [2]},
        {"op": "ping", "id": 2},
        {"op": "exec", "id": 3, "argv": ["touch", marker]},
        {"op": "put", "id": 4, "path": f"{short_dir}/put", "mode": 420},
        {"op": "get", "id": 5, "path": "/etc/hostname"},
        {"op": "list", "id": 6, "path": "/"},
        {"op": "stat", "id": 7, "path": "/"},
        {"op": "health", "id": 8},
        {"op": "configure", "id": 9, "hostname": "owned"},
        {"op": "shutdown", "id": 10, "action": "poweroff"},
        {"op": "rotate", "id": 11, "credential": OTHER},
    ]
    for header in requests:
        assert refused(conn, header) == "unauthorized", header
    conn.send(authed({"op": "ping", "id": 12}))
    assert conn.frame()[0] == {"id": 12, "kind": "pong"}  # still serving, and not shut down
    assert not os.path.exists(marker) and not os.path.exists(f"{short_dir}/put")


def test_a_wrong_credential_is_refused(raw: Callable[[], RawConnection]) -> None:
    conn = raw()
    for wrong in ("", CREDENTIAL[:-1], CREDENTIAL + "x", CREDENTIAL.upper(), 12345, None, [1]):
        header = {"op": "hello", "id": 1, "protocol": [2], "auth": wrong}
        assert refused(conn, header) == "unauthorized", wrong


def test_the_right_credential_is_served(client: AgentClient) -> None:
    assert client.hello_info is not None and client.hello_info.protocol == 2
    assert {"enroll", "rotate"} <= set(client.hello_info.capabilities)
    assert client.exec(["echo", "ok"]).stdout == b"ok\n"


def test_a_protocol_1_client_learns_its_version_is_not_spoken(
    raw: Callable[[], RawConnection],
) -> None:
    assert refused(raw(), {"op": "hello", "id": 1, "protocol": [1]}) == "unsupported_version"


def test_an_enrolled_agent_refuses_another_enrolment(agent: RunningAgent) -> None:
    with AgentClient(agent.connect, timeout=10) as intruder:
        with pytest.raises(AgentError) as exc:
            intruder.enroll(OTHER)
        assert exc.value.code == "already_enrolled"
    with AgentClient(agent.connect, timeout=10, credential=CREDENTIAL) as owner:
        owner.hello(timeout=10)  # the host's credential still works


def test_a_fresh_agent_takes_one_credential_and_keeps_only_its_sha256(short_dir: str) -> None:
    running = start_agent(short_dir, credential=None)
    stored = Path(short_dir) / "credential"
    try:
        with AgentClient(running.connect, timeout=10) as first:
            with pytest.raises(AgentError) as exc:
                first.hello(timeout=10)
            assert exc.value.code == "not_enrolled"
            with pytest.raises(AgentError) as bad:
                first.enroll("short")
            assert bad.value.code == "bad_request"
            first.enroll(CREDENTIAL)
            first.hello(timeout=10)
        with AgentClient(running.connect, timeout=10) as second, pytest.raises(AgentError) as exc:
            second.enroll(OTHER)
        assert exc.value.code == "already_enrolled"
        text = stored.read_text()
        assert CREDENTIAL not in text
        assert text.strip() == hashlib.sha256(CREDENTIAL.encode()).hexdigest()
        assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    finally:
        stop_agent(running)
    # A restarted agent (init respawns it) still knows it, and nothing else.
    again = start_agent(short_dir, credential=None)
    try:
        with AgentClient(again.connect, timeout=10, credential=CREDENTIAL) as client:
            client.hello(timeout=10)
        with AgentClient(again.connect, timeout=10, credential=OTHER) as client:
            with pytest.raises(AgentError) as exc:
                client.hello(timeout=10)
            assert exc.value.code == "unauthorized"
    finally:
        stop_agent(again)


def test_a_rotation_makes_the_old_credential_useless(agent: RunningAgent) -> None:
    with AgentClient(agent.connect, timeout=10, credential=CREDENTIAL) as client:
        client.hello(timeout=10)
        client.rotate(OTHER)
        assert client.credential == OTHER
        assert client.exec(["true"]).exit_code == 0  # the same client goes on with the new one
    with AgentClient(agent.connect, timeout=10, credential=CREDENTIAL) as old:
        with pytest.raises(AgentError) as exc:
            old.hello(timeout=10)
        assert exc.value.code == "unauthorized"
        # Nor can the old credential rotate it back.
        old.credential = CREDENTIAL
        with pytest.raises(AgentError) as exc:
            old._request({"op": "rotate", "credential": CREDENTIAL})
        assert exc.value.code == "unauthorized"
    with AgentClient(agent.connect, timeout=10, credential=OTHER) as new:
        new.hello(timeout=10)


def test_a_pipeline_hands_over_a_credential_in_one_write(agent: RunningAgent) -> None:
    """A warm pool's hand-out: hello, configure and rotate sent at once, each checked with the
    credential of before in the order sent; the same client goes on with the new one and the
    old one is refused from then on."""
    with AgentClient(agent.connect, timeout=10, credential=CREDENTIAL) as client:
        hello, configured, rotated = client.pipeline(
            [
                client.hello_request(),
                client.configure_request(time=1_700_000_000.0, hostname="handed-out"),
                client.rotate_request(OTHER),
            ]
        )
        assert hello["kind"] == "hello" and client.hello_info is not None
        assert client.hello_info.capabilities == tuple(hello["capabilities"])
        assert "hostname handed-out" in " ".join(configured["planned"])
        assert rotated["rotated"] is True and client.credential == OTHER
        assert client.exec(["true"]).exit_code == 0
    with AgentClient(agent.connect, timeout=10, credential=CREDENTIAL) as old:
        with pytest.raises(AgentError) as exc:
            old.hello(timeout=10)
        assert exc.value.code == "unauthorized"


def test_a_pipeline_raises_the_first_failure_after_every_answer(agent: RunningAgent) -> None:
    """One refused request of a pipeline does not stop the others (each is answered) and the
    caller learns of it; a rotation that was refused leaves the client's credential alone."""
    with AgentClient(agent.connect, timeout=10, credential=CREDENTIAL) as client:
        with pytest.raises(AgentError) as exc:
            client.pipeline(
                [
                    client.hello_request(),
                    {"op": "rotate", "credential": "short"},
                    {"op": "no-such-op"},
                ]
            )
        assert exc.value.code == "bad_request"
        assert client.credential == CREDENTIAL and client.hello_info is not None
        assert client.exec(["true"]).exit_code == 0  # the old credential still opens it


def test_the_credential_check_compares_in_constant_time(agent_module) -> None:  # noqa: ANN001
    """In process: the check goes through hmac.compare_digest over SHA-256 digests."""
    import hmac

    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    cred = agent_module.Credential(None)
    assert cred.refusal(CREDENTIAL).code == "not_enrolled"
    cred.replace(CREDENTIAL, current=None, enrolling=True)
    hmac.compare_digest = spy
    try:
        assert cred.refusal(CREDENTIAL) is None
        assert cred.refusal(OTHER).code == "unauthorized"
    finally:
        hmac.compare_digest = real
    assert [len(a) for a, _ in calls] == [32, 32]
    assert all(CREDENTIAL.encode() not in a + b for a, b in calls)
