"""select stage: the challenger by **validation** accuracy (ties: fewer parameters), never test accuracy, for
the export and gate stages to weigh against the served champion; the pipeline report, logged to its run."""

import logging

from common.files import read_json, write_json
from pipelines._stage import run
from training import tracking
from training.config import (
    CHALLENGER_FILE,
    CURVES_DIR,
    EVALUATION_DIR,
    METRICS_DIR,
    REPORT_FIGURES_DIR,
    REPORT_FILE,
    Params,
    summary_path,
)
from training.report import read_curve, write_report
from training.selection import challenger_record, choose_champion, comparison_table

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
    tracking.log_report(champion["run_id"], REPORT_FILE, REPORT_FIGURES_DIR)
    record = challenger_record(champion, params.data.spec.name)
    write_json(record, CHALLENGER_FILE)
    log.info(
        "challenger: %s (val_acc %.4f, test_acc %.4f); report: %s\n%s",
        record["model"],
        record["val_accuracy"],
        record["test_accuracy"],
        REPORT_FILE,
        comparison_table(rows, record["model"]),
    )


if __name__ == "__main__":
    run(main)
