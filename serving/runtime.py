"""onnxruntime for the service: a deliberate choice of execution provider, warmed before ready."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess

import numpy as np
import onnxruntime as ort

from serving.files import sha256_file
from serving.model_store import decode_metadata

log = logging.getLogger("bentoml.serving")  # shown by BentoML's log config

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def gpu_present() -> bool:
    """onnxruntime-gpu lists CUDA even where there is no GPU; ask the driver instead."""
    if not shutil.which("nvidia-smi"):
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def choose_providers(device: str) -> list:
    """CUDA (with a conv algorithm search that does not stall on new batch sizes) where it can work."""
    if device == "cpu":
        return [CPU]
    cuda_listed = CUDA in ort.get_available_providers()
    if device == "cuda" or (cuda_listed and gpu_present()):
        return [(CUDA, {"cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": True}), CPU]
    if cuda_listed:
        log.warning("onnxruntime lists %s but no GPU is present: serving on %s", CUDA, CPU)
    return [CPU]


class ModelFileError(RuntimeError):
    """The model file is missing, altered since export, or not a model onnxruntime can load."""


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


class OnnxClassifier:
    """The exported model: uint8 images [N,1,28,28] in, class probabilities out."""

    def __init__(self, path: str, device: str = "auto", threads: int | None = None, expected_sha256: str | None = None):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        # idle intra-op threads sleep instead of spinning: workers share the CPUs with the HTTP event loops
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = choose_providers(device)
        ort.set_default_logger_severity(4)  # a CUDA provider that fails to load is reported below, once
        try:
            self.session = ort.InferenceSession(
                verified_model_file(path, expected_sha256), options, providers=providers
            )
        except ModelFileError:
            raise
        except Exception as exc:  # onnxruntime's own errors for files that are not valid models
            raise ModelFileError(f"model file {path} cannot be loaded by onnxruntime: {exc}") from None
        finally:
            ort.set_default_logger_severity(2)  # onnxruntime's default: warnings
        self.provider = self.session.get_providers()[0]
        if providers[0] != CPU and self.provider != CUDA:
            log.warning("%s could not be loaded (CUDA or cuDNN libraries missing?): serving on %s", CUDA, self.provider)
        log.info(
            "onnxruntime %s on %s, %d intra-op threads", ort.__version__, self.provider, options.intra_op_num_threads
        )
        self.metadata = decode_metadata(self.session.get_modelmeta().custom_metadata_map)
        spec = self.metadata["input_spec"]
        self.input_name = spec["name"]
        self.image_shape = tuple(spec["shape"][1:])
        self.class_names: list[str] = self.metadata["class_names"]

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(["probabilities"], {self.input_name: images})[0]

    def warm_up(self, max_batch_size: int) -> None:
        """Run every batch size the batcher can form, so none pays a first-call cost while serving."""
        for size in range(1, max_batch_size + 1):
            self.probabilities(np.zeros((size, *self.image_shape), dtype=np.uint8))
