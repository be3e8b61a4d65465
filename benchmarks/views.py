"""Test-time views as a choice with figures (`make bench-views`): the champion exported again with each set of
views its training allows (none, the mirror image, 1-pixel shifts, both: 1, 2, 5 and 10 views) through the
export stage's own code (parity, int8 gate, OOD score, probe), each served by the service as `make serve`
serves it (int8 on a CPU). For each: the test accuracy of the served file offline and over HTTP on the 10,000
test images, and requests/s at 64 clients, all servers up at once and taken in turn, ratios to the set the
champion was exported with paired per repeat. The rule that picks a default (RULE) is applied to the figures.
Writes benchmarks/results/views.json. The extra models go in the BentoML store under their own name and are
deleted at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

import bentoml
import numpy as np

from benchmarks.local_server import REPO, LocalServer
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
from serving.files import read_json
from serving.model_store import EXPORT_RECORD, save_onnx
from training.bundle import build_bundle
from training.checkpoint import load_trained
from training.config import CARD_FILE, CHALLENGER_FILE, DATASET_FILE, Params, TtaSettings
from training.data import Prepared
from training.export import onnx_metadata
from training.models import TestTimeAugmented
from training.progress import progress

BENCH_MODEL = "views-benchmark"  # the BentoML model name of the re-exported files, deleted at the end
RULE = "the fewest views whose served accuracy is within params.yaml's gate.tolerance of the best set's"


def view_sets(exported: TtaSettings) -> dict[int, TtaSettings]:
    """Every set of views the champion's training allows, by number of views."""
    shifts = [0, exported.shift] if exported.shift else [0]
    flips = [False, True] if exported.flip else [False]
    sets = [TtaSettings(flip=flip, shift=shift) for shift in shifts for flip in flips]
    return {s.views: s for s in sets}


def export_views(tta: TtaSettings, params: Params, champion: dict, data: Prepared, folder: Path) -> tuple[str, dict]:
    """The champion with `tta`'s views, exported as the export stage exports it: (BentoML tag, int8 gate figures)."""
    card = read_json(CARD_FILE)
    metadata = onnx_metadata(champion, card, params.data.spec.upload_fit, tta.describe(), "views-benchmark")
    net = TestTimeAugmented(load_trained(champion["model"], params, card), tta).eval()
    bundle = build_bundle(
        net, data, None, params.export, metadata, folder, params.data.seed, params.evaluate.batch_size
    )
    return save_onnx(bundle.files, BENCH_MODEL), bundle.figures["int8_gate"]


def chosen(rows: dict[str, dict], tolerance_points: float) -> str:
    """RULE: the number of views it picks."""
    best = max(row["served_accuracy"] for row in rows.values())
    return min((v for v, row in rows.items() if row["served_accuracy"] >= best - tolerance_points / 100), key=int)


def table(results: dict) -> str:
    rows = results["views"]
    lines = [
        f"{results['model']}, served as {results['precision']} on the CPU; requests/s: PNG uploads, "
        f"{results['clients']} clients, medians of {results['repeats']} runs; ratios to the exported "
        f"{results['exported_views']} views, paired per repeat.",
        "",
        "| views | which | test accuracy, file offline | served over HTTP | requests/s | p99 ms | errors | ratio |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for views, row in sorted(rows.items(), key=lambda item: int(item[0])):
        lines.append(
            f"| {views} | {row['describe']} | {row['offline_accuracy']:.2%} | {row['served_accuracy']:.2%} | "
            f"{row['requests_per_s']:.0f} | {row['p99_ms']:.1f} | {row['errors']} | {row['ratio']:.2f} |"
        )
    rule = RULE.replace("params.yaml's gate.tolerance", f"params.yaml's gate.tolerance ({results['tolerance']} points)")
    lines += ["", f"Rule: {rule}: **{results['chosen']} views**."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per run at most")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "views.json")
    args = parser.parse_args()
    params = Params.load()
    champion = read_json(CHALLENGER_FILE)
    exported = params.tta_for(champion["model"])
    record = read_json(EXPORT_RECORD)
    served_tag = record["bentoml_tag"]
    rows: dict[str, dict] = {}
    tags = {exported.views: served_tag}
    gates = {exported.views: record["int8_gate"]}
    made: list[str] = []
    sets = view_sets(exported)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        folder = Path(tmp)
        try:
            data = Prepared.load(DATASET_FILE)
            for views, tta in progress([(v, t) for v, t in sets.items() if v != exported.views], desc="exporting"):
                tags[views], gates[views] = export_views(tta, params, champion, data, folder / f"views-{views}")
                made.append(tags[views])
            np.save(folder / "images.npy", payload_images())
            servers = {
                views: stack.enter_context(
                    LocalServer(
                        "serving.service:Classifier", folder / f"{views}.log", BENTO_MODEL_TAG=tags[views]
                    ).wait_ready()
                )
                for views in sorted(sets)
            }
            targets = [t for views, s in servers.items() for t in targets_of(str(views), s)]
            warm_up(targets, folder / "images.npy")
            runs = interleaved(targets, "png", args.clients, 10**9, args, folder / "images.npy")
            with np.load(DATASET) as data:
                images, labels = data["x_test"][:, 0], data["y_test"]
            served = served_model(servers[exported.views].url)
            precision = served["precision"]
            for views, server in servers.items():
                measured = median_of(runs[str(views)])
                rows[str(views)] = {
                    "describe": sets[views].describe(),
                    "bentoml_tag": tags[views],
                    "offline_accuracy": gates[views][f"{precision}_test_accuracy"],
                    "served_accuracy": served_accuracy(server.url, images, labels)["accuracy"],
                    "requests_per_s": measured["requests_per_s"],
                    "p99_ms": measured["p99_ms"],
                    "errors": measured["errors"],
                    "ratio": paired_ratios(runs[str(views)], runs[str(exported.views)])["requests_per_s"],
                    "runs": runs[str(views)],
                }
        finally:
            stack.close()
            for tag in made:
                bentoml.models.delete(tag)
    results = {
        "model": champion["model"],
        "precision": precision,
        "clients": args.clients,
        "repeats": args.repeats,
        "exported_views": exported.views,
        "views": rows,
        "tolerance": params.gate.tolerance,
        "chosen": chosen(rows, params.gate.tolerance),
    }
    publish(results, table(results), args.output, served)


if __name__ == "__main__":
    main()
