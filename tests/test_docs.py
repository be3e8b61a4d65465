"""The figures in README.md and docs/ are the ones in their results files, every results file measured the
champion, and the README stays a front door.

The docs are checked as committed (git HEAD), against the results files as committed: `make run` or a benchmark
on another machine rewrites results files with that machine's own figures, and `make test` still passes until
`make docs` and a commit take them in (docs/testing.md)."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from pipelines.docs import BENCHMARK_RESULTS, DOCUMENTS, render, stale_documents
from tests.conftest import REPO

UNSERVED = {"training.json"}  # results of the trainer: no served model in them


@pytest.fixture(scope="module")
def committed(tmp_path_factory) -> Path:
    """The repository as committed: git HEAD's files (the work tree where it is no git checkout)."""
    archive = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=REPO, capture_output=True)
    if archive.returncode != 0:
        return REPO
    folder = tmp_path_factory.mktemp("committed")
    subprocess.run(["tar", "-x", "-C", folder], input=archive.stdout, check=True)
    return folder


def test_every_generated_figure_matches_its_source(committed):
    assert stale_documents(committed) == [], "run `make docs` and commit what it wrote"


def test_every_results_file_measured_the_champion(committed):
    """Each committed benchmark result names the commit it ran at and, where it served a model, that model: the
    champion that champion.json names, so that no figure in the docs is of another model."""
    champion = json.loads((committed / "champion.json").read_text())
    for path in sorted((committed / BENCHMARK_RESULTS).glob("*.json")):
        measured = json.loads(path.read_text()).get("measured")
        assert measured and measured["git_commit"], f"{path.name} does not say what it measured"
        if path.name in UNSERVED:
            continue
        model = measured["model"]
        assert model and model["bentoml_tag"] == champion["bentoml_tag"], (
            f"{path.name} measured {model and model['bentoml_tag']}, not the champion {champion['bentoml_tag']}"
        )


def test_an_altered_figure_is_caught(tmp_path: Path):
    for rel in (*DOCUMENTS, "champion.json", "distill.json", "export/export.json", "dvc.yaml", "params.yaml"):
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
