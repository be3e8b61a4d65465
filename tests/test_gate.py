"""The gate's rule and the live promotion's: paired results on the same images, McNemar's exact test; the mode a
run applies. In-process."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from common.runtime import gpu_present
from training.config import Params
from training.errors import ConfigError
from training.gate import decide, judged_precision, mode
from training.paired import compare

GATE = Params.load(Path(__file__).resolve().parents[1] / "params.yaml").gate


def results(right: int, total: int, seed: int = 0) -> np.ndarray:
    """`right` of `total` answers right, in a seeded order."""
    answers = np.zeros(total, bool)
    answers[:right] = True
    return np.random.default_rng(seed).permutation(answers)


def test_mcnemar_counts_only_the_images_one_model_gets_right():
    champion = np.array([True] * 80 + [False] * 20)
    challenger = champion.copy()
    challenger[:12] = False  # 12 the champion alone gets right
    challenger[80:82] = True  # 2 the challenger alone gets right
    paired = compare(champion, challenger)
    assert (paired.champion_only, paired.challenger_only, paired.images) == (12, 2, 100)
    assert paired.loss_points == pytest.approx(10.0)
    # exact two-sided binomial test of 2 in 14 at p = 1/2
    assert paired.p_value == pytest.approx(2 * sum(math.comb(14, k) for k in range(3)) / 2**14)
    assert paired.worse(tolerance_points=0, alpha=0.05) and not paired.worse(tolerance_points=10, alpha=0.05)
    same = compare(champion, champion)
    assert same.p_value == 1.0 and not same.worse(0, 0.05)


def test_a_first_model_passes():
    decision, paired = decide({"test": results(50, 100)}, None, GATE)
    assert decision.passed and paired == {} and "no champion yet" in decision.reason


def test_one_image_of_a_small_folder_neither_blocks_nor_admits():
    test = results(9000, 10_000)
    champion = {"test": test, "holdout_feedback": results(20, 30)}
    one_worse = champion["holdout_feedback"].copy()
    one_worse[np.flatnonzero(one_worse)[0]] = False  # one image of 30: 3.3 points, no evidence
    decision, paired = decide({"test": test, "holdout_feedback": one_worse}, champion, GATE)
    assert decision.passed and paired["holdout_feedback"].loss_points > 3
    worse_test = test.copy()
    worse_test[np.flatnonzero(worse_test)[:100]] = False  # a point lost on 10,000 images: significant
    blocked, paired = decide({"test": worse_test, "holdout_feedback": champion["holdout_feedback"]}, champion, GATE)
    assert not blocked.passed and paired["test"].p_value < 1e-20
    assert blocked.reason.startswith("the challenger is worse on test 89.00% against the champion's 90.00%")


def test_a_loss_within_the_tolerance_passes_even_when_significant():
    champion = results(9000, 10_000)
    challenger = champion.copy()
    challenger[np.flatnonzero(challenger)[:15]] = False  # 0.15 points, every one of them one-sided
    decision, paired = decide({"test": challenger}, {"test": champion}, GATE)
    assert paired["test"].p_value < 0.001 and decision.passed  # tolerance 0.2 points on the test set


def test_the_mode_experiments_record_and_make_retrain_shadows():
    assert mode(GATE, {}) == ("promote", "gate.mode")
    assert mode(GATE, {"GATE_MODE": "shadow"}) == ("shadow", "$GATE_MODE")
    assert mode(GATE, {"GATE_MODE": "shadow", "DVC_EXP_BASELINE_REV": "abc"})[0] == "record"
    assert mode(GATE.model_copy(update={"experiment_mode": "promote"}), {"DVC_EXP_BASELINE_REV": "abc"})[0] == "promote"
    with pytest.raises(ConfigError, match="GATE_MODE='shadwo': choose one of promote, shadow, record"):
        mode(GATE, {"GATE_MODE": "shadwo"})


def test_the_judged_file_is_the_one_served_here():
    assert judged_precision("auto", ["fp32", "int8"]) == ("fp32" if gpu_present() else "int8")
    assert judged_precision("auto", ["fp32"]) == "fp32"
    assert judged_precision("fp32", ["fp32", "int8"]) == "fp32"
