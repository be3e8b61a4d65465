"""The figures in README.md and docs/, written from the files that hold them: `python -m pipelines.docs`.

Each figure sits between `<!-- begin: NAME -->` and `<!-- end: NAME -->`; this rewrites every such block
from its source (champion.json, metrics/, benchmarks/results/: files in git), so no number is typed by hand.
`--check` changes nothing and fails when a block differs from what its source gives (the test suite checks
the committed files the same way). Not a pipeline stage: run it (`make docs`) after `make run` or a
`make bench*`, and commit the results files and the docs together.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from common.files import read_json
from training.config import CHAMPION_FILE, DISTILL_FILE, EXPORT_DIR, METRICS_DIR
from training.selection import comparison_table

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = (
    "README.md",
    "docs/pipeline.md",
    "docs/serving.md",
    "docs/monitoring.md",
    "docs/results.md",
    "docs/testing.md",
)
BENCHMARK_RESULTS = Path("benchmarks/results")
BLOCK = re.compile(r"(<!-- begin: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end: (?P=name) -->)", re.DOTALL)


def _missing(path: Path, command: str) -> str:
    return f"Not measured in this checkout: `{command}` writes `{path.as_posix()}`, then `make docs`.\n"


def champion_summary(root: Path) -> str:
    champion = read_json(root / CHAMPION_FILE)
    metrics = read_json(root / METRICS_DIR / f"{champion['model']}.json")
    single_view = metrics.get("test_accuracy_single_view", metrics["test_accuracy"])
    distilled = read_json(root / DISTILL_FILE) if (root / DISTILL_FILE).is_file() else {"exported": False}
    if distilled["exported"] and distilled["student_test_accuracy"] == champion["test_accuracy"]:
        views = distilled["teacher_views"]
        scores = (
            f"validation accuracy ({metrics['val_accuracy']:.2%} with {views} test-time views), then distilled to "
            f"one view ({champion['val_accuracy']:.2%} on validation): **{champion['test_accuracy']:.2%}** test "
            f"accuracy from one view of each image, {views} times less work (before distillation: "
            f"{metrics['test_accuracy']:.2%} with {views} views, {single_view:.2%} from one)."
        )
    else:
        scores = (
            f"validation accuracy ({champion['val_accuracy']:.2%}): **{champion['test_accuracy']:.2%}** test "
            f"accuracy ({single_view:.2%} on single views, without test-time augmentation)."
        )
    return (
        f"Champion on {champion['dataset']}: **{champion['model']}**, {champion['parameters']:,} parameters, chosen "
        f"on {scores} Registered as `{champion['registered_model']}` version {champion['version']}, alias "
        f"`{champion['alias']}`." + int8_summary(root) + "\n"
    )


def int8_summary(root: Path) -> str:
    """What the int8 file that the service runs on a CPU scores, from the export stage's record."""
    record = read_json(root / EXPORT_DIR / "export.json")
    gate = record.get("int8_gate")
    if gate is None:
        return ""
    return (
        f" Served on a CPU as int8 (`export/model.int8.onnx`): **{gate['int8_test_accuracy']:.2%}** test accuracy "
        f"against {gate['fp32_test_accuracy']:.2%} for the fp32 file, the same class on "
        f"{gate['int8_argmax_agreement']:.2%} of the test images."
    )


def ood_summary(root: Path) -> str:
    """The champion's out-of-distribution score as the export stage measured it, per served file."""
    record = read_json(root / EXPORT_DIR / "export.json")
    ood = record.get("ood")
    if ood is None:
        return _missing(EXPORT_DIR / "export.json", "make run")
    contrast = ood["contrast_dataset"]
    rows = [
        f"Fitted on {ood['fit_images']:,} training images; threshold at {ood['false_positive_rate']:.0%} of the "
        f"validation images; {record['dataset']} test images against {contrast or 'no contrast set'} test images.",
        "",
        f"| file | threshold | validation flagged | test flagged | {contrast} flagged | AUROC |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for precision in ("fp32", "int8"):
        f = ood[precision]
        rows.append(
            f"| {precision} | {f['threshold']:.2f} | {f['validation_flagged']:.1%} | {f['test_flagged']:.1%} | "
            f"{f.get('contrast_flagged', float('nan')):.1%} | {f.get('auroc', float('nan')):.4f} |"
        )
    return "\n".join(rows) + "\n"


def model_comparison(root: Path) -> str:
    champion = read_json(root / CHAMPION_FILE)["model"]
    rows = [{"model": path.stem, **read_json(path)} for path in sorted((root / METRICS_DIR).glob("*.json"))]
    return comparison_table(rows, champion)


def stage_table(root: Path) -> str:
    """Every stage of dvc.yaml: what its script's docstring says it does, the params and outputs DVC tracks."""
    rows = ["| stage | what it does | params (`params.yaml`) | writes |", "|---|---|---|---|"]
    for name, stage in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].items():
        script = root / (re.findall(r"-m (pipelines\.\w+)", stage["cmd"])[0].replace(".", "/") + ".py")
        summary = re.sub(r"^\w+ stage( \([^)]*\))?: ", "", _summary(ast.get_docstring(ast.parse(script.read_text()))))
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", [])]
        label = f"{name}@<model>" if "matrix" in stage else name
        cells = [f"`{label}`", summary, _code_list(stage.get("params", [])), _code_list(outs)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _summary(docstring: str | None) -> str:
    """A docstring's first paragraph on one line."""
    return " ".join((docstring or "").split("\n\n")[0].split())


def _code_list(items: list) -> str:
    return ", ".join(f"`{str(item).replace('${item.model}', '<model>')}`" for item in items)


def model_zoo(root: Path) -> str:
    """Every model params.yaml defines: its architecture (the builder's docstring), options and own training."""
    from training.models import BUILDERS  # torch: only for this block

    rows = ["| model | architecture | options | own `train` settings |", "|---|---|---|---|"]
    params = yaml.safe_load((root / "params.yaml").read_text())
    for name, entry in params["models"].items():
        options = {k: v for k, v in entry.items() if k not in ("architecture", "train")}
        builder = _summary(BUILDERS[entry["architecture"]].__doc__).split(". ")[0].rstrip(".")
        cells = [
            f"`{name}`",
            f"`{entry['architecture']}`: {builder}",
            _settings(options),
            _settings(entry.get("train", {})),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _settings(values: dict) -> str:
    return ", ".join(f"`{key}: {json.dumps(value)}`" for key, value in values.items()) or "-"


def serving_settings(root: Path) -> str:
    """The service's environment variables, their defaults and descriptions, from serving/settings.py."""
    from serving.settings import ServingSettings, env_name

    rows = ["| variable | default | what it sets |", "|---|---|---|"]
    for field, info in ServingSettings.model_fields.items():
        factory = info.default_factory
        default = (factory.__doc__ or "").strip() if factory else f"`{str(info.default).lower()}`"
        rows.append(f"| `{env_name(field)}` | {default} | {info.description} |")
    return "\n".join(rows) + "\n"


def log_schema(root: Path) -> str:
    """The prediction log's columns, from the schema its writer uses."""
    from common.log_records import schema_table

    return schema_table()


def benchmark(file: str, command: str, module: str) -> Callable[[Path], str]:
    """A block from a benchmark's results file, printed by that benchmark's own `table` function."""

    def render(root: Path) -> str:
        path = BENCHMARK_RESULTS / file
        if not (root / path).is_file():
            return _missing(path, command)
        return importlib.import_module(module).table(read_json(root / path)) + "\n"

    return render


RENDERERS: dict[str, Callable[[Path], str]] = {
    "stages": stage_table,
    "ood-score": ood_summary,
    "model-zoo": model_zoo,
    "serving-settings": serving_settings,
    "log-schema": log_schema,
    "champion-summary": champion_summary,
    "model-comparison": model_comparison,
    "training-benchmark": benchmark("training.json", "make bench-train", "benchmarks.training"),
    "serving-benchmark": benchmark("serving.json", "make bench", "benchmarks.serving"),
    "serving-sweep": benchmark("serving_sweep.json", "make bench-sweep", "benchmarks.serving_sweep"),
    "prediction-log": benchmark("prediction_log.json", "make bench", "benchmarks.prediction_log"),
    "shadow-benchmark": benchmark("shadow.json", "make bench", "benchmarks.shadow"),
    "phone-photos": benchmark("phone_photos.json", "make bench-photos", "benchmarks.phone_photos"),
    "header-flood": benchmark("header_flood.json", "make bench-headers", "benchmarks.header_flood"),
    "worker-profile": benchmark("profile.json", "make bench-profile", "benchmarks.profile"),
    "worker-profile-before": benchmark(
        "profile_before.json",
        "python -m benchmarks.profile --output benchmarks/results/profile_before.json",
        "benchmarks.profile",
    ),
    "connections": benchmark("connections.json", "make bench-connections", "benchmarks.connections"),
    "views-benchmark": benchmark("views.json", "make bench-views", "benchmarks.views"),
}


def render(text: str, root: Path) -> str:
    """`text` with every generated block rewritten from its source; an unknown block name is an error."""

    def fill(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in RENDERERS:
            raise KeyError(f"no generator for the block {name!r}; known: {sorted(RENDERERS)}")
        return f"{match.group(1)}{RENDERERS[name](root)}{match.group(4)}"

    return BLOCK.sub(fill, text)


def stale_documents(root: Path = REPO) -> list[str]:
    """The documents whose generated blocks differ from their sources."""
    return [doc for doc in DOCUMENTS if render((root / doc).read_text(), root) != (root / doc).read_text()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; fail if a document is stale")
    args = parser.parse_args()
    if args.check:
        stale = stale_documents()
        if stale:
            sys.exit(f"generated figures differ from their sources in {stale}: run `make docs`")
        return
    for doc in DOCUMENTS:
        path = REPO / doc
        path.write_text(render(path.read_text(), REPO))
    print(json.dumps({"written": list(DOCUMENTS)}))


if __name__ == "__main__":
    main()
