"""Export a trained model to one self-contained ONNX file that carries everything serving needs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from training.datasets import IMAGE_SHAPE
from training.errors import PipelineError
from training.progress import progress as progress_of

INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "probabilities")


class ParityError(PipelineError):
    """The exported graph does not compute what the PyTorch model computes."""


class ServingModel(torch.nn.Module):
    """uint8 pixels [N,1,28,28] in; logits and softmax probabilities out. Normalisation is in `net`."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(images)
        return logits, torch.softmax(logits, dim=1)


def input_spec() -> dict:
    return {
        "name": INPUT_NAME,
        "dtype": "uint8",
        "shape": ["N", *IMAGE_SHAPE],
        "range": [0, 255],
        "layout": "grey, light object on a black background, centred, 28x28",
    }


def export_onnx(net: torch.nn.Module, path: Path, metadata: dict[str, object]) -> Path:
    """Write the ONNX file (dynamic batch axis, no external data), stamp metadata, run the full check."""
    model = ServingModel(net.cpu()).eval()
    example = torch.zeros(2, *IMAGE_SHAPE, dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        external_data=False,
        optimize=True,
        input_names=[INPUT_NAME],
        output_names=list(OUTPUT_NAMES),
        dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=1 << 20)}},
    )
    assert program is not None  # dynamo=True always returns the program
    proto = program.model_proto
    props = {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}
    props["input_spec"] = json.dumps(input_spec())
    onnx.helper.set_model_props(proto, props)
    proto.doc_string = f"{metadata.get('model_name', 'model')} image classifier; metadata_props describe it"
    tmp = path.with_suffix(".tmp")
    onnx.save_model(proto, tmp)
    onnx.checker.check_model(str(tmp), full_check=True)
    tmp.replace(path)
    return path


def check_parity(
    net: torch.nn.Module,
    path: Path,
    images: np.ndarray,
    atol: float,
    batch_size: int = 1000,
    progress: bool = False,
) -> tuple[dict[str, float], np.ndarray]:
    """Compare ONNX Runtime (CPU) with PyTorch on every image; raise unless argmax agrees everywhere
    and probabilities differ by at most `atol`. Returns the figures and onnxruntime's probabilities."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    net = net.cpu().eval()
    max_diff, disagreements, outputs = 0.0, 0, []
    starts = range(0, len(images), batch_size)
    for start in progress_of(starts, "parity check", unit="batch") if progress else starts:
        batch = images[start : start + batch_size]
        with torch.no_grad():
            expected = torch.softmax(net(torch.from_numpy(batch)), dim=1).numpy()
        got = session.run(["probabilities"], {INPUT_NAME: batch})[0]
        outputs.append(got)
        max_diff = max(max_diff, float(np.abs(got - expected).max()))
        disagreements += int((got.argmax(1) != expected.argmax(1)).sum())
    result = {"images": len(images), "max_abs_probability_diff": max_diff, "argmax_disagreements": disagreements}
    if disagreements or max_diff > atol:
        raise ParityError(f"ONNX and PyTorch disagree: {result} (tolerance {atol})")
    return result, np.concatenate(outputs)


def onnx_metadata(
    champion: dict, card: dict, upload_fit: int, test_time_augmentation: str, git_commit: str
) -> dict[str, object]:
    """What the exported file says about itself: the service's model card and preprocessing come from here."""
    return {
        "model_name": champion["model"],
        "dataset": card["dataset"],
        "class_names": card["class_names"],
        "upload_fit": upload_fit,
        "mlflow_run_id": champion["run_id"],
        "registered_model": champion["registered_model"],
        "registered_version": champion["version"],
        "git_commit": git_commit,
        "val_accuracy": champion["val_accuracy"],
        "test_accuracy": champion["test_accuracy"],
        "parameters": champion["parameters"],
        "test_time_augmentation": test_time_augmentation,
        "precision": "fp32",
    }
