"""The out-of-distribution score the exported graph computes for every image: the relative Mahalanobis distance
of its embedding (Ren et al., "A Simple Fix to Mahalanobis Distance for Improving Near-OOD Detection", 2021):
the squared distance to the nearest class mean under one covariance shared by the classes (Lee et al., 2018),
less the squared distance to the mean of all training images under their own covariance, both fitted on
training images: on this project's ResNet it told MNIST digits from Fashion-MNIST images better than the plain
distance. Also what calibrates and judges it: a threshold flagging a chosen share of validation images, and the
AUROC against the test images of another dataset.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from training.models import TestTimeAugmented

RIDGE = 1e-3  # added to a covariance's diagonal, relative to its mean variance: dead units leave it singular


def _whitened(means: np.ndarray, covariance: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """L with L L^T the inverse covariance, and the means in that frame: |(e - mu) L|^2 is the squared distance."""
    covariance = covariance + RIDGE * np.trace(covariance) / len(covariance) * np.eye(len(covariance))
    whiten = np.linalg.cholesky(np.linalg.inv(covariance))
    return torch.tensor(whiten, dtype=torch.float32), torch.tensor(means @ whiten, dtype=torch.float32)


class RelativeMahalanobis(nn.Module):
    """Embeddings [N,D] to the score [N]: min over classes c of |z - m_c|^2, computed as |z|^2 - z.2m_c + |m_c|^2
    (z = e L, matrix products only), less |e L0 - m0|^2 for the one Gaussian of all training embeddings. Every
    constant is a buffer of its own (no scalar factors, no transposes) and the minimum a TopK, so that
    onnxruntime's symbolic shape inference, which quantization runs first, follows the graph."""

    whiten: torch.Tensor
    twice_centres: torch.Tensor
    centre_norms: torch.Tensor
    whiten_all: torch.Tensor
    centre_all: torch.Tensor

    def __init__(self, embeddings: np.ndarray, labels: np.ndarray, classes: int):
        super().__init__()
        means = np.stack([embeddings[labels == c].mean(0) for c in range(classes)])
        centred = embeddings - means[labels]
        whiten, centres = _whitened(means, centred.T @ centred / len(embeddings))
        mean = embeddings.mean(0, keepdims=True)
        whiten_all, centre_all = _whitened(mean, np.cov(embeddings, rowvar=False, bias=True).reshape(len(whiten), -1))
        self.register_buffer("whiten", whiten)
        self.register_buffer("twice_centres", (2 * centres).T.contiguous())
        self.register_buffer("centre_norms", (centres * centres).sum(1))
        self.register_buffer("whiten_all", whiten_all)
        self.register_buffer("centre_all", centre_all)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        z = embedding @ self.whiten
        squared = (z * z).sum(1, keepdim=True) - z @ self.twice_centres + self.centre_norms
        nearest = torch.topk(squared, 1, dim=1, largest=False).values[:, 0]  # a TopK: shape inference knows it
        overall = embedding @ self.whiten_all - self.centre_all
        return nearest - (overall * overall).sum(1)


def features(net: TestTimeAugmented, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits and embeddings of uint8 images [N,1,28,28], averaged over the test-time views, as float64."""
    logits, embeddings = [], []
    batch = max(1, batch_size // net.views)
    with torch.no_grad():
        for start in range(0, len(images), batch):
            out = net.features(torch.from_numpy(np.ascontiguousarray(images[start : start + batch])))
            logits.append(out[0].double().numpy())
            embeddings.append(out[1].double().numpy())
    return np.concatenate(logits), np.concatenate(embeddings)


def threshold_at(scores: np.ndarray, false_positive_rate: float) -> float:
    """The score above which `false_positive_rate` of these (in-distribution) images lie."""
    return float(np.quantile(scores, 1 - false_positive_rate))


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """How well the score tells `outside` images from `inside` ones: 1 always, 0.5 by chance."""
    truth = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    return float(roc_auc_score(truth, np.r_[inside, outside]))


def calibrate(validation: np.ndarray, test: np.ndarray, contrast: np.ndarray | None, rate: float) -> dict[str, float]:
    """A served file's threshold, at the false-positive `rate` on validation scores, and what it does: the share
    of validation, test and contrast images it flags, and the AUROC of test images against contrast ones."""
    threshold = threshold_at(validation, rate)
    figures = {
        "threshold": threshold,
        "validation_flagged": float((validation > threshold).mean()),
        "test_flagged": float((test > threshold).mean()),
    }
    if contrast is not None:
        figures["contrast_flagged"] = float((contrast > threshold).mean())
        figures["auroc"] = auroc(test, contrast)
    return figures
