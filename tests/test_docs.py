"""The figures in README.md and docs/ are the ones in their results files, and the README stays a front door."""

import json
import shutil
from pathlib import Path

import pytest

from pipelines.docs import DOCUMENTS, render, stale_documents
from tests.conftest import REPO


def test_every_generated_figure_matches_its_source():
    assert stale_documents(REPO) == [], "run `make docs`"


def test_an_altered_figure_is_caught(tmp_path: Path):
    for rel in (*DOCUMENTS, "champion.json", "export/export.json", "dvc.yaml", "params.yaml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, tmp_path / rel)
    for folder in ("metrics", "benchmarks/results", "pipelines"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    assert stale_documents(tmp_path) == []
    champion = json.loads((tmp_path / "champion.json").read_text())
    champion["test_accuracy"] += 0.001  # a tenth of a point: a different figure in the README
    (tmp_path / "champion.json").write_text(json.dumps(champion))
    assert "README.md" in stale_documents(tmp_path)
    shutil.copy(REPO / "champion.json", tmp_path / "champion.json")
    record = json.loads((tmp_path / "export/export.json").read_text())
    record["int8_gate"]["int8_test_accuracy"] -= 0.001  # the served int8 file's figure
    (tmp_path / "export/export.json").write_text(json.dumps(record))
    assert "README.md" in stale_documents(tmp_path)
    params = (tmp_path / "params.yaml").read_text().replace("dense_dropout: 0.3", "dense_dropout: 0.4")
    (tmp_path / "params.yaml").write_text(params)  # a model's option: the zoo table
    assert "docs/pipeline.md" in stale_documents(tmp_path)


def test_an_unknown_block_is_an_error():
    with pytest.raises(KeyError, match="no generator for the block 'typo'"):
        render("<!-- begin: typo -->\n<!-- end: typo -->\n", REPO)


def test_readme_is_a_front_door():
    assert len((REPO / "README.md").read_text().splitlines()) <= 220
    for doc in DOCUMENTS:
        assert (REPO / doc).is_file(), doc
