"""Choosing the champion: by validation accuracy only, never by test accuracy."""

from __future__ import annotations

from training.errors import PipelineError


def choose_champion(rows: list[dict]) -> dict:
    """Best validation accuracy; ties go to the model with fewer parameters, then to the name."""
    if not rows:
        raise PipelineError("no evaluated models to choose from")
    return min(rows, key=lambda r: (-r["val_accuracy"], r["parameters"], r["model"]))


def comparison_table(rows: list[dict], champion: str) -> str:
    """All models as a markdown table, best validation accuracy first."""
    lines = [
        "| model | parameters | val accuracy | test accuracy | train time (s) | images/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (-r["val_accuracy"], r["parameters"], r["model"])):
        mark = " (champion)" if r["model"] == champion else ""
        lines.append(
            f"| {r['model']}{mark} | {r['parameters']:,} | {r['val_accuracy']:.4f} | {r['test_accuracy']:.4f} "
            f"| {r['train_seconds']:.1f} | {r['images_per_second']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def challenger_record(champion: dict, dataset: str) -> dict:
    """What challenger.json says: the chosen model and its scores."""
    return {
        "model": champion["model"],
        "dataset": dataset,
        "run_id": champion["run_id"],
        "val_accuracy": champion["val_accuracy"],
        "test_accuracy": champion["test_accuracy"],
        "parameters": champion["parameters"],
    }
