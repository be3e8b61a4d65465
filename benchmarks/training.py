"""Training benchmark (`make bench-train`): our trainer against a tutorial-style loop, side by side.

Both train the same zoo model (the committed params: architecture, batch size, optimizer, schedule,
augmentations) on the prepared training set on the same device. The tutorial-style loop is the code
most course notebooks write: a per-sample `Dataset` that converts and augments one image at a time,
a shuffling `DataLoader`, float32, the default memory format. Ours is training/trainer.py: the dataset
resident on the device as uint8, batched augmentation there, channels_last, bf16 autocast where the
device has it natively. Each repeat times one pass over the same number of images with both, alternating;
the table gives the medians and the ratio. Then our trainer runs the committed schedule in full,
checking test accuracy after each epoch (with the pipeline's test-time augmentation, as the evaluate stage
scores it) for the time to reach the target accuracy (94%).
Prints tables and writes JSON (benchmarks/results/training.json).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from benchmarks.publish import publish
from common.files import read_json
from training.checkpoint import new_model
from training.config import CARD_FILE, DATASET_FILE, Params, TrainConfig, TtaSettings
from training.data import Prepared
from training.evaluation import predict_logits
from training.models import TestTimeAugmented
from training.progress import progress
from training.trainer import make_optimizer, make_scheduler, resolve_device, seed_everything, train

RESULTS = Path("benchmarks/results/training.json")


class TutorialDataset(Dataset):
    """One image at a time, as float32 pixels, with the same augmentations drawn per sample."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, config: TrainConfig):
        self.images, self.labels, self.config = images, labels, config

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = torch.from_numpy(self.images[index]).float()
        pad = self.config.translate
        if pad:
            dy, dx = torch.randint(0, 2 * pad + 1, (2,)).tolist()
            image = F.pad(image, (pad,) * 4)[:, dy : dy + 28, dx : dx + 28]
        if self.config.hflip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        if torch.rand(()) < self.config.erase:
            area = float(torch.empty(()).uniform_(0.02, 0.25)) * 28 * 28
            ratio = float(torch.empty(()).uniform_(np.log(0.3), np.log(3.3)).exp())
            h = int(min(28, max(1, round((area * ratio) ** 0.5))))
            w = int(min(28, max(1, round((area / ratio) ** 0.5))))
            top, left = int(torch.randint(0, 29 - h, ())), int(torch.randint(0, 29 - w, ()))
            image = image.clone()
            image[:, top : top + h, left : left + w] = 0
        return image, int(self.labels[index])


def tutorial_epoch(
    model: torch.nn.Module, dataset: TutorialDataset, config: TrainConfig, device: torch.device, workers: int
) -> float:
    """One epoch the tutorial way; returns images per second."""
    loader = DataLoader(
        dataset, batch_size=config.batch_size, shuffle=True, num_workers=workers, pin_memory=device.type == "cuda"
    )
    optimizer = make_optimizer(config, model.parameters())
    scheduler = make_scheduler(config, optimizer, len(loader))
    model.train()
    started = time.perf_counter()
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels, label_smoothing=config.label_smoothing)
        loss.backward()
        optimizer.step()
        scheduler.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(dataset) / (time.perf_counter() - started)


def our_epoch(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig) -> float:
    one_epoch = config.model_copy(update={"epochs": 1, "patience": 0, "verbose": 0})
    result = train(model, x, y, x[:256], y[:256], one_epoch)
    return len(x) / result.history[0]["seconds"]


def time_to_accuracy(model, data: Prepared, config: TrainConfig, tta: TtaSettings, target: float) -> dict:
    """Our trainer on the committed schedule, with test accuracy (test-time augmented) after every epoch."""
    x_test, y_test = torch.from_numpy(data.images("test")), torch.from_numpy(data.labels("test")).long()
    scored = TestTimeAugmented(model, tta)
    curve, elapsed = [], 0.0

    def check(record: dict) -> None:
        nonlocal elapsed
        elapsed += record["seconds"]
        accuracy = (predict_logits(scored, x_test, 1024 // tta.views).argmax(1) == y_test).float().mean().item()
        curve.append({"epoch": record["epoch"], "seconds": round(elapsed, 1), "test_accuracy": accuracy})
        print(f"  epoch {record['epoch']}: {elapsed:7.1f} s, test accuracy {accuracy:.4f}", file=sys.stderr)

    train(
        model,
        torch.from_numpy(data.images("train")),
        torch.from_numpy(data.labels("train")),
        torch.from_numpy(data.images("val")),
        torch.from_numpy(data.labels("val")),
        config.model_copy(update={"patience": 0, "verbose": 0}),
        on_epoch_end=check,
    )
    reached = next((point for point in curve if point["test_accuracy"] >= target), None)
    return {"target": target, "reached": reached, "curve": curve}


def table(results: dict) -> str:
    """The throughput comparison as markdown (one row per repeat, then the medians) and the time to accuracy."""
    lines = ["| repeat | ours (images/s) | tutorial loop (images/s) | ratio |", "|---:|---:|---:|---:|"]
    for r in results["throughput"]:
        lines.append(f"| {r['repeat']} | {r['ours']:.0f} | {r['tutorial']:.0f} | {r['ratio']:.2f}x |")
    median = results["median"]
    lines.append(f"| median | {median['ours']:.0f} | {median['tutorial']:.0f} | **{median['ratio']:.2f}x** |")
    header = (
        f"{results['model']}, batch {results['batch_size']}, {results['device_name']}, {results['threads']} threads:"
    )
    lines.insert(0, header + "\n")
    accuracy = results.get("time_to_accuracy")
    if accuracy:
        target, reached = accuracy["target"], accuracy["reached"]
        best = max(point["test_accuracy"] for point in accuracy["curve"])
        if reached:
            projected = accuracy["tutorial_projected_seconds"]
            lines.append(
                f"\nTime to {target:.0%} test accuracy with our trainer: {reached['seconds']:.0f} s (epoch "
                f"{reached['epoch']}; the tutorial loop at its measured speed: {projected:.0f} s, projected)."
            )
        else:
            lines.append(
                f"\n{target:.0%} test accuracy not reached in {len(accuracy['curve'])} epochs (best {best:.2%})."
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet")
    parser.add_argument("--images", type=int, default=12800, help="images per timed pass (0: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the tutorial loop")
    parser.add_argument("--target", type=float, default=0.94, help="test accuracy for time-to-accuracy")
    parser.add_argument("--skip-accuracy", action="store_true", help="only the images/s comparison")
    args = parser.parse_args()

    params, card = Params.load(), read_json(CARD_FILE)
    data = Prepared.load(DATASET_FILE)
    config = params.train_config(args.model)
    device = resolve_device(config.device)

    def fresh_model() -> torch.nn.Module:
        seed_everything(config.seed)
        return new_model(args.model, params, card)

    count = args.images or len(data.images("train"))
    x, y = data.images("train")[:count], data.labels("train")[:count]
    dataset = TutorialDataset(x, y, config)
    x_ours, y_ours = torch.from_numpy(x), torch.from_numpy(y)
    rows = []
    for repeat in progress(range(args.repeats), desc="throughput repeats", unit="repeat"):
        ours = our_epoch(fresh_model(), x_ours, y_ours, config)
        tutorial = tutorial_epoch(fresh_model().to(device), dataset, config, device, args.workers)
        rows.append({"repeat": repeat + 1, "ours": ours, "tutorial": tutorial, "ratio": ours / tutorial})
    median = {k: statistics.median(r[k] for r in rows) for k in ("ours", "tutorial", "ratio")}
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"

    accuracy = None
    if not args.skip_accuracy:
        print(f"\ntime to {args.target:.0%} test accuracy, our trainer, {config.epochs} epochs:", file=sys.stderr)
        accuracy = time_to_accuracy(fresh_model(), data, config, params.tta_for(args.model), args.target)
        if accuracy["reached"]:
            epochs = accuracy["reached"]["epoch"]
            accuracy["tutorial_projected_seconds"] = epochs * len(data.images("train")) / median["tutorial"]

    results = {
        "model": args.model,
        "device": device.type,
        "device_name": device_name,
        "torch": torch.__version__,
        "batch_size": config.batch_size,
        "images_per_pass": count,
        "dataloader_workers": args.workers,
        "threads": torch.get_num_threads(),
        "train_config": config.model_dump(),
        "throughput": rows,
        "median": median,
        "time_to_accuracy": accuracy,
    }
    publish(results, "\n" + table(results), RESULTS)


if __name__ == "__main__":
    main()
