"""The service follows the registry while it runs: a thread in each worker looks at the registered model's
champion and challenger aliases every SERVING_REGISTRY_POLL_S seconds.

- The champion alias moved (a promotion, `make promote`, `make rollback`): the worker downloads that version's
  file of the precision it serves, checks its sha256, loads it in a new onnxruntime session, warms it, checks
  it on its probe batch, then swaps it in between two batches (serving.served). Any failure keeps the old
  model, counts serving_model_reload_failures_total{alias, reason} and logs one line naming why; that version
  is not tried again until the alias moves elsewhere.
- The challenger alias names a version other than the champion: its file, downloaded and verified the same
  way, runs in the worker's shadow process (serving.shadow); no challenger alias stops shadowing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from common import registry
from common.log_records import ModelName
from common.registry import without_login
from serving.metrics import MODEL_INFO, REGISTRY_ERRORS, RELOAD_FAILURES, SHADOW_DROPPED, SHADOW_FAILURES
from serving.served import ReloadError, ServedModel, fetch_version, load_version
from serving.settings import ServingSettings
from serving.shadow import Shadow

log = logging.getLogger("bentoml.serving")


class Follower:
    """A worker's thread that follows the registered model's aliases, and its shadow process."""

    def __init__(
        self,
        settings: ServingSettings,
        name: str,
        current: Callable[[], ServedModel],
        swap: Callable[[ServedModel], None],
        shadow_log: list[str] | None,
    ):
        """`current()`: the model served now; `swap(model)`: serve another; `shadow_log`: the prediction-log
        options of a shadow process, None where no challenger is to be shadowed."""
        self.settings, self.name = settings, name
        self.current, self.swap = current, swap
        self.shadow = (
            None
            if shadow_log is None
            else Shadow(
                settings.shadow_share,
                settings.shadow_queue,
                settings.max_batch_size,
                shadow_log,
                on_drop=SHADOW_DROPPED.inc,
                on_batch_failure=SHADOW_FAILURES.inc,
                on_ready=self.challenger_ready,
                on_failure=self.challenger_failed,
            )
        )
        self.failed: dict[str, int] = {}  # alias -> the version it names that failed: not tried again
        self.shadowed: int | None = None
        self.unreachable = False
        self.challenger_files = Path(tempfile.mkdtemp(prefix="serving-challenger-"))
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="registry-follower", daemon=True)

    def start(self) -> Follower:
        """Opens MLflow's client, then starts following. The client is imported and its store opened here, before
        the worker reports ready: seconds of CPU that would otherwise be taken from the first requests served."""
        log.info(
            "following %s's %r alias in %s every %g s",
            self.name,
            self.settings.champion_alias,
            without_login(self.settings.tracking_uri or ""),
            self.settings.registry_poll_s,
        )
        if open_client(self.settings.tracking_uri or ""):
            self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join(timeout=30)
        if self.shadow is not None:
            self.shadow.stop()
        shutil.rmtree(self.challenger_files, ignore_errors=True)

    def _run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.poll()
            except Exception:  # never the end of following: the next look tries again
                log.exception("following the registry failed; serving on, and looking again")
            self.stopped.wait(self.settings.registry_poll_s)

    def poll(self) -> None:
        """One look at both aliases, and whatever they ask for."""
        try:
            champion = registry.by_alias(self.name, self.settings.champion_alias)
            challenger = registry.by_alias(self.name, self.settings.challenger_alias) if self.shadow else None
        except Exception as exc:  # an unreachable server, a locked SQLite file: the next look tries again
            REGISTRY_ERRORS.inc()
            if not self.unreachable:
                log.warning("registry unreachable, serving on (%s: %s)", type(exc).__name__, first_line(exc))
            self.unreachable = True
            return
        if self.unreachable:
            log.info("registry reachable again")
            self.unreachable = False
        self.follow_champion(champion)
        if self.shadow is not None:
            self.follow_challenger(self.shadow, challenger, champion)

    def _skip(self, alias: str, version: registry.Version, current: int | None) -> bool:
        """Whether there is nothing to do for `alias`: it names the version in place, or one that failed."""
        if version.version == current:
            self.failed.pop(alias, None)
            return True
        return self.failed.get(alias) == version.version

    def follow_champion(self, version: registry.Version | None) -> None:
        alias, current = self.settings.champion_alias, self.current()
        if version is None or self._skip(alias, version, current.registered_version):
            return
        if current.registered_version is None and version.bentoml_tag == current.tag:
            self.swap(dataclasses.replace(current, registered_version=version.version))  # the same file, now named
            return
        try:
            with tempfile.TemporaryDirectory(prefix="serving-champion-") as folder:
                self.swap(load_version(self.name, version, current, self.settings, Path(folder)))
        except ReloadError as exc:
            self.failed_version(
                alias, version.version, exc.reason, str(exc), f"still serving version {current.version}"
            )

    def follow_challenger(
        self, shadow: Shadow, version: registry.Version | None, champion: registry.Version | None
    ) -> None:
        alias = self.settings.challenger_alias
        if version is not None and champion is not None and version.version == champion.version:
            version = None  # promoted: nothing left to try
        if version is None:
            if self.shadowed is not None:
                shadow.stop()
                log.info("%s alias gone: shadowing stopped", alias)
                self.shadowed = None
            self.failed.pop(alias, None)
            return
        if self._skip(alias, version, self.shadowed):
            return
        precision = self.current().classifier.precision
        folder = self.challenger_files / str(version.version)
        try:
            path = fetch_version(self.name, version, precision, folder)
        except ReloadError as exc:
            self.failed_version(alias, version.version, exc.reason, str(exc), "nothing shadowed")
            return
        checksum = version.sha256(precision) or ""  # fetch_version refuses a version that records none
        shadow.start(ModelName(version.bentoml_tag, str(version.version), precision), path, checksum)
        self.shadowed = version.version
        for old in self.challenger_files.iterdir():
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)

    def challenger_ready(self, model: ModelName) -> None:
        MODEL_INFO.labels("challenger", model.version, model.tag, model.precision).set(1)
        log.info(
            "shadowing challenger version %s (%s) on %g%% of requests",
            model.version,
            model.tag,
            self.settings.shadow_share,
        )

    def challenger_failed(self, model: ModelName, reason: str, message: str) -> None:
        """The shadow process could not load the challenger, or crashed."""
        MODEL_INFO.labels("challenger", model.version, model.tag, model.precision).set(0)
        self.failed_version(self.settings.challenger_alias, int(model.version), reason, message, "nothing shadowed")

    def failed_version(self, alias: str, version: int, reason: str, message: str, outcome: str) -> None:
        self.failed[alias] = version
        RELOAD_FAILURES.labels(alias, reason).inc()
        log.warning(
            "%s version %d (alias %r) not taken (%s): %s; %s",
            self.name,
            version,
            alias,
            reason,
            message,
            outcome,
        )


def first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else ""


def open_client(tracking_uri: str) -> bool:
    """MLflow's client imported and pointed at `tracking_uri`, its store opened (a SQL store checks its schema
    then); False where MLflow is not installed. A store that does not open now is opened again at the first look,
    which reports why."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a log line each, not a bar
    try:
        import mlflow
    except ImportError as exc:
        log.error("not following the registry: MLflow's client is not installed (%s)", exc)
        return False
    mlflow.set_tracking_uri(tracking_uri)
    with contextlib.suppress(Exception):
        mlflow.MlflowClient()
    return True
