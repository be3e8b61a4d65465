"""select stage: the champion by validation accuracy, the MLflow registry alias, the pipeline report."""
import logging

import mlflow
from mlflow import MlflowClient

from pipelines._stage import run
from training import tracking
from training.checkpoint import read_json, summary_path, write_json
from training.config import (CHAMPION_FILE, CURVES_DIR, EVALUATION_DIR, METRICS_DIR, REPORT_FIGURES_DIR,
                             REPORT_FILE, dataset_spec, experiment_name, load_params, registered_model_name)
from training.report import read_curve, write_report
from training.selection import choose_champion, comparison_table

log = logging.getLogger("select")


def main() -> None:
    params = load_params()
    rows = [{**read_json(summary_path(name)), **read_json(METRICS_DIR / f"{name}.json")} for name in params["zoo"]]
    champion = choose_champion(rows)
    curves = {name: read_curve(CURVES_DIR / f"{name}.csv") for name in params["zoo"]}
    write_report(f"{dataset_spec(params).name}: pipeline report", rows, champion, curves,
                          EVALUATION_DIR / champion["model"], REPORT_FILE, REPORT_FIGURES_DIR)

    tracking.setup(experiment_name(params))
    name = registered_model_name(params)
    version = mlflow.register_model(champion["model_uri"], name, tags={
        "val_accuracy": f"{champion['val_accuracy']:.4f}", "test_accuracy": f"{champion['test_accuracy']:.4f}",
    })
    client = MlflowClient()
    client.set_registered_model_alias(name, params["mlflow"]["alias"], version.version)
    client.set_tag(champion["run_id"], "champion", "true")
    # next to the champion's own evaluation, in the run people open first; the report's links still work there
    client.log_artifact(champion["run_id"], str(REPORT_FILE), "pipeline_report")
    client.log_artifacts(champion["run_id"], str(REPORT_FIGURES_DIR), f"pipeline_report/{REPORT_FIGURES_DIR.name}")

    write_json({
        "model": champion["model"],
        "dataset": dataset_spec(params).name,
        "run_id": champion["run_id"],
        "val_accuracy": champion["val_accuracy"],
        "test_accuracy": champion["test_accuracy"],
        "parameters": champion["parameters"],
        "registered_model": name,
        "version": int(version.version),
        "alias": params["mlflow"]["alias"],
    }, CHAMPION_FILE)
    log.info("champion: %s (val_acc %.4f, test_acc %.4f), %s version %s alias %r; report: %s\n%s",
             champion["model"], champion["val_accuracy"], champion["test_accuracy"], name, version.version,
             params["mlflow"]["alias"], REPORT_FILE, comparison_table(rows, champion["model"]))


if __name__ == "__main__":
    run(main)
