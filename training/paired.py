"""Two models judged on the same labelled images: McNemar's exact test on the images exactly one of them gets
right. The gate (offline, per split) and `make promote` (live, on labelled traffic) decide with the same rule:
a challenger is worse only where it loses more than a tolerance *and* the test says the loss is no chance, so
that one image of a small folder neither blocks nor admits a model."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from statsmodels.stats.contingency_tables import mcnemar


@dataclass(frozen=True)
class Paired:
    """Both models' results on the same images."""

    images: int
    champion_correct: int
    challenger_correct: int
    champion_only: int  # right by the champion, wrong by the challenger
    challenger_only: int  # the other way round
    p_value: float  # McNemar's exact test, two-sided: the chance of so uneven a split of the discordant images

    @property
    def champion_accuracy(self) -> float:
        return self.champion_correct / self.images if self.images else float("nan")

    @property
    def challenger_accuracy(self) -> float:
        return self.challenger_correct / self.images if self.images else float("nan")

    @property
    def loss_points(self) -> float:
        """How many points the challenger loses against the champion (negative: it gains)."""
        return (self.champion_correct - self.challenger_correct) * 100 / self.images if self.images else 0.0

    def worse(self, tolerance_points: float, alpha: float) -> bool:
        """Whether the challenger is worse: more than `tolerance_points` lost, at significance `alpha`."""
        return self.loss_points > tolerance_points and self.p_value < alpha

    def describe(self) -> str:
        return (
            f"{self.challenger_accuracy:.2%} against the champion's {self.champion_accuracy:.2%} on {self.images:,} "
            f"images ({self.challenger_only} only it got right, {self.champion_only} only the champion; McNemar "
            f"p = {self.p_value:.3g})"
        )

    def figures(self) -> dict:
        return {
            **asdict(self),
            "champion_accuracy": self.champion_accuracy,
            "challenger_accuracy": self.challenger_accuracy,
        }


def compare(champion_correct: np.ndarray, challenger_correct: np.ndarray) -> Paired:
    """Both models' right (True) and wrong answers on the same images, in the same order."""
    champion_correct, challenger_correct = np.asarray(champion_correct, bool), np.asarray(challenger_correct, bool)
    champion_only = int(np.sum(champion_correct & ~challenger_correct))
    challenger_only = int(np.sum(challenger_correct & ~champion_correct))
    both = int(np.sum(champion_correct & challenger_correct))
    neither = len(champion_correct) - both - champion_only - challenger_only
    discordant = champion_only + challenger_only
    p_value = (
        float(mcnemar([[both, champion_only], [challenger_only, neither]], exact=True).pvalue) if discordant else 1.0
    )
    return Paired(
        images=len(champion_correct),
        champion_correct=int(champion_correct.sum()),
        challenger_correct=int(challenger_correct.sum()),
        champion_only=champion_only,
        challenger_only=challenger_only,
        p_value=p_value,
    )
