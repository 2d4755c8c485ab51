"""Schemathesis (``st run``) against the running server's own schema, with an admin's and a
viewer's token: no server error, and every answer (errors included) as the schema documents it
(status, content type, body). Bounded: ``SANDBOX_ST_EXAMPLES`` examples per operation (default
5) with a fixed seed (``SANDBOX_ST_SEED``), so a run takes about a minute per token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.served import Served

pytestmark = pytest.mark.django_db(transaction=True)

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
    ]
)


def _st(schema: Path, base: str, token: str, *selection: str) -> subprocess.CompletedProcess:
    argv = [
        sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()",
        "run", str(schema), "--url", base, "-H", f"Authorization: Bearer {token}",
        "--checks", CHECKS, "--phases", "examples,coverage,fuzzing",
        "--max-examples", os.environ.get("SANDBOX_ST_EXAMPLES", "5"),
        "--seed", os.environ.get("SANDBOX_ST_SEED", "20261129"),
        "--workers", "1", "--generation-database", "none", "--no-color",
        "--request-timeout", "60", *selection,
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)


# Two schemathesis runs over every operation (viewer, then admin) against a served product: a few
# minutes on a quiet machine, several times that on a loaded one; the runs' own limit is 900 s.
@pytest.mark.timeout(2000)
def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    make_user, issue_token, tmp_path: Path
) -> None:
    from accounts.caller import Caller
    from vms import commands

    admin = make_user("admin", "st-admin")
    viewer = make_user("viewer", "st-viewer")
    admin_token, viewer_token = issue_token(admin), issue_token(viewer)
    # Something to list, read and act on besides what the run itself creates.
    commands.create(Caller.for_user(admin), name="st-vm", template="linux-small", start_now=False)

    server = Served(tmp_path / "serve.log").wait_ready()
    try:
        request = urllib.request.Request(  # noqa: S310 - our own server on 127.0.0.1
            f"{server.url}/api/v1/schema/",
            headers={"Authorization": f"Bearer {admin_token}", "Accept": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
            schema = json.loads(response.read())
        path = tmp_path / "openapi.json"
        path.write_text(json.dumps(schema))
        runs = {
            # The viewer first: the admin's run may change the viewer's role. Deletes last: a
            # run may revoke its own token or destroy what others use.
            "viewer": _st(path, server.url, viewer_token),
            "admin": _st(path, server.url, admin_token, "--exclude-method", "DELETE"),
            "admin deletes": _st(path, server.url, admin_token, "--include-method", "DELETE"),
        }
    finally:
        server.stop()
    failed = {
        who: run.stdout[-6000:] + run.stderr[-2000:]
        for who, run in runs.items()
        if run.returncode != 0
    }
    assert not failed, "\n\n".join(f"== {who}\n{out}" for who, out in failed.items())
    for run in runs.values():
        assert " passed" in run.stdout  # it did test something
