"""select stage: the champion by **validation** accuracy (ties: fewer parameters), never test accuracy;
registered in the MLflow Model Registry with alias `champion`; the pipeline report, logged to its run."""

import logging

from pipelines._stage import run
from serving.files import read_json, write_json
from training import tracking
from training.config import (
    CHAMPION_FILE,
    CURVES_DIR,
    EVALUATION_DIR,
    METRICS_DIR,
    REPORT_FIGURES_DIR,
    REPORT_FILE,
    Params,
    summary_path,
)
from training.report import read_curve, write_report
from training.selection import champion_record, choose_champion, comparison_table

log = logging.getLogger("select")


def main() -> None:
    params = Params.load()
    rows = [{**read_json(summary_path(name)), **read_json(METRICS_DIR / f"{name}.json")} for name in params.zoo]
    champion = choose_champion(rows)
    curves = {name: read_curve(CURVES_DIR / f"{name}.csv") for name in params.zoo}
    write_report(
        f"{params.data.spec.name}: pipeline report",
        rows,
        champion,
        curves,
        EVALUATION_DIR / champion["model"],
        REPORT_FILE,
        REPORT_FIGURES_DIR,
    )

    tracking.setup(params.experiment_name)
    version = tracking.register_champion(
        champion, params.registered_model_name, params.mlflow.alias, REPORT_FILE, REPORT_FIGURES_DIR
    )
    record = champion_record(
        champion, params.data.spec.name, params.registered_model_name, version, params.mlflow.alias
    )
    write_json(record, CHAMPION_FILE)
    log.info(
        "champion: %s (val_acc %.4f, test_acc %.4f), %s version %s alias %r; report: %s\n%s",
        record["model"],
        record["val_accuracy"],
        record["test_accuracy"],
        record["registered_model"],
        version,
        record["alias"],
        REPORT_FILE,
        comparison_table(rows, record["model"]),
    )


if __name__ == "__main__":
    run(main)
