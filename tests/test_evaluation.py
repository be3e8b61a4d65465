"""Metrics against values worked out by hand."""

import math

import numpy as np
import pytest
import torch

from training.evaluation import classification_report, confusion_matrix, loss_and_accuracy


def test_confusion_matrix_rows_are_actual_columns_predicted():
    actual = [0, 0, 1, 1, 1, 2]
    predicted = [0, 1, 1, 1, 2, 2]
    np.testing.assert_array_equal(confusion_matrix(actual, predicted, 3), [[1, 1, 0], [0, 2, 1], [0, 0, 1]])


def test_classification_report_by_hand():
    # class a: tp 1, fp 0, fn 1 -> p 1, r 0.5, f1 2/3; b: tp 2, fp 1, fn 1 -> p 2/3, r 2/3, f1 2/3;
    # c: tp 1, fp 1, fn 0 -> p 0.5, r 1, f1 2/3
    report = classification_report(np.array([[1, 1, 0], [0, 2, 1], [0, 0, 1]]), ["a", "b", "c"])
    assert report["a"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert report["b"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert report["c"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["macro avg"]["precision"] == pytest.approx((1 + 2 / 3 + 0.5) / 3)
    assert report["weighted avg"]["recall"] == pytest.approx((2 * 0.5 + 3 * 2 / 3 + 1 * 1) / 6)


def test_a_class_never_predicted_has_zero_precision_not_nan():
    report = classification_report(np.array([[2, 0], [1, 0]]), ["a", "b"])
    assert report["b"]["precision"] == 0.0 and report["b"]["f1"] == 0.0


def test_loss_and_accuracy_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    loss, accuracy = loss_and_accuracy(logits, labels)
    expected = (
        -(math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(math.e / (math.e + 1)) + math.log(1 / (math.exp(3) + 1)))
        / 3
    )
    assert loss == pytest.approx(expected, rel=1e-6)
    assert accuracy == pytest.approx(2 / 3)
