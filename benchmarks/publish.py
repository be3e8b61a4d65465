"""What every benchmark ends with: its table printed, its results written as JSON for `make docs`, with what
they measured: the git commit, and the served model (BentoML tag, registered version, precision) where the
benchmark served one. A test holds each committed results file to the committed champion.json."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import requests

from benchmarks.local_server import REPO


def git_commit() -> str:
    """The commit the code ran at, `-dirty` where tracked files other than benchmark results differed from it."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    status = ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results"]
    changed = subprocess.run(status, cwd=REPO, capture_output=True)
    return f"{head or 'unknown'}{'-dirty' if changed.stdout.strip() else ''}"


def served_model(url: str) -> dict:
    """The model a running service serves, as its GET /model names it."""
    card = requests.get(f"{url}/model", timeout=10).json()
    return {key: card[key] for key in ("bentoml_tag", "registered_version", "model_version", "precision")}


def publish(results: dict, table: str, path: Path, model: dict | None = None) -> None:
    """Print the table and write the results with what they measured (`model`: what served_model gave)."""
    print(table)
    path.parent.mkdir(parents=True, exist_ok=True)
    measured = {"git_commit": git_commit(), "model": model}
    path.write_text(json.dumps({"measured": measured, **results}, indent=2) + "\n")
    print(f"wrote {path}")
