"""The pipeline report: every model compared, and a close look at the champion, as markdown plus figures."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from training.plots import accuracy_bars, curves_figure, per_class_figure
from training.selection import comparison_table


def read_curve(path: Path) -> dict[str, list[float]]:
    """A training curve CSV (one row per epoch) as columns."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {key: [float(row[key]) for row in rows] for key in rows[0]} if rows else {}


def class_accuracy(report: dict) -> dict[str, float]:
    """Test accuracy per class: the recall in the evaluate stage's classification report."""
    return {cls: s["recall"] for cls, s in report.items() if isinstance(s, dict) and not cls.endswith(" avg")}


def per_class_table(accuracy: dict[str, float]) -> str:
    """Accuracy per class as markdown, worst first."""
    rows = [f"| {cls} | {value:.2%} |" for cls, value in sorted(accuracy.items(), key=lambda item: item[1])]
    return "\n".join(["| class | accuracy |", "|---|---:|", *rows]) + "\n"


def write_report(
    title: str,
    rows: list[dict],
    champion: dict,
    curves: dict[str, dict[str, list[float]]],
    champion_evaluation: Path,
    report_file: Path,
    figures_dir: Path,
) -> None:
    """The report's markdown and, in `figures_dir` (replaced), its figures, linked relative to the markdown."""
    name = champion["model"]
    if figures_dir.exists():
        shutil.rmtree(figures_dir)  # no figure of an earlier run survives next to this one's
    figures_dir.mkdir(parents=True)
    report = json.loads((champion_evaluation / "classification_report.json").read_text())
    accuracy = class_accuracy(report)
    figures = {
        "accuracy": accuracy_bars(rows, name, figures_dir / "accuracy.png"),
        "curves": curves_figure(curves, figures_dir / "curves.png"),
        "per_class": per_class_figure(accuracy, f"{name}: test accuracy per class", figures_dir / "per_class.png"),
        "confusion": Path(
            shutil.copy(champion_evaluation / "confusion_matrix.png", figures_dir / "confusion_matrix.png")
        ),
        "mistakes": Path(shutil.copy(champion_evaluation / "misclassified.png", figures_dir / "mistakes.png")),
    }
    link = {key: path.relative_to(report_file.parent).as_posix() for key, path in figures.items()}
    report_file.write_text(f"""# {title}

Champion: **{name}**, chosen on validation accuracy ({champion["val_accuracy"]:.2%}); \
test accuracy {champion["test_accuracy"]:.2%}, {champion["parameters"]:,} parameters.

## All models

{comparison_table(rows, name)}
![Validation and test accuracy of every model]({link["accuracy"]})

## Training curves

![Training loss and validation accuracy per epoch, every model]({link["curves"]})

## The champion

### Confusion matrix (test set)

![Confusion matrix of {name} on the test set]({link["confusion"]})

### Accuracy per class (test set, worst first)

{per_class_table(accuracy)}
![Test accuracy per class of {name}]({link["per_class"]})

### Its most confident mistakes

![The test images {name} got wrong with the highest confidence]({link["mistakes"]})
""")
