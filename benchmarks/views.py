"""Test-time views as a choice with figures (`make bench-views`): the challenger exported again with each set of
views its training allows (none, the mirror image, 1-pixel shifts, both: 1, 2, 5 and 10 views) through the
export stage's own code (parity, int8 gate, OOD score, probe), and, where the distill stage's student is what
the export stage exported, that one-view file too; each served by the service as `make serve` serves it (int8
on a CPU). For each: the test accuracy of the served file offline and over HTTP on the 10,000 test images, and
requests/s at 64 clients, all servers up at once and taken in turn, ratios to the challenger with all its views
paired per repeat. The rule that picks a default (RULE) is applied to the figures. Writes
benchmarks/results/views.json. The extra models go in the BentoML store under their own name and are deleted at
the end.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

import bentoml
import numpy as np

from benchmarks.local_server import REPO, benchmarked_service
from benchmarks.publish import publish, served_model
from benchmarks.serving import (
    DATASET,
    interleaved,
    median_of,
    paired_ratios,
    payload_images,
    served_accuracy,
    targets_of,
    warm_up,
)
from common.files import read_json
from common.model_store import EXPORT_RECORD, save_onnx
from training.bundle import build_bundle
from training.checkpoint import load_trained
from training.config import CARD_FILE, CHALLENGER_FILE, DATASET_FILE, DISTILL_FILE, Params, TtaSettings
from training.data import Prepared
from training.export import onnx_metadata
from training.models import TestTimeAugmented
from training.progress import progress

DISTILLED = "1-distilled"  # the distill stage's one-view student, as a row
BENCH_MODEL = "views-benchmark"  # the BentoML model name of the re-exported files, deleted at the end
RULE = (
    "the fewest views (the distilled file runs one) whose served accuracy is within params.yaml's gate.tolerance "
    "of the best row's"
)


def view_sets(exported: TtaSettings) -> dict[int, TtaSettings]:
    """Every set of views the challenger's training allows, by number of views."""
    shifts = [0, exported.shift] if exported.shift else [0]
    flips = [False, True] if exported.flip else [False]
    sets = [TtaSettings(flip=flip, shift=shift) for shift in shifts for flip in flips]
    return {s.views: s for s in sets}


def export_views(tta: TtaSettings, params: Params, challenger: dict, data: Prepared, folder: Path) -> tuple[str, dict]:
    """The challenger with `tta`'s views, exported as the export stage exports it: (BentoML tag, int8 gate figures)."""
    card = read_json(CARD_FILE)
    metadata = onnx_metadata(challenger, card, params.data.spec.upload_fit, tta.describe(), "views-benchmark")
    net = TestTimeAugmented(load_trained(challenger["model"], params, card), tta).eval()
    bundle = build_bundle(
        net, data, None, params.export, metadata, folder, params.data.seed, params.evaluate.batch_size
    )
    return save_onnx(bundle.files, BENCH_MODEL), bundle.figures["int8_gate"]


def chosen(rows: dict[str, dict], tolerance_points: float) -> str:
    """RULE: the row it picks (fewest views; among as few, the more accurate)."""
    best = max(row["served_accuracy"] for row in rows.values())
    within = [key for key, row in rows.items() if row["served_accuracy"] >= best - tolerance_points / 100]
    return min(within, key=lambda key: (rows[key]["views"], -rows[key]["served_accuracy"]))


def table(results: dict) -> str:
    rows = results["views"]
    lines = [
        f"{results['model']}, served as {results['precision']} on the CPU; requests/s: PNG uploads, "
        f"{results['clients']} clients, medians of {results['repeats']} runs; ratios to the challenger "
        f"with all its {results['base_views']} views, paired per repeat.",
        "",
        "| views | which | test accuracy, file offline | served over HTTP | requests/s | p99 ms | errors | ratio |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in sorted(rows.values(), key=lambda row: (row["views"], row["describe"])):
        lines.append(
            f"| {row['views']} | {row['describe']} | {row['offline_accuracy']:.2%} | {row['served_accuracy']:.2%} | "
            f"{row['requests_per_s']:.0f} | {row['p99_ms']:.1f} | {row['errors']} | {row['ratio']:.2f} |"
        )
    rule = RULE.replace("params.yaml's gate.tolerance", f"params.yaml's gate.tolerance ({results['tolerance']} points)")
    pick = rows[results["chosen"]]
    lines += ["", f"Rule: {rule}: **{pick['views']} view(s), {pick['describe']}**."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per run at most")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "views.json")
    args = parser.parse_args()
    params = Params.load()
    challenger = read_json(CHALLENGER_FILE)
    record = read_json(EXPORT_RECORD)
    sets = view_sets(params.tta_for(challenger["model"]))
    base = str(max(sets))  # the challenger with all its views: what the ratios are to
    student = read_json(DISTILL_FILE)["exported"]  # the export stage exported the one-view student
    served_key = DISTILLED if student else base
    tags, gates = {served_key: record["bentoml_tag"]}, {served_key: record["int8_gate"]}
    describe = {str(views): tta.describe() for views, tta in sets.items()} | {
        DISTILLED: record["test_time_augmentation"]
    }
    made: list[str] = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        folder = Path(tmp)
        try:
            data = Prepared.load(DATASET_FILE)
            for views, tta in progress([(v, t) for v, t in sets.items() if str(v) not in tags], desc="exporting"):
                tags[str(views)], gates[str(views)] = export_views(tta, params, challenger, data, folder / str(views))
                made.append(tags[str(views)])
            np.save(folder / "images.npy", payload_images())
            servers = {
                key: stack.enter_context(benchmarked_service(folder / f"{key}.log", BENTO_MODEL_TAG=tag))
                for key, tag in tags.items()
            }
            targets = [t for key, s in servers.items() for t in targets_of(key, s)]
            warm_up(targets, folder / "images.npy")
            runs = interleaved(targets, "png", args.clients, 10**9, args, folder / "images.npy")
            with np.load(DATASET) as data:
                images, labels = data["x_test"][:, 0], data["y_test"]
            served = served_model(servers[served_key].url)
            precision = served["precision"]
            rows: dict[str, dict] = {}
            for key, server in servers.items():
                measured = median_of(runs[key])
                rows[key] = {
                    "views": 1 if key == DISTILLED else int(key),
                    "describe": describe[key],
                    "bentoml_tag": tags[key],
                    "offline_accuracy": gates[key][f"{precision}_test_accuracy"],
                    "served_accuracy": served_accuracy(server.url, images, labels)["accuracy"],
                    "requests_per_s": measured["requests_per_s"],
                    "p99_ms": measured["p99_ms"],
                    "errors": measured["errors"],
                    "ratio": paired_ratios(runs[key], runs[base])["requests_per_s"],
                    "runs": runs[key],
                }
        finally:
            stack.close()
            for tag in made:
                bentoml.models.delete(tag)
    results = {
        "model": challenger["model"],
        "precision": precision,
        "clients": args.clients,
        "repeats": args.repeats,
        "base_views": int(base),
        "served": served_key,
        "views": rows,
        "tolerance": params.gate.tolerance,
        "chosen": chosen(rows, params.gate.tolerance),
    }
    publish(results, table(results), args.output, served)


if __name__ == "__main__":
    main()
