"""`make rollback`: the registry's champion alias back to `previous` (and `previous` to the promoted version
before that, if any), that version's files restored into the BentoML store, and champion.json naming it: a
running `make serve` follows the alias and serves it within seconds, a restarted one serves it too. The
retired version is tagged `rolled_back`: the gate never promotes that file again. export/ stays what the
export stage last wrote (DVC's output, the challenger), so DVC sees nothing to re-run."""

import logging
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from common.files import write_json
from common.model_source import restore_model
from common.model_store import STORED_FILES
from pipelines._stage import run
from training import registry, tracking
from training.config import CHAMPION_FILE, Params

log = logging.getLogger("rollback")


def main() -> None:
    params = Params.load()
    name, alias = params.registered_model_name, params.mlflow.alias
    tracking.setup(params.experiment_name)
    when = datetime.now(UTC).isoformat(timespec="seconds")
    served, retired = registry.roll_back(name, alias, when)
    with tempfile.TemporaryDirectory() as folder:
        restore_model(served.bentoml_tag, registry.download(name, served, tuple(STORED_FILES), Path(folder)))
    reason = f"make rollback at {when}: version {retired.version} retired, version {served.version} served again"
    record = registry.served_record(name, alias, served)
    write_json({**record, "gate": {"decision": "rolled back", "reason": reason}}, CHAMPION_FILE)
    log.info(
        "%s (%s): a running service that follows the registry swaps to it within seconds", reason, served.bentoml_tag
    )


if __name__ == "__main__":
    run(main)
