"""Property-based fuzzing of the live server from its own OpenAPI description (schemathesis):
valid and invalid requests generated from /api/openapi.json must never get a 500, and every
answer must match the description (status documented, body and headers as described)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import clean_env, wait_until
from tests.test_hostile import _get_ok

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
    ]
)


def test_schemathesis_finds_no_server_error_and_no_schema_violation(settings, redis_server, spawn, tmp_path):
    web = spawn("web", settings)
    wait_until(lambda: _get_ok(settings.port), 15, what="web to answer")
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st, "schemathesis is a dev dependency: uv sync installs it"
    run = subprocess.run(
        [
            st,
            "run",
            f"http://127.0.0.1:{settings.port}/api/openapi.json",
            "--checks",
            CHECKS,
            "--max-examples",
            "150",
            "--workers",
            "1",
            "--phases",
            "examples,coverage,fuzzing",
            "--report",
            "junit",
            "--report-dir",
            str(tmp_path / "report"),
        ],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = run.stdout[-4000:]
    print(summary)
    assert run.returncode == 0, summary
    assert "No issues found" in run.stdout
    assert "Traceback" not in web.output()
