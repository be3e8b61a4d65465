"""`make doctor`: what this machine offers the served model, for a user on any machine: torch and its CUDA
device, onnxruntime and its providers, what SERVING_DEVICE and SERVING_PRECISION resolve to here, and a
3-second throughput probe of every provider and precision that can run."""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort

from common.model_store import MODEL_FILES, ModelMissingError
from common.runtime import CPU, CUDA, ModelFileError, OnnxClassifier, choose_precision, cuda_unavailable_reason
from serving.settings import ServingSettings

PROBE_SECONDS = 3.0
PROBE_BATCHES = (1, 64)


def torch_line() -> str:
    try:
        import torch
    except ImportError:
        return "torch: not installed (a bento serves without it)"
    if torch.cuda.is_available():
        return f"torch {torch.__version__}: CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}"
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
    return f"torch {torch.__version__} ({build}): no CUDA device"


def probe(model: OnnxClassifier, batch: int, seconds: float) -> float:
    """Images per second at `batch`, over `seconds` of back-to-back calls after one warm-up call."""
    images = np.zeros((batch, *model.image_shape), dtype=np.uint8)
    model.outputs(images)
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        model.outputs(images)
        calls += 1
    return calls * batch / elapsed


def main() -> None:
    import bentoml  # after the quick lines: its import takes a few seconds

    print(torch_line())
    print(f"onnxruntime {ort.__version__}: providers listed {', '.join(ort.get_available_providers())}")
    cuda_problem = cuda_unavailable_reason()
    print(f"{CUDA}: {'usable' if cuda_problem is None else 'unusable, ' + cuda_problem}")
    try:
        settings = ServingSettings.from_env()
        stored = bentoml.models.get(settings.model_tag)
    except ModelMissingError as exc:
        print(f"served model: {exc}")
        return
    except bentoml.exceptions.NotFound:
        print(f"served model {settings.model_tag}: not in the BentoML store; `make run` trains and exports one")
        return
    metadata = stored.info.metadata
    files = {p: (stored.path_of(name), str(metadata[key])) for p, (name, key) in MODEL_FILES.items() if key in metadata}
    print(f"served model {stored.tag}: {', '.join(files)} files")
    try:
        precision = choose_precision(settings.precision, settings.device, list(files))
        path, checksum = files[precision]
        served = OnnxClassifier(path, settings.device, settings.threads, checksum)
        print(
            f"SERVING_DEVICE={settings.device} SERVING_PRECISION={settings.precision}: serves {precision} on "
            f"{served.provider}" + (f" ({served.fallback})" if served.fallback else "")
        )
    except (ModelFileError, RuntimeError) as exc:
        print(f"SERVING_DEVICE={settings.device} SERVING_PRECISION={settings.precision}: refuses to serve: {exc}")
    usable = [("cpu", CPU)] + ([("cuda", CUDA)] if cuda_problem is None else [])
    print(f"\n{PROBE_SECONDS:.0f}-second probes, {settings.threads} intra-op threads (images/s):")
    print("| provider | precision | " + " | ".join(f"batch {b}" for b in PROBE_BATCHES) + " |")
    print("|---|---|" + "---:|" * len(PROBE_BATCHES))
    for device, provider in usable:
        for precision, (path, checksum) in files.items():
            if device == "cuda" and precision == "int8":
                continue  # the CUDA provider does not run QDQ int8 graphs
            model = OnnxClassifier(path, device, settings.threads, checksum)
            rates = [probe(model, batch, PROBE_SECONDS / len(PROBE_BATCHES)) for batch in PROBE_BATCHES]
            print(f"| {provider} | {precision} | " + " | ".join(f"{rate:,.0f}" for rate in rates) + " |")


if __name__ == "__main__":
    main()
