"""Image folders as data: `<folder>/<class name>/<any image file>`, converted by the service's own preprocessing,
so an image trains the model exactly as it would be served. They are a whole dataset of the user's own
(`data.dataset: folders`, class names from the folder names), or extra training data for any dataset
(`data.extra`), of which a share, chosen by a hash of each file's name, is held out as that folder's own test
set."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.preprocess import MAX_IMAGE_PIXELS, ImageError, image_to_input
from training.config import FEEDBACK_DIR, DataSettings
from training.data import (
    SPLITS,
    Prepared,
    PreparedDataset,
    Sources,
    class_counts,
    load_sources,
    prepare_dataset,
    stratified_split,
)
from training.datasets import IMAGE_SHAPE, MAX_CLASSES, MIN_CLASSES
from training.errors import ConfigError, PipelineError

log = logging.getLogger("prepare")


class FolderFormatError(PipelineError):
    """A file in an image folder the pipeline cannot use; the message names it."""


@dataclass
class ImageFolder:
    """One folder's images (uint8 [N,1,28,28]), labels, and file names relative to the folder."""

    images: np.ndarray
    labels: np.ndarray
    names: list[str]

    def take(self, mask: np.ndarray) -> ImageFolder:
        names = [name for name, keep in zip(self.names, mask, strict=True) if keep]
        return ImageFolder(self.images[mask], self.labels[mask], names)


def folder_name(class_name: str) -> str:
    """A class's folder: its name, a `/` (T-shirt/top) written as `_`."""
    return class_name.replace("/", "_")


def image_files(folder: Path, class_names: list[str]) -> list[tuple[Path, int]]:
    """Every file of every class folder with its class index, sorted; dot files (.DS_Store, ...) skipped. A
    folder that is not a class is one line naming it and the classes."""
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder (expected {folder}/<class name>/<image files>)")
    index = {folder_name(name): i for i, name in enumerate(class_names)}
    files = []
    for class_dir in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
        if not class_dir.is_dir():
            continue
        if class_dir.name not in index:
            raise ConfigError(
                f"{class_dir}: {class_dir.name!r} is not a class name; expected one of {', '.join(index)}"
            )
        found = (p for p in sorted(class_dir.rglob("*")) if p.is_file() and not p.name.startswith("."))
        files += [(path, index[class_dir.name]) for path in found]
    return files


def read_folder(folder: Path, class_names: list[str], upload_fit: int) -> ImageFolder:
    """A folder's images as model inputs, through the service's preprocessing."""
    files = image_files(folder, class_names)
    images = np.zeros((len(files), *IMAGE_SHAPE), np.uint8)
    for n, (path, _) in enumerate(files):
        try:
            images[n] = image_to_input(path.read_bytes(), IMAGE_SHAPE[-1], upload_fit, MAX_IMAGE_PIXELS)
        except ImageError as exc:
            raise FolderFormatError(f"{path}: {exc}") from None
    labels = np.array([label for _, label in files], np.uint8)
    return ImageFolder(images, labels, [path.relative_to(folder).as_posix() for path, _ in files])


def folder_classes(folder: Path) -> list[str]:
    """A dataset folder's class names: its subfolders' names, sorted; 2 to 100 of them, each with files."""
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder (expected {folder}/<class name>/<image files>)")
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not MIN_CLASSES <= len(names) <= MAX_CLASSES:
        raise ConfigError(
            f"{folder}: {len(names)} class folders ({', '.join(names) or 'none'}); a dataset takes "
            f"{MIN_CLASSES} to {MAX_CLASSES}, one folder per class"
        )
    empty = [name for name in names if not any(p.is_file() for p in (folder / name).rglob("[!.]*"))]
    if empty:
        raise ConfigError(f"{folder}: class folders with no image files: {', '.join(empty)}")
    return names


def load_folders(settings: DataSettings) -> Sources:
    """`data.folders` as a dataset: the training folder's classes and images; the test folder's images, or a
    seeded stratified `test_size` of the training folder's."""
    folders = settings.folders
    class_names = folder_classes(Path(folders.train))
    pool = read_folder(Path(folders.train), class_names, settings.spec.upload_fit)
    if folders.test:
        test = read_folder(Path(folders.test), class_names, settings.spec.upload_fit)
        return Sources((pool.images, pool.labels), (test.images, test.labels), class_names, "folders")
    rest, chosen = stratified_split(pool.labels, folders.test_size, settings.seed)
    return Sources(
        (pool.images[rest], pool.labels[rest]), (pool.images[chosen], pool.labels[chosen]), class_names, "folders"
    )


def prepare(settings: DataSettings, raw_dir: Path) -> PreparedDataset:
    """The prepare stage's data: the dataset (official files, CSVs or folders), split, with `data.extra`."""
    sources = load_folders(settings) if settings.from_folders else load_sources(settings, raw_dir)
    return add_extra_folders(prepare_dataset(settings, sources), settings)


def held_out(names: list[str], share: float) -> np.ndarray:
    """Which files are held out: those whose name's sha256 falls in the first `share` of its range, so a file
    stays on its side when others are added, removed or moved to another class."""
    fractions = [int.from_bytes(hashlib.sha256(Path(n).name.encode()).digest()[:8], "big") / 2**64 for n in names]
    return np.array(fractions, dtype=np.float64) < share


def holdout_split(folder: str) -> str:
    """The split name of an extra folder's held-out images."""
    return f"holdout_{Path(folder).name}"


def extra_folders(settings: DataSettings) -> list[str]:
    """`data.extra`'s folders that hold images: the feedback folder is listed by default and stays empty until
    `make feedback-data` writes labelled predictions into it; any other listed folder must exist."""
    found = []
    for folder in settings.extra:
        path = Path(folder)
        if path == FEEDBACK_DIR and not any(p.is_file() for p in path.glob("*/[!.]*")):
            log.info("%s holds no labelled images yet (`make feedback-data` writes them): nothing added", folder)
            continue
        found.append(folder)
    return found


def add_extra_folders(result: PreparedDataset, settings: DataSettings) -> PreparedDataset:
    """The prepared data with each of `data.extra`'s folders: its files, less their held-out share, appended to
    the training split; the held-out share as a split of its own. Validation and test stay as they are."""
    folders = extra_folders(settings)
    if not folders:
        return result
    arrays, card = dict(result.prepared.arrays), dict(result.card)
    class_names = card["class_names"]
    extra: dict[str, dict[str, int | str]] = {}
    held: list[str] = []
    for folder in folders:
        images = read_folder(Path(folder), class_names, settings.spec.upload_fit)
        mask = held_out(images.names, settings.extra_holdout)
        train, holdout = images.take(~mask), images.take(mask)
        arrays["x_train"] = np.concatenate([arrays["x_train"], train.images])
        arrays["y_train"] = np.concatenate([arrays["y_train"], train.labels])
        split = holdout_split(folder)
        arrays[f"x_{split}"], arrays[f"y_{split}"] = holdout.images, holdout.labels
        extra[folder] = {"train": len(train.labels), "holdout": len(holdout.labels), "split": split}
        held.append(split)
    prepared = Prepared(arrays)
    splits = [*SPLITS, *held]
    card |= {
        "sha256": prepared.digest(),
        "images": {split: len(prepared.labels(split)) for split in splits},
        "per_class": {
            split: dict(zip(class_names, class_counts(prepared.labels(split), len(class_names)), strict=True))
            for split in splits
        },
        "extra": extra,
    }
    return PreparedDataset(prepared, card)
