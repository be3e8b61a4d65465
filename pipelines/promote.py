"""`make promote`: the challenger tried on live traffic (the registry's `challenger` alias, which the service
shadows) becomes the champion when the live evidence meets params.yaml's `promote` rule: at least
`min_labels` labelled predictions that both models answered, on which the challenger is not worse (more than
`tolerance` points lost, where McNemar's test finds the loss significant at `alpha`). Otherwise nothing moves
and it says why, with the figures (exit status 1). A promotion moves `champion` to the challenger and
`previous` to the old champion, removes the `challenger` alias, restores the version into the BentoML store
and rewrites champion.json: a running service that follows the registry serves it within seconds."""

from __future__ import annotations

import argparse
import logging
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import mlflow

from common.files import write_json
from common.log_layout import CHALLENGER
from common.log_queries import LOG_DIR_HELP, default_location, location, read_feedback, read_predictions
from common.model_source import restore_model
from common.model_store import STORED_FILES
from monitoring.shadow import COMPARED, live_comparison
from pipelines._stage import run
from training import registry, tracking
from training.config import CHAMPION_FILE, Params
from training.errors import PipelineError

log = logging.getLogger("promote")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-dir", type=location, help=LOG_DIR_HELP)
    args = parser.parse_args()
    log_dir = args.log_dir or default_location()
    params = Params.load()
    name, alias, rule = params.registered_model_name, params.mlflow.alias, params.promote
    tracking.setup(params.experiment_name)
    champion, challenger = registry.by_alias(name, alias), registry.by_alias(name, registry.CHALLENGER)
    if champion is None or challenger is None or challenger.version == champion.version:
        raise PipelineError(
            f"nothing to promote: {name} has no {registry.CHALLENGER!r} alias apart from its {alias!r} in "
            f"{tracking.shown_uri()} (`make retrain` places one, with gate.mode shadow)"
        )
    answered = [r for r in read_predictions(log_dir, columns=COMPARED) if r["model_version"] == str(champion.version)]
    tried = read_predictions(log_dir, role=CHALLENGER, columns=COMPARED)
    evidence, paired = live_comparison(answered, tried, read_feedback(log_dir), str(challenger.version))
    labelled = 0 if paired is None else paired.images
    if paired is None or labelled < rule.min_labels:
        raise PipelineError(
            f"not promoted: version {challenger.version} and champion version {champion.version} both answered "
            f"{evidence['paired_predictions']} predictions in {log_dir}, {labelled} of them labelled; "
            f"promote.min_labels asks for {rule.min_labels}"
        )
    if paired.worse(rule.tolerance, rule.alpha):
        raise PipelineError(
            f"not promoted: on live traffic version {challenger.version} scores {paired.describe()}, "
            f"{paired.loss_points:.2f} points worse (promote.tolerance {rule.tolerance:g}, alpha {rule.alpha:g})"
        )
    when = datetime.now(UTC).isoformat(timespec="seconds")
    reason = (
        f"make promote at {when}: version {challenger.version} on live traffic {paired.describe()}, "
        f"agreement {evidence['agreement']:.2%}"
    )
    registry.promote(name, alias, challenger, champion)
    client = mlflow.MlflowClient()
    client.set_model_version_tag(name, str(challenger.version), "gate.decision", "promoted")
    client.set_model_version_tag(name, str(challenger.version), "promote.reason", reason)
    with tempfile.TemporaryDirectory() as folder:
        restore_model(challenger.bentoml_tag, registry.download(name, challenger, tuple(STORED_FILES), Path(folder)))
    gate = {"decision": "promoted", "reason": reason, "live": evidence}
    write_json({**registry.served_record(name, alias, challenger), "gate": gate}, CHAMPION_FILE)
    log.info("%s: a running service that follows the registry serves it within seconds", reason)


if __name__ == "__main__":
    run(main)
