"""The service's settings: environment variables, each default here and nowhere else, validated once.

`make docs` writes the settings table in docs/serving.md from this class: a field's description is its
documentation, and a default computed at start is described by its factory's docstring.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.cpus import usable_cpus
from common.log_layout import prediction_log_dir, storage_url
from common.model_store import default_model_tag, in_workspace, served_record, workspace_store
from common.preprocess import MAX_IMAGE_PIXELS
from common.registry import CHALLENGER, CHAMPION

MAX_BATCH_IMAGES = 1024  # default of SERVING_MAX_BATCH_IMAGES, also stated in the OpenAPI document
ENV_PREFIX = "SERVING_"
PositiveInt = Annotated[int, Field(ge=1)]


class SettingsError(ValueError):
    """An environment variable the service cannot use; the message names it and what it takes."""


def cpu_count() -> int:
    """one per CPU this process may use (its affinity and cgroup CPU quota)"""
    return usable_cpus()


def threads_per_worker(data: dict[str, Any]) -> int:
    """the usable CPUs shared out among the workers"""
    return max(1, cpu_count() // data["workers"])


def champion_tag() -> str:
    """the tag in champion.json; in a built bento, its model's"""
    return default_model_tag()


def follows_by_default() -> bool:
    """`true` where `make serve` serves champion.json's model, `false` in a built bento and with BENTO_MODEL_TAG"""
    return in_workspace() and not os.environ.get("BENTO_MODEL_TAG")


def tracking_store() -> str | None:
    """the workspace's `sqlite:///<repo>/mlflow.db` where it exists"""
    return workspace_store()


def served_registered_model() -> str | None:
    """champion.json's `registered_model`"""
    return served_record().get("registered_model")


def served_alias() -> str:
    """champion.json's `alias` (params.yaml's `mlflow.alias`), else `champion`"""
    return served_record().get("alias") or CHAMPION


class ServingSettings(BaseSettings):
    """Read from `SERVING_<NAME>` environment variables (and `BENTO_MODEL_TAG`) when the service starts."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_ignore_empty=True, frozen=True, extra="ignore", protected_namespaces=()
    )

    model_tag: str = Field(
        default_factory=champion_tag,
        validation_alias="BENTO_MODEL_TAG",
        description="the BentoML model served: the champion, as the gate stage or `make rollback` chose it",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="`auto`: the CUDA execution provider where a GPU really works, else the CPU, saying why in one "
        "warning and in `GET /model`'s `provider_fallback`; `cpu`; `cuda`: the CUDA provider or no service at all",
    )
    precision: Literal["auto", "fp32", "int8"] = Field(
        "auto",
        description="`auto`: int8 on the CPU, fp32 on CUDA (whose provider does not run QDQ int8 graphs); "
        "`fp32`; `int8`",
    )
    workers: PositiveInt = Field(default_factory=cpu_count, description="service processes")
    threads: PositiveInt = Field(
        default_factory=threads_per_worker,
        description="onnxruntime intra-op threads per worker: more than CPUs in all made the p99 (`make bench-sweep`)",
    )
    bulk_threads: PositiveInt = Field(
        default_factory=cpu_count,
        description="threads of the second onnxruntime session that runs a request of more images than an "
        "adaptive batch holds",
    )
    max_batch_size: PositiveInt = Field(64, description="images per adaptive batch (one onnxruntime call)")
    max_batch_images: PositiveInt = Field(MAX_BATCH_IMAGES, description="images in one `/predict_batch` request")
    max_body_bytes: PositiveInt = Field(
        16 * 1024 * 1024, description="request body size; a larger one gets 413 before it is read"
    )
    max_header_bytes: PositiveInt = Field(
        16 * 1024,
        description="request line and headers, in all; more gets 431 before the body is read, on every route",
    )
    max_image_pixels: PositiveInt = Field(
        MAX_IMAGE_PIXELS, description="width x height of an upload; a larger one is refused before it is decoded"
    )
    timeout_s: PositiveInt = Field(60, description="seconds a request may queue before it is refused")
    top_k: PositiveInt = Field(3, description="classes in each prediction's `top_k`")
    trace_requests: bool = Field(
        False,
        description="OpenTelemetry spans for the prediction routes: a third of the throughput, and they go "
        "nowhere until BentoML's tracing exporter is configured",
    )
    prediction_log: bool = Field(
        True, description="one record per prediction in the prediction log (docs/monitoring.md)"
    )
    prediction_log_dir: Path = Field(
        default_factory=prediction_log_dir,
        description="the prediction log's folder: each worker writes its own files in it",
    )
    prediction_log_inputs: bool = Field(
        True, description="the 28x28 model input (784 bytes) in each record, for feedback to become training data"
    )
    prediction_log_queue: PositiveInt = Field(
        10_000,
        description="requests a worker holds in memory until their file closes (the open file's, about 1.5 kB "
        "each, and the one closing's: more than SERVING_PREDICTION_LOG_FILE_S of its traffic); past that they are "
        "dropped, and counted",
    )
    prediction_log_max_mb: PositiveInt = Field(
        1024, description="the log's size, all workers together; the oldest records are deleted past it"
    )
    prediction_log_max_days: PositiveInt = Field(30, description="records older than this are deleted")
    prediction_log_file_s: float = Field(
        2.0,
        gt=0,
        description="seconds a worker's log file stays open: after it closes (and is uploaded) other replicas and "
        "hosts read it, and a prediction can be labelled through any replica",
    )
    prediction_log_bucket: str | None = Field(
        default_factory=storage_url,
        description="the bucket the closed log files go to, under `prediction-log/` (the endpoint and keys: "
        "AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)",
    )
    feedback_token: SecretStr | None = Field(
        None,
        description="the bearer token POST /feedback requires; unset, feedback is refused (403): it becomes "
        "training data, so nobody may write it anonymously",
    )
    follow_registry: bool = Field(
        default_factory=follows_by_default,
        description="each worker watches the registry's champion alias and swaps to the version it names, with no "
        "restart (docs/serving.md); a built bento serves the model it packages unless this is set",
    )
    tracking_uri: str | None = Field(
        default_factory=tracking_store,
        validation_alias="MLFLOW_TRACKING_URI",
        description="the MLflow tracking server or store whose registry the service follows",
    )
    registered_model: str | None = Field(
        default_factory=served_registered_model, description="the registered model whose aliases the service follows"
    )
    champion_alias: str = Field(default_factory=served_alias, description="the alias of the version served")
    challenger_alias: str = Field(
        CHALLENGER, description="the alias of a version tried on live traffic beside the champion (shadow)"
    )
    registry_poll_s: Annotated[float, Field(gt=0)] = Field(5.0, description="seconds between two looks at the aliases")
    shadow_share: Annotated[float, Field(ge=0, le=100)] = Field(
        100.0,
        description="percent of requests the challenger also answers, off the request path, at the lowest CPU "
        "priority; 0 turns shadowing off",
    )
    shadow_queue: PositiveInt = Field(
        1000, description="requests waiting for the challenger; past that they are not shadowed, and counted"
    )
    access_log: bool = Field(
        False,
        description="BentoML's access log line for every request, a tenth of the event loop's time under load; "
        "refused requests are logged either way, with the reason",
    )

    @classmethod
    def from_env(cls) -> ServingSettings:
        """The settings, or a SettingsError naming the first variable the service cannot use."""
        try:
            return cls()
        except ValidationError as exc:
            first = exc.errors()[0]
            raise SettingsError(f"{env_name(str(first['loc'][0]))}={first['input']!r}: {first['msg']}") from None


def env_name(field: str) -> str:
    """The environment variable that sets settings field `field`."""
    alias = ServingSettings.model_fields[field].validation_alias
    return alias if isinstance(alias, str) else ENV_PREFIX + field.upper()
