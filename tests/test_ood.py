"""The out-of-distribution score: the relative Mahalanobis distance, its threshold and its AUROC."""

import numpy as np
import pytest
import torch

from training.ood import RIDGE, RelativeMahalanobis, auroc, calibrate, threshold_at


def squared_distance(x: np.ndarray, mean: np.ndarray, covariance: np.ndarray) -> np.ndarray:
    covariance = covariance + RIDGE * np.trace(covariance) / len(covariance) * np.eye(len(covariance))
    d = x - mean
    return np.einsum("nd,de,ne->n", d, np.linalg.inv(covariance), d)


@pytest.fixture(scope="module")
def gaussians():
    """Three classes in 6 dimensions, each a Gaussian of its own around its own mean."""
    rng = np.random.default_rng(0)
    means = rng.normal(0, 4, (3, 6))
    labels = np.repeat(np.arange(3), 400)
    return means[labels] + rng.normal(0, 1, (1200, 6)), labels, rng


def test_the_score_is_the_nearest_class_distance_less_the_distance_to_all(gaussians):
    embeddings, labels, rng = gaussians
    score = RelativeMahalanobis(embeddings, labels, 3)
    x = rng.normal(0, 5, (50, 6))
    means = np.stack([embeddings[labels == c].mean(0) for c in range(3)])
    centred = embeddings - means[labels]
    shared = centred.T @ centred / len(embeddings)
    nearest = np.min([squared_distance(x, m, shared) for m in means], axis=0)
    overall = squared_distance(x, embeddings.mean(0), np.cov(embeddings, rowvar=False, bias=True))
    with torch.no_grad():
        got = score(torch.tensor(x, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(got, nearest - overall, rtol=1e-3, atol=1e-2)


def test_far_points_score_higher_and_the_threshold_flags_the_chosen_share(gaussians):
    embeddings, labels, rng = gaussians
    score = RelativeMahalanobis(embeddings, labels, 3)
    inside = embeddings[::3] + rng.normal(0, 0.1, (400, 6))
    outside = rng.normal(0, 1, (400, 6)) + 30  # far from every class
    with torch.no_grad():
        s_in, s_out = (score(torch.tensor(a, dtype=torch.float32)).numpy() for a in (inside, outside))
    assert auroc(s_in, s_out) > 0.99 and auroc(s_out, s_in) < 0.01
    figures = calibrate(s_in, s_in, s_out, 0.05)
    assert figures["threshold"] == threshold_at(s_in, 0.05)
    assert figures["validation_flagged"] == pytest.approx(0.05, abs=0.005) and figures["contrast_flagged"] == 1.0
    assert "auroc" not in calibrate(s_in, s_in, None, 0.05)


def test_a_dead_unit_leaves_the_score_finite():
    rng = np.random.default_rng(1)
    embeddings = np.c_[rng.normal(0, 1, (500, 4)), np.zeros(500)]  # one unit never fires: singular covariance
    score = RelativeMahalanobis(embeddings, np.arange(500) % 2, 2)
    with torch.no_grad():
        assert torch.isfinite(score(torch.ones(3, 5))).all()
