"""The service's settings: environment variables, each default here and nowhere else, validated once."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from serving.model_store import default_model_tag

MAX_BATCH_IMAGES = 1024  # default of SERVING_MAX_BATCH_IMAGES, also stated in the OpenAPI document
TRUE = ("1", "true", "yes")
FALSE = ("0", "false", "no")


class SettingsError(ValueError):
    """An environment variable the service cannot use; the message names it and what it takes."""


@dataclass(frozen=True)
class ServingSettings:
    model_tag: str  # BENTO_MODEL_TAG: the BentoML model served (default: the tag in export/export.json)
    device: str  # SERVING_DEVICE: auto, cpu or cuda
    precision: str  # SERVING_PRECISION: auto (int8 on the CPU, fp32 on CUDA), fp32 or int8
    workers: int  # SERVING_WORKERS: service processes
    threads: int  # SERVING_THREADS: onnxruntime intra-op threads per worker (default: the CPUs shared out)
    bulk_threads: int  # SERVING_BULK_THREADS: threads for a request of more images than an adaptive batch holds
    max_batch_size: int  # SERVING_MAX_BATCH_SIZE: images per adaptive batch
    max_batch_images: int  # SERVING_MAX_BATCH_IMAGES: images in one /predict_batch request
    max_body_bytes: int  # SERVING_MAX_BODY_BYTES
    max_image_pixels: int  # SERVING_MAX_IMAGE_PIXELS: a larger upload is refused before decoding
    timeout_s: int  # SERVING_TIMEOUT_S: how long a request may queue
    top_k: int  # SERVING_TOP_K: classes in each prediction's top_k
    trace_requests: bool  # SERVING_TRACE_REQUESTS: OpenTelemetry spans for the prediction routes
    access_log: bool  # SERVING_ACCESS_LOG: BentoML's access log line for every request

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ServingSettings:
        cpus = os.cpu_count() or 1

        def integer(name: str, default: int) -> int:
            value = env.get(name, "").strip()
            if not value:
                return default
            if not value.isdigit() or int(value) < 1:
                raise SettingsError(f"{name}={value!r}: expected a whole number of at least 1")
            return int(value)

        def boolean(name: str, default: bool) -> bool:
            value = env.get(name, "").strip().lower()
            if not value:
                return default
            if value not in TRUE + FALSE:
                raise SettingsError(f"{name}={value!r}: expected one of {TRUE + FALSE}")
            return value in TRUE

        device = env.get("SERVING_DEVICE", "auto")
        if device not in ("auto", "cpu", "cuda"):
            raise SettingsError(f"SERVING_DEVICE={device!r}: expected auto, cpu or cuda")
        precision = env.get("SERVING_PRECISION", "auto")
        if precision not in ("auto", "fp32", "int8"):
            raise SettingsError(f"SERVING_PRECISION={precision!r}: expected auto, fp32 or int8")
        workers = integer("SERVING_WORKERS", cpus)
        return cls(
            model_tag=env.get("BENTO_MODEL_TAG") or default_model_tag(),
            device=device,
            precision=precision,
            workers=workers,
            # more threads than CPUs in all made the p99 (benchmarks/serving_sweep.py)
            threads=integer("SERVING_THREADS", max(1, cpus // workers)),
            bulk_threads=integer("SERVING_BULK_THREADS", cpus),
            max_batch_size=integer("SERVING_MAX_BATCH_SIZE", 64),
            max_batch_images=integer("SERVING_MAX_BATCH_IMAGES", MAX_BATCH_IMAGES),
            max_body_bytes=integer("SERVING_MAX_BODY_BYTES", 16 * 1024 * 1024),
            max_image_pixels=integer("SERVING_MAX_IMAGE_PIXELS", 40_000_000),
            timeout_s=integer("SERVING_TIMEOUT_S", 60),
            top_k=integer("SERVING_TOP_K", 3),
            # spans cost a third of the throughput and go nowhere until an exporter is configured
            trace_requests=boolean("SERVING_TRACE_REQUESTS", False),
            # a log line per request costs a tenth of the event loop; refused requests are logged either way
            access_log=boolean("SERVING_ACCESS_LOG", False),
        )
