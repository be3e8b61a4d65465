"""End to end: a real `dvc repro` on a tiny subset in a copy of the repo, real MLflow stores."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from common.runtime import onnx_outputs
from tests.pipeline_fixtures import VENV_BIN, ZOO, run, zoo_runs
from training.checkpoint import load_trained
from training.config import Params
from training.data import Prepared

pytestmark = pytest.mark.slow


def test_export_writes_onnx_to_mlflow_and_the_bentoml_store(pipeline):
    repo, env, _ = pipeline
    record = json.loads((repo / "export/export.json").read_text())
    champion = json.loads((repo / "champion.json").read_text())
    assert record["model_name"] == champion["model"] and record["mlflow_run_id"] == champion["run_id"]
    assert record["parity"]["argmax_disagreements"] == 0 and record["parity"]["images"] == 200
    assert (repo / "export/model.onnx").is_file() and (repo / "export/model.int8.onnx").is_file()
    gate = record["int8_gate"]
    assert gate["int8_accuracy_drop"] <= 0.03 and gate["int8_argmax_agreement"] >= 0.95  # the gate of edit_params
    name, version = record["bentoml_tag"].split(":")
    stored = Path(env["BENTOML_HOME"]) / "models" / name / version
    assert all((stored / name).is_file() for name in ("model.onnx", "model.int8.onnx", "reference.npz"))
    ood = record["ood"]
    assert ood["contrast_dataset"] == "mnist" and record["parity"]["max_relative_ood_score_diff"] <= 1e-2
    for precision in ("fp32", "int8"):
        assert 0.5 < ood[precision]["auroc"] <= 1 and ood[precision]["validation_flagged"] <= 0.1
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    folder = f"onnx/{version}"  # the export's own folder in the run
    logged = {a.path for a in client.list_artifacts(champion["run_id"], folder)}
    assert logged == {f"{folder}/model.onnx", f"{folder}/model.int8.onnx", f"{folder}/reference.npz"}
    metrics = client.get_run(champion["run_id"]).data.metrics
    assert metrics["int8_gate.int8_argmax_agreement"] == pytest.approx(gate["int8_argmax_agreement"])
    assert metrics["ood.int8.auroc"] == pytest.approx(ood["int8"]["auroc"])


def test_an_int8_model_outside_the_gate_fails_the_export_stage(pipeline, tmp_path):
    """The export stage re-run in a copy with a gate no int8 model can pass: it fails, saying why, and
    leaves no int8 file behind."""
    repo, env, _ = pipeline
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy, symlinks=True)
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["export"]["int8"]["max_accuracy_drop"] = -1.0
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = subprocess.run(
        [str(VENV_BIN / "dvc"), "repro", "export"], cwd=copy, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode != 0
    assert re.search(
        r"the int8 model fails the gate on 200 test images: accuracy \S+ against fp32", done.stderr + done.stdout
    )
    assert not (copy / "export/model.int8.onnx").exists()


def test_a_run_exported_again_keeps_the_files_its_registered_version_holds(pipeline, tmp_path):
    """The challenger's run exported again (another student: distill.temperature changed) logs its files beside
    the first export's, so the registered champion's files still download and match their checksums when the
    gate weighs the new export against them (in a copy logging to the same artifact store)."""
    repo, env, _ = pipeline
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy, symlinks=True)
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["distill"]["temperature"] = 4.0
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = run([str(VENV_BIN / "dvc"), "repro", "gate"], copy, env)
    assert "Running stage 'distill'" in log and "Running stage 'gate'" in log
    first, again = (json.loads((root / "export/export.json").read_text()) for root in (repo, copy))
    assert again["bentoml_tag"] != first["bentoml_tag"]
    gate = json.loads((copy / "champion.json").read_text())["gate"]
    assert gate["champion"]["version"] == 1 and gate["champion"]["accuracy"]  # downloaded, verified and scored
    client = MlflowClient(f"sqlite:///{copy / 'mlflow.db'}")
    folders = {a.path for a in client.list_artifacts(first["mlflow_run_id"], "onnx")}
    assert folders == {f"onnx/{record['bentoml_tag'].split(':')[1]}" for record in (first, again)}


def test_repro_writes_every_output(pipeline):
    repo, _, log = pipeline
    for path in [
        "dvc.lock",
        "champion.json",
        "reports/report.md",
        "data/prepared/dataset.npz",
        "data/prepared/card.json",
        "data/prepared/samples.png",
    ]:
        assert (repo / path).is_file(), path
    for model in ZOO:
        assert (repo / f"models/{model}/weights.pt").is_file()
        metrics = json.loads((repo / f"metrics/{model}.json").read_text())
        assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["parameters"] > 0
        assert (repo / f"plots/predictions/{model}.csv").read_text().count("\n") == 201
        assert (repo / f"reports/evaluation/{model}/confusion_matrix.png").stat().st_size > 1000
    card = json.loads((repo / "data/prepared/card.json").read_text())
    assert card["images"] == {"train": 450, "val": 50, "test": 200}
    assert sum(card["per_class"]["test"].values()) == 200
    assert "epoch 1/1" in log  # one line per epoch in logs


def test_select_writes_the_pipeline_report(pipeline):
    """The report: every model in the table, the champion's figures, in MLflow and in `dvc plots show`."""
    repo, env, _ = pipeline
    report = (repo / "reports/report.md").read_text()
    champion = json.loads((repo / "champion.json").read_text())
    assert f"Champion: **{champion['model']}**" in report
    assert all(f"| {model}" in report for model in ZOO)
    figures = {"accuracy.png", "curves.png", "per_class.png", "confusion_matrix.png", "mistakes.png"}
    assert {p.name for p in (repo / "reports/figures").iterdir()} == figures
    assert all(f"(figures/{name})" in report for name in figures)  # links that work beside the markdown
    assert report.count("| T-shirt/top |") == 1  # the per-class table
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    logged = {a.path for a in client.list_artifacts(champion["run_id"], "pipeline_report/figures")}
    assert logged == {f"pipeline_report/figures/{name}" for name in figures}
    shown = subprocess.run(
        [str(VENV_BIN / "dvc"), "plots", "show", "--json"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    shown = json.loads(shown)
    assert {f"reports/figures/{name}" for name in figures} <= set(shown["data"])
    assert not shown.get("errors")  # every plot loads, the confusion data and curves included


def test_champion_is_the_best_on_validation_and_registered(pipeline):
    repo, *_ = pipeline
    champion = json.loads((repo / "champion.json").read_text())
    metrics = {m: json.loads((repo / f"metrics/{m}.json").read_text()) for m in ZOO}
    best = max(ZOO, key=lambda m: (metrics[m]["val_accuracy"], -metrics[m]["parameters"]))
    assert champion["model"] == best
    distilled = json.loads((repo / "distill.json").read_text())  # the tiny params export the student
    assert champion["test_accuracy"] == distilled["student_test_accuracy"] != metrics[best]["test_accuracy"]
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    version = client.get_model_version_by_alias("fashion-mnist-classifier", "champion")
    assert version.run_id == champion["run_id"]
    assert int(version.version) == champion["version"]


# the champion as MLflow gives it to anyone: its schema, and its answers against the exported file
PYFUNC = """
import json, mlflow, numpy as np
from training.data import Prepared
from common.runtime import onnx_outputs
mlflow.set_tracking_uri("sqlite:///mlflow.db")
model = mlflow.pyfunc.load_model("models:/fashion-mnist-classifier@champion")
images = Prepared.load("data/prepared/dataset.npz").images("test")
answers = model.predict(images)["probabilities"]
expected = onnx_outputs("export/model.onnx", images)["probabilities"]
try:
    model.predict(images[:, 0])
    refused = "accepted"
except mlflow.exceptions.MlflowException as exc:
    refused = str(exc).splitlines()[-1]
print(json.dumps({
    "inputs": str(model.metadata.get_input_schema()),
    "outputs": str(model.metadata.get_output_schema()),
    "same": bool((answers.argmax(1) == expected.argmax(1)).all() and np.abs(answers - expected).max() < 1e-6),
    "refused": refused,
}))
"""


def test_the_challenger_distilled_to_one_view_is_exported_in_its_place(pipeline):
    """The tiny params train with 1-pixel shifts (five views) and take any student (distill.tolerance 100): the
    exported graph is the student's network run once per image, with the student's figures, and its MLflow run
    sits inside the challenger's."""
    repo, *_ = pipeline
    distilled = json.loads((repo / "distill.json").read_text())
    challenger = json.loads((repo / "challenger.json").read_text())
    assert distilled["model"] == challenger["model"] and distilled["teacher_views"] == 5 and distilled["exported"]
    assert [epoch["epoch"] for epoch in distilled["history"]] == [1]
    exported = json.loads((repo / "export/export.json").read_text())
    assert exported["test_time_augmentation"] == "none (distilled from 5 views)"
    assert (exported["val_accuracy"], exported["test_accuracy"]) == (
        distilled["student_val_accuracy"],
        distilled["student_test_accuracy"],
    )
    params = Params.load(repo / "params.yaml")
    card = json.loads((repo / "data/prepared/card.json").read_text())
    student = load_trained(challenger["model"], params, card, repo / "distill/weights.pt")
    images = Prepared.load(repo / "data/prepared/dataset.npz").images("test")
    with torch.no_grad():
        expected = student(torch.from_numpy(images)).numpy()
    assert np.allclose(onnx_outputs(repo / "export/model.onnx", images)["logits"], expected, atol=1e-4)
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    run_ = client.get_run(distilled["run_id"])
    assert run_.info.run_name == f"{challenger['model']}-distilled" and run_.info.status == "FINISHED"
    assert run_.data.tags["mlflow.parentRunId"] == challenger["run_id"]
    assert run_.data.params["distill.epochs"] == "1" and run_.data.metrics["exported"] == 1.0
    assert [m.step for m in client.get_metric_history(run_.info.run_id, "val_accuracy")] == [1]


def test_the_registered_champion_has_a_signature_and_answers_as_served(pipeline):
    repo, env, _ = pipeline
    found = json.loads(run([str(VENV_BIN / "python"), "-c", PYFUNC], repo, env).strip().splitlines()[-1])
    assert found["inputs"] == "['images': Tensor('uint8', (-1, 1, 28, 28))]"
    for output in ("'logits': Tensor('float32', (-1, 10))", "'probabilities': Tensor('float32', (-1, 10))",
                   "'ood_score': Tensor('float32', (-1,))", "'embedding': Tensor('float32', (-1,"):  # fmt: skip
        assert output in found["outputs"]
    assert found["same"], found  # the registry holds what is served
    assert "Shape of input (200, 28, 28) does not match expected shape (-1, 1, 28, 28)" in found["refused"]


def test_one_mlflow_run_per_model_with_curves_metrics_and_artifacts(pipeline):
    repo, *_ = pipeline
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fashion-mnist")
    every_run = client.search_runs([experiment.experiment_id])
    runs = zoo_runs(every_run)
    assert sorted(r.info.run_name for r in runs) == sorted(ZOO)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    card = json.loads((repo / "data/prepared/card.json").read_text())
    champion = json.loads((repo / "champion.json").read_text())
    assert [r.info.run_name for r in every_run if r not in runs] == [f"{champion['model']}-distilled"]
    for r in runs:
        assert r.info.status == "FINISHED"
        assert {"val_accuracy", "train_loss", "best_val_accuracy", "test_accuracy", "test_loss"} <= set(r.data.metrics)
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val_accuracy")] == [1]
        assert r.data.params["train.epochs"] == "1" and r.data.params["model.name"] == r.info.run_name
        assert r.data.tags["git.commit"] == commit
        assert r.data.tags["dvc.stage"] == f"train@{r.info.run_name}"
        assert r.data.tags["dataset.sha256"] == card["sha256"]
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id, "evaluation")}
        assert {
            "evaluation/confusion_matrix.png",
            "evaluation/confusion_matrix.json",
            "evaluation/classification_report.json",
            "evaluation/misclassified.png",
        } <= artifacts
        models = client.search_logged_models(
            [experiment.experiment_id], filter_string=f"source_run_id = '{r.info.run_id}'"
        )
        served = r.info.run_id == champion["run_id"]  # the gate logged the served ONNX model beside PyTorch's
        assert sorted(m.name for m in models) == (["model", "served_model"] if served else ["model"])


def test_second_repro_runs_nothing(pipeline):
    repo, env, _ = pipeline
    log = run([str(VENV_BIN / "dvc"), "repro"], repo, env)
    assert "Data and pipelines are up to date." in log
    assert "Running stage" not in log


def test_an_edit_to_the_service_alone_reruns_no_stage(pipeline):
    """Stages import `training` and `common`, never `serving`: with every serving file edited, each stage is
    still up to date."""
    repo, env, _ = pipeline
    originals = {path: path.read_bytes() for path in (repo / "serving").rglob("*.py")}
    try:
        for path, text in originals.items():
            path.write_bytes(text + b"\n# edited\n")
        log = run([str(VENV_BIN / "dvc"), "status"], repo, env)
        assert "Data and pipelines are up to date." in log, log
    finally:
        for path, text in originals.items():
            path.write_bytes(text)


def test_dvc_exp_run_in_a_temp_copy_logs_to_the_repo_store(pipeline):
    """`dvc exp run --temp` works in .dvc/tmp/exps/...; its runs still land in <repo>/mlflow.db."""
    repo, env, _ = pipeline
    log = run(
        [str(VENV_BIN / "dvc"), "exp", "run", "--temp", "-n", "mnist-quick", "-S", "data.dataset=mnist"], repo, env
    )
    assert "Ran experiment(s): mnist-quick" in log
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mnist").experiment_id])
    assert sorted(r.info.run_name for r in zoo_runs(runs)) == sorted(ZOO)
    assert {r.data.tags["dvc.experiment"] for r in runs} == {"mnist-quick"}
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))
    # an experiment records the gate's decision and moves no alias (gate.experiment_mode: record)
    assert client.search_registered_models("name = 'mnist-classifier'") == []
    gate = [r.data.tags for r in runs if "gate.decision" in r.data.tags]
    assert [tags["gate.decision"] for tags in gate] == ["recorded"]
    assert "from gate.experiment_mode (a DVC experiment)" in gate[0]["gate.reason"]
