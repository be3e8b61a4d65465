"""Export a trained model to one self-contained ONNX file that carries everything serving needs: the class
probabilities, the embedding and its out-of-distribution score, the preprocessing and the metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from common.runtime import INPUT_NAME, OUTPUT_NAMES
from training.datasets import IMAGE_SHAPE
from training.errors import PipelineError
from training.models import TestTimeAugmented
from training.ood import RelativeMahalanobis
from training.progress import progress as progress_of


class ParityError(PipelineError):
    """The exported graph does not compute what the PyTorch model computes."""


class ServingModel(torch.nn.Module):
    """uint8 pixels [N,1,28,28] in; logits, softmax probabilities, the out-of-distribution score and the embedding
    out, each averaged over the test-time views. Normalisation is in `net`."""

    def __init__(self, net: TestTimeAugmented, ood_score: RelativeMahalanobis):
        super().__init__()
        self.net, self.ood_score = net, ood_score

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, embedding = self.net.features(images)
        return logits, torch.softmax(logits, dim=1), self.ood_score(embedding), embedding


def input_spec() -> dict:
    return {
        "name": INPUT_NAME,
        "dtype": "uint8",
        "shape": ["N", *IMAGE_SHAPE],
        "range": [0, 255],
        "layout": "grey, light object on a black background, centred, 28x28",
    }


def export_onnx(model: ServingModel, path: Path, metadata: dict[str, object]) -> Path:
    """Write the ONNX file (dynamic batch axis, no external data), stamp metadata, run the full check."""
    model = model.cpu().eval()
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
    if program is None:  # dynamo=True always returns the program
        raise RuntimeError("torch.onnx.export returned no ONNX program")
    props = {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}
    props["input_spec"] = json.dumps(input_spec())
    save_checked(program.model_proto, path, props)
    return path


def save_checked(proto: onnx.ModelProto, path: Path, props: dict[str, str]) -> None:
    """`proto` with exactly `props` as its metadata, written atomically once onnx's full check passes."""
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, props)
    proto.doc_string = f"{props.get('model_name', 'model')} image classifier; metadata_props describe it"
    tmp = path.with_suffix(".tmp")
    onnx.save_model(proto, tmp)
    onnx.checker.check_model(str(tmp), full_check=True)
    tmp.replace(path)


def add_metadata(path: Path, values: dict[str, object]) -> None:
    """Add (or replace) metadata entries of an exported file, JSON-encoded as export_onnx encodes them."""
    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    props.update({key: value if isinstance(value, str) else json.dumps(value) for key, value in values.items()})
    save_checked(proto, path, props)


def check_parity(
    model: ServingModel,
    path: Path,
    images: np.ndarray,
    atol: float,
    score_rtol: float,
    batch_size: int = 1000,
    progress: bool = False,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Compare ONNX Runtime (CPU) with PyTorch on every image; raise unless argmax agrees everywhere,
    probabilities differ by at most `atol` and out-of-distribution scores by at most `score_rtol` of their
    size (at least 1). Returns the figures and every output onnxruntime gave."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = model.cpu().eval()
    max_diff, max_score_diff, disagreements, outputs = 0.0, 0.0, 0, []
    starts = range(0, len(images), batch_size)
    for start in progress_of(starts, "parity check", unit="batch") if progress else starts:
        batch = images[start : start + batch_size]
        with torch.no_grad():
            _, expected, expected_score, _ = (t.numpy() for t in model(torch.from_numpy(batch)))
        got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})
        outputs.append(got)
        probabilities, score = got[OUTPUT_NAMES.index("probabilities")], got[OUTPUT_NAMES.index("ood_score")]
        max_diff = max(max_diff, float(np.abs(probabilities - expected).max()))
        relative = np.abs(score - expected_score) / np.maximum(1.0, np.abs(expected_score))
        max_score_diff = max(max_score_diff, float(relative.max()))
        disagreements += int((probabilities.argmax(1) != expected.argmax(1)).sum())
    result = {
        "images": len(images),
        "max_abs_probability_diff": max_diff,
        "max_relative_ood_score_diff": max_score_diff,
        "argmax_disagreements": disagreements,
    }
    if disagreements or max_diff > atol or max_score_diff > score_rtol:
        raise ParityError(f"ONNX and PyTorch disagree: {result} (tolerances {atol}, {score_rtol} relative)")
    return result, {name: np.concatenate([o[k] for o in outputs]) for k, name in enumerate(OUTPUT_NAMES)}


def onnx_metadata(
    model: dict, card: dict, upload_fit: int, test_time_augmentation: str, git_commit: str
) -> dict[str, object]:
    """What the exported file says about itself: the service's model card and preprocessing come from here."""
    return {
        "model_name": model["model"],
        "dataset": card["dataset"],
        "class_names": card["class_names"],
        "upload_fit": upload_fit,
        "mlflow_run_id": model["run_id"],
        "git_commit": git_commit,
        "val_accuracy": model["val_accuracy"],
        "test_accuracy": model["test_accuracy"],
        "parameters": model["parameters"],
        "test_time_augmentation": test_time_augmentation,
        "precision": "fp32",
    }
