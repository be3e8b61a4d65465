"""Parse the source files (idx or CSV), split them, and store the prepared uint8 arrays."""

from __future__ import annotations

import gzip
import hashlib
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training import datasets
from training.config import DataSettings
from training.datasets import IMAGE_SHAPE, NUM_PIXELS
from training.errors import ConfigError, PipelineError

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
SPLITS = ("train", "val", "test")
FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip member can carry


class DataFormatError(PipelineError):
    """A source file is corrupt, truncated or not in the expected layout; the message names it."""


def _read_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise DataFormatError(f"{path}: corrupt or truncated gzip data ({exc})") from exc


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """An idx file (optionally gzipped) as a uint8 array, checking magic number and sizes."""
    data = _read_maybe_gzip(Path(path))
    if len(data) < 8:
        raise DataFormatError(f"{path}: {len(data)} bytes is too short for an idx header")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise DataFormatError(f"{path}: magic number {magic}, expected {expected_magic}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataFormatError(f"{path}: truncated header ({len(data)} bytes, {ndim} dimensions)")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected_len = header + int(np.prod(shape))
    if len(data) != expected_len:
        raise DataFormatError(
            f"{path}: header says shape {shape} ({expected_len} bytes) but the file has {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_idx_pair(images_path: Path, labels_path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if images.shape[1:] != IMAGE_SHAPE[1:]:
        raise DataFormatError(f"{images_path}: images are {images.shape[1:]}, expected {IMAGE_SHAPE[1:]}")
    if len(images) != len(labels):
        raise DataFormatError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    _check_labels(labels, num_classes, labels_path)
    return images.reshape(-1, *IMAGE_SHAPE), labels


def load_csv(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A CSV in the course layout: a header `label,pixel1..pixel784` (or pixel0..783), one image per row."""
    path = Path(path)
    with open(path) as f:
        header = f.readline().strip().split(",")
    first_pixel = header[1] if len(header) > 1 else ""
    expected = ["label"] + [f"pixel{i}" for i in range(1, NUM_PIXELS + 1)]
    expected0 = ["label"] + [f"pixel{i}" for i in range(NUM_PIXELS)]
    if header not in (expected, expected0):
        raise DataFormatError(
            f"{path}: header must be label,pixel1..pixel{NUM_PIXELS} or label,pixel0..pixel{NUM_PIXELS - 1}; "
            f"got {len(header)} columns starting {header[:2]} (first pixel column {first_pixel!r})"
        )
    try:
        table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    except ValueError as exc:
        raise DataFormatError(f"{path}: {exc}") from exc
    if table.shape[1] != NUM_PIXELS + 1:
        raise DataFormatError(f"{path}: rows have {table.shape[1]} columns, expected {NUM_PIXELS + 1}")
    pixels = table[:, 1:]
    if pixels.min(initial=0) < 0 or pixels.max(initial=0) > 255:
        raise DataFormatError(f"{path}: pixel values must be integers 0-255")
    _check_labels(table[:, 0], num_classes, path)
    return pixels.astype(np.uint8).reshape(-1, *IMAGE_SHAPE), table[:, 0].astype(np.uint8)


def _check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    if len(labels) and int(labels.max()) >= num_classes:
        raise DataFormatError(f"{path}: label {int(labels.max())} is outside 0..{num_classes - 1}")


def stratified_split(labels: np.ndarray, size: int | float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, chosen): `size` images (a count, or a fraction when < 1) with the class mix of `labels`."""
    n = len(labels)
    count = round(size * n) if isinstance(size, float) and size < 1 else int(size)
    if not 0 <= count <= n:
        raise ConfigError(f"cannot take {size} of {n} images")
    rng = np.random.default_rng(seed)
    classes, class_counts = np.unique(labels, return_counts=True)
    # largest-remainder allocation so the per-class counts add up to exactly `count`
    quota = class_counts * count / n
    take = np.floor(quota).astype(int)
    take[np.argsort(-(quota - take), kind="stable")[: count - take.sum()]] += 1
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take, strict=True)]
    chosen_idx = np.sort(np.concatenate(chosen)) if chosen else np.array([], dtype=int)
    rest_idx = np.setdiff1d(np.arange(n), chosen_idx)
    return rest_idx, chosen_idx


def save_npz(arrays: dict[str, np.ndarray], path: Path) -> None:
    """An .npz (what np.load reads) whose bytes depend on the arrays alone: np.savez stamps each member with the
    current time, and DVC would then see every re-run of a stage as new data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, array in arrays.items():
            member = zipfile.ZipInfo(f"{key}.npy", date_time=FIXED_ZIP_TIME)
            with archive.open(member, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)
    tmp.replace(path)


@dataclass
class Prepared:
    """The arrays every later stage reads: uint8 images [N,1,28,28] and labels per split."""

    arrays: dict[str, np.ndarray]

    def images(self, split: str) -> np.ndarray:
        return self.arrays[f"x_{split}"]

    def labels(self, split: str) -> np.ndarray:
        return self.arrays[f"y_{split}"]

    def save(self, path: Path) -> None:
        save_npz(self.arrays, path)

    @classmethod
    def load(cls, path: Path) -> Prepared:
        with np.load(path, allow_pickle=False) as f:
            return cls({k: f[k] for k in f.files})

    def digest(self, split: str | None = None) -> str:
        """sha256 of every array, or of one split's images and labels."""
        h = hashlib.sha256()
        for key in sorted(self.arrays if split is None else (f"x_{split}", f"y_{split}")):
            h.update(key.encode())
            h.update(np.ascontiguousarray(self.arrays[key]).tobytes())
        return h.hexdigest()


def class_counts(labels: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(labels, minlength=num_classes).tolist()


@dataclass
class PreparedDataset:
    """What the prepare stage writes: the split arrays and the dataset card every later stage reads."""

    prepared: Prepared
    card: dict


@dataclass
class Sources:
    """What a dataset's files hold: the training pool, the test set (each images and labels), the class names
    and the kind of files they came from."""

    pool: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    class_names: list[str]
    kind: str  # idx, csv or folders


def load_sources(settings: DataSettings, raw_dir: Path) -> Sources:
    """An official dataset's training pool and test set: the user's CSVs if set, else the idx files."""
    class_names = list(settings.spec.class_names)
    if settings.csv.train:
        pool, test = (load_csv(Path(path), len(class_names)) for path in (settings.csv.train, settings.csv.test))
        return Sources(pool, test, class_names, "csv")
    pool = load_idx_pair(raw_dir / datasets.TRAIN_IMAGES, raw_dir / datasets.TRAIN_LABELS, len(class_names))
    test = load_idx_pair(raw_dir / datasets.TEST_IMAGES, raw_dir / datasets.TEST_LABELS, len(class_names))
    return Sources(pool, test, class_names, "idx")


def subset(images: np.ndarray, labels: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified subset for quick runs; 0 keeps everything."""
    if not size or size >= len(labels):
        return images, labels
    _, keep = stratified_split(labels, size, seed)
    return images[keep], labels[keep]


def prepare_dataset(settings: DataSettings, sources: Sources) -> PreparedDataset:
    """Take the subsets, split train/validation (stratified) and describe the result."""
    class_names, num_classes = sources.class_names, len(sources.class_names)
    (x_pool, y_pool), (x_test, y_test) = sources.pool, sources.test
    x_pool, y_pool = subset(x_pool, y_pool, settings.subset.train, settings.seed)
    x_test, y_test = subset(x_test, y_test, settings.subset.test, settings.seed)
    train_idx, val_idx = stratified_split(y_pool, settings.val_size, settings.seed)
    prepared = Prepared(
        {
            "x_train": x_pool[train_idx],
            "y_train": y_pool[train_idx],
            "x_val": x_pool[val_idx],
            "y_val": y_pool[val_idx],
            "x_test": x_test,
            "y_test": y_test,
        }
    )
    train_pixels = prepared.images("train").astype(np.float32) / 255.0
    card = {
        "dataset": settings.name,
        "source": sources.kind,
        "class_names": class_names,
        "image_shape": list(IMAGE_SHAPE),
        "sha256": prepared.digest(),
        "pixel_mean": float(train_pixels.mean()),
        "pixel_std": float(train_pixels.std()),
        "images": {split: len(prepared.labels(split)) for split in SPLITS},
        "per_class": {
            split: dict(zip(class_names, class_counts(prepared.labels(split), num_classes), strict=True))
            for split in SPLITS
        },
    }
    return PreparedDataset(prepared, card)
