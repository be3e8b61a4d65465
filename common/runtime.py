"""onnxruntime for the service: a deliberate choice of execution provider, warmed before ready."""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort

from common.files import sha256_file
from common.model_store import decode_metadata
from common.probe import METADATA_KEY as PROBE_KEY
from common.probe import probe_images, probe_mismatch

log = logging.getLogger("bentoml.serving")  # shown by BentoML's log config

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
INPUT_NAME = "images"  # the exported graph's input and outputs, as training/export.py names them
OUTPUT_NAMES = ("logits", "probabilities", "ood_score", "embedding")


def gpu_present() -> bool:
    """onnxruntime-gpu lists CUDA even where there is no GPU; ask the driver instead."""
    if not shutil.which("nvidia-smi"):
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


class ProviderError(RuntimeError):
    """SERVING_DEVICE=cuda, and onnxruntime cannot create its CUDA execution provider here."""


def preload_cuda_libraries() -> None:
    """Make the CUDA and cuDNN libraries of the nvidia wheels (CUDA torch's, or onnxruntime-gpu's cuda
    extras) visible to onnxruntime, which otherwise looks only on the system's library path."""
    ort.preload_dlls()


def cuda_unavailable_reason() -> str | None:
    """Why onnxruntime's CUDA execution provider cannot work here, as precisely as the machine tells, or
    None where nothing stands in its way."""
    if CUDA not in ort.get_available_providers():
        return f"this onnxruntime build ({ort.__version__}) has no CUDA provider: install onnxruntime-gpu"
    if not gpu_present():
        return "no NVIDIA GPU or driver on this machine (`nvidia-smi -L` fails)"
    preload_cuda_libraries()
    capi = os.path.join(os.path.dirname(ort.__file__), "capi")
    try:
        ctypes.CDLL(os.path.join(capi, "libonnxruntime_providers_shared.so"), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(os.path.join(capi, "libonnxruntime_providers_cuda.so"))
    except OSError as exc:  # names the missing library, e.g. libcublasLt.so.12 or libcudnn.so.9
        return f"its library does not load: {exc}"
    return None


def require_cuda() -> None:
    """SERVING_DEVICE=cuda: raise, naming the cause, where the CUDA provider cannot work."""
    reason = cuda_unavailable_reason()
    if reason is not None:
        raise ProviderError(cuda_refusal(reason))


def cuda_refusal(reason: str) -> str:
    return (
        f"SERVING_DEVICE=cuda but onnxruntime cannot create its {CUDA}: {reason}; "
        "not serving on the CPU in its place (SERVING_DEVICE=auto allows that)"
    )


def choose_providers(device: str) -> list:
    """CUDA (with a conv algorithm search that does not stall on new batch sizes) where it can work."""
    if device == "cpu":
        return [CPU]
    cuda_listed = CUDA in ort.get_available_providers()
    if device == "cuda" or (cuda_listed and gpu_present()):
        preload_cuda_libraries()
        return [(CUDA, {"cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": True}), CPU]
    if cuda_listed:
        log.warning("onnxruntime lists %s but no GPU is present: serving on %s", CUDA, CPU)
    return [CPU]


def choose_precision(requested: str, device: str, available: list[str]) -> str:
    """SERVING_PRECISION resolved: auto is int8 on the CPU and fp32 on CUDA, whose provider does not run
    QDQ int8 graphs on the GPU; a model saved without an int8 file serves fp32."""
    on_cuda = device == "cuda" or (device == "auto" and CUDA in ort.get_available_providers() and gpu_present())
    if requested == "auto":
        return "int8" if "int8" in available and not on_cuda else "fp32"
    if requested == "int8" and on_cuda:
        raise ProviderError(
            "SERVING_PRECISION=int8 on CUDA: onnxruntime's CUDA provider does not run QDQ int8 graphs; "
            "use SERVING_PRECISION=fp32 on the GPU, or SERVING_DEVICE=cpu for int8"
        )
    if requested not in available:
        raise ModelFileError(f"SERVING_PRECISION={requested}: this model has only {', '.join(available)}")
    return requested


class Columns:
    """Where each output sits in a row of OnnxClassifier.outputs: logits, probabilities, score, embedding."""

    def __init__(self, classes: int):
        self.classes = classes

    def logits(self, rows: np.ndarray) -> np.ndarray:
        return rows[:, : self.classes]

    def probabilities(self, rows: np.ndarray) -> np.ndarray:
        return rows[:, self.classes : 2 * self.classes]

    def ood_score(self, rows: np.ndarray) -> np.ndarray:
        return rows[:, 2 * self.classes]

    def embedding(self, rows: np.ndarray) -> np.ndarray:
        return rows[:, 2 * self.classes + 1 :]


class ModelFileError(RuntimeError):
    """The model file is missing, altered since export, or not a model onnxruntime can load."""


class ProbeError(ModelFileError):
    """The model file does not answer its probe batch as it did at export."""


def verified_model_file(path: str, expected_sha256: str | None) -> str:
    """Refuse to serve a model file that is missing or differs from the one the export stage wrote."""
    if not os.path.isfile(path):
        raise ModelFileError(f"model file {path} is missing: re-run the export stage (`dvc repro export`)")
    if expected_sha256 is None:
        log.warning("no checksum recorded for %s: its integrity is not verified", path)
    elif (actual := sha256_file(path)) != expected_sha256:
        raise ModelFileError(
            f"model file {path} is corrupt: sha256 {actual} differs from {expected_sha256} "
            "recorded at export; re-run the export stage (`dvc repro export`)"
        )
    return path


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # idle intra-op threads sleep instead of spinning: workers share the CPUs with the HTTP event loops
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxClassifier:
    """An exported model file on onnxruntime: uint8 images [N,1,28,28] in, class probabilities out.

    `device` as SERVING_DEVICE takes it: with "cuda" the CUDA provider must be created or the model refuses
    to load (ProviderError) rather than run on the CPU in its place; with "auto" it falls back to the CPU,
    says so in the log, and keeps the reason in `fallback`.
    """

    def __init__(
        self,
        path: str,
        device: str = "auto",
        threads: int | None = None,
        expected_sha256: str | None = None,
        bulk: tuple[int, int] | None = None,
    ):
        """`bulk` = (threads, above): on the CPU, batches of more than `above` images run on a second session
        with that many intra-op threads (a large request runs alone; small batches share the CPUs)."""
        threads = threads or os.cpu_count() or 1
        providers = choose_providers(device)
        ort.set_default_logger_severity(4)  # a CUDA provider that fails to load is reported below, once
        try:
            self.session = ort.InferenceSession(
                verified_model_file(path, expected_sha256), session_options(threads), providers=providers
            )
        except ModelFileError:
            raise
        except Exception as exc:  # onnxruntime's own errors for files that are not valid models
            raise ModelFileError(f"model file {path} cannot be loaded by onnxruntime: {exc}") from None
        finally:
            ort.set_default_logger_severity(2)  # onnxruntime's default: warnings
        self.provider = self.session.get_providers()[0]
        self.fallback: str | None = None
        if providers[0] != CPU and self.provider != CUDA:
            reason = cuda_unavailable_reason() or "onnxruntime did not create it (`make doctor` shows more)"
            if device == "cuda":
                raise ProviderError(cuda_refusal(reason))
            self.fallback = f"{CUDA} unavailable ({reason}): serving on {self.provider}"
            log.warning("%s", self.fallback)
        self.bulk_session, self.bulk_above = self.session, 0
        if bulk is not None and bulk[0] != threads and self.provider == CPU:
            self.bulk_session = ort.InferenceSession(path, session_options(bulk[0]), providers=[CPU])
            self.bulk_above = bulk[1]
        log.info(
            "onnxruntime %s on %s, %d intra-op threads%s",
            ort.__version__,
            self.provider,
            threads,
            f" ({bulk[0]} for batches over {bulk[1]} images)" if bulk and self.bulk_above else "",
        )
        self.metadata = decode_metadata(self.session.get_modelmeta().custom_metadata_map)
        spec = self.metadata["input_spec"]
        self.input_name = spec["name"]
        self.image_shape = tuple(spec["shape"][1:])
        self.class_names: list[str] = self.metadata["class_names"]
        self.precision: str = self.metadata.get("precision", "fp32")
        given = {output.name for output in self.session.get_outputs()}
        if not given >= set(OUTPUT_NAMES) or "ood_threshold" not in self.metadata:
            raise ModelFileError(
                f"model file {path} has no out-of-distribution score (outputs {sorted(given)}): it was exported "
                "before the service scored inputs; export it again (`dvc repro export`)"
            )
        self.ood_threshold = float(self.metadata["ood_threshold"])
        self.columns = Columns(len(self.class_names))
        self.check_probe(path)

    def check_probe(self, path: str) -> None:
        """Refuse a file that does not answer its probe batch as it did at export (common.probe)."""
        recorded = self.metadata.get(PROBE_KEY)
        if recorded is None:
            log.warning("%s records no probe batch: its answers on this machine are not checked", path)
            return
        rows = self.outputs(probe_images(recorded))
        mismatch = probe_mismatch(recorded, self.columns.probabilities(rows), self.columns.ood_score(rows))
        if mismatch is not None:
            raise ProbeError(f"model file {path} does not answer its probe batch as at export: {mismatch}")

    def outputs(self, images: np.ndarray) -> np.ndarray:
        """Every output for each image, one row each (`self.columns` tells them apart), from one run of the graph:
        one array is what the batcher slices among the requests of a batch."""
        session = self.bulk_session if self.bulk_above and len(images) > self.bulk_above else self.session
        logits, probabilities, score, embedding = session.run(list(OUTPUT_NAMES), {self.input_name: images})
        return np.concatenate([logits, probabilities, score[:, None], embedding], axis=1)

    def out_of_distribution(self, rows: np.ndarray) -> np.ndarray:
        """Whether each output row's out-of-distribution score is past this model's threshold."""
        return self.columns.ood_score(rows) > self.ood_threshold

    def warm_up(self, max_batch_size: int, max_request_images: int = 0) -> None:
        """Run every batch size the batcher can form, and the largest request, so none pays a first-call
        cost while serving."""
        sizes = [*range(1, max_batch_size + 1), *([max_request_images] if max_request_images > max_batch_size else [])]
        for size in sizes:
            self.outputs(np.zeros((size, *self.image_shape), dtype=np.uint8))


def onnx_outputs(path: Path, images: np.ndarray, batch_size: int = 1000) -> dict[str, np.ndarray]:
    """Every output of an exported graph for `images`, from onnxruntime on the CPU as the service runs it."""
    session = ort.InferenceSession(str(path), providers=[CPU])
    batches = [
        session.run(list(OUTPUT_NAMES), {INPUT_NAME: images[i : i + batch_size]})
        for i in range(0, len(images), batch_size)
    ]
    return {name: np.concatenate([b[k] for b in batches]) for k, name in enumerate(OUTPUT_NAMES)}
