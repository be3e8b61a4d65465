"""The OpenAPI document is as strict as the service: schemathesis, with all its checks, against a real
`bentoml serve` finds no 5xx, no response off the document, and no request the document allows refused."""

import subprocess
from pathlib import Path

import pytest

from tests.pipeline_fixtures import VENV_BIN
from tests.serving_fixtures import serving

pytestmark = pytest.mark.slow


TOKEN = "schemathesis-feedback-token"


def test_schemathesis_with_all_checks_finds_nothing(served_model, tmp_path):
    with serving(served_model, tmp_path / "serve.log", SERVING_FEEDBACK_TOKEN=TOKEN) as server:
        done = subprocess.run(
            [
                str(VENV_BIN / "schemathesis"),
                "--config-file",
                str(Path(__file__).with_name("schemathesis.toml")),
                "run",
                f"{server.url}/docs.json",
                "--max-examples",
                "30",
                "--seed",
                "1",
                "--generation-database",
                "none",
                "--request-timeout",
                "60",
                "--no-color",
                "--header",
                f"Authorization: Bearer {TOKEN}",  # the document declares the bearer scheme; its checks drop it too
            ],
            capture_output=True,
            text=True,
            timeout=900,
            cwd=tmp_path,  # its cache folder goes there, not into the repo
        )
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-2000:]
    assert "passed" in done.stdout and "POST /feedback" not in done.stdout.split("WARNINGS")[-1]
