"""idx and CSV parsing, and the stratified split."""

import gzip
import re
import time
import zipfile

import numpy as np
import pytest

from tests.conftest import write_idx
from training.data import (
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    DataFormatError,
    Prepared,
    load_csv,
    load_idx_pair,
    read_idx,
    stratified_split,
)
from training.datasets import TEST_IMAGES, TEST_LABELS


@pytest.fixture
def idx_pair(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(20, 28, 28), dtype=np.uint8)
    labels = np.arange(20, dtype=np.uint8) % 10
    return (
        write_idx(tmp_path / "images.gz", images, IDX_IMAGES_MAGIC),
        write_idx(tmp_path / "labels.gz", labels, IDX_LABELS_MAGIC),
        images,
        labels,
    )


def test_reads_an_idx_pair(idx_pair):
    images_path, labels_path, images, labels = idx_pair
    x, y = load_idx_pair(images_path, labels_path, num_classes=10)
    assert x.shape == (20, 1, 28, 28) and x.dtype == np.uint8
    np.testing.assert_array_equal(x[:, 0], images)
    np.testing.assert_array_equal(y, labels)


def test_reads_uncompressed_idx(tmp_path):
    path = write_idx(tmp_path / "labels", np.array([1, 2, 3], dtype=np.uint8), IDX_LABELS_MAGIC, compress=False)
    np.testing.assert_array_equal(read_idx(path, IDX_LABELS_MAGIC), [1, 2, 3])


def test_wrong_magic_names_the_file(idx_pair):
    _, labels_path, *_ = idx_pair
    with pytest.raises(DataFormatError, match=re.escape(f"{labels_path}: magic number 2049, expected 2051")):
        read_idx(labels_path, IDX_IMAGES_MAGIC)


def test_truncated_idx_payload_is_an_error(tmp_path):
    path = tmp_path / "short.gz"
    raw = gzip.decompress(write_idx(path, np.zeros((5, 28, 28), np.uint8), IDX_IMAGES_MAGIC).read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DataFormatError, match=rf"{path}: header says shape \(5, 28, 28\)"):
        read_idx(path, IDX_IMAGES_MAGIC)


def test_truncated_header_is_an_error(tmp_path):
    path = tmp_path / "header.gz"
    path.write_bytes(gzip.compress(IDX_IMAGES_MAGIC.to_bytes(4, "big") + (5).to_bytes(4, "big") + b"\x00\x1c"))
    with pytest.raises(DataFormatError, match=f"{path}: truncated header"):
        read_idx(path, IDX_IMAGES_MAGIC)


def test_truncated_gzip_stream_is_an_error(tmp_path, idx_pair):
    images_path = idx_pair[0]
    cut = tmp_path / "cut.gz"
    cut.write_bytes(images_path.read_bytes()[:200])
    with pytest.raises(DataFormatError, match=f"{cut}: corrupt or truncated gzip"):
        read_idx(cut, IDX_IMAGES_MAGIC)


def test_label_out_of_range_is_an_error(tmp_path, idx_pair):
    images_path = idx_pair[0]
    labels = write_idx(tmp_path / "bad-labels.gz", np.full(20, 12, np.uint8), IDX_LABELS_MAGIC)
    with pytest.raises(DataFormatError, match=f"{labels}: label 12 is outside 0..9"):
        load_idx_pair(images_path, labels, num_classes=10)


def test_count_mismatch_is_an_error(tmp_path, idx_pair):
    images_path = idx_pair[0]
    labels = write_idx(tmp_path / "few.gz", np.zeros(3, np.uint8), IDX_LABELS_MAGIC)
    with pytest.raises(DataFormatError, match=r"has 20 images but .* has 3 labels"):
        load_idx_pair(images_path, labels, num_classes=10)


def test_official_test_files_parse(shared_datasets):
    folder = shared_datasets / "fashion-mnist"
    x, y = load_idx_pair(folder / TEST_IMAGES, folder / TEST_LABELS, num_classes=10)
    assert x.shape == (10000, 1, 28, 28)
    assert np.bincount(y).tolist() == [1000] * 10


@pytest.mark.parametrize("first", [0, 1])
def test_reads_the_course_csv_layout(tmp_path, first):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(4, 784))
    labels = np.array([3, 1, 4, 1])
    header = "label," + ",".join(f"pixel{i}" for i in range(first, first + 784))
    path = tmp_path / "train.csv"
    np.savetxt(path, np.column_stack([labels, pixels]), fmt="%d", delimiter=",", header=header, comments="")
    x, y = load_csv(path, num_classes=10)
    assert x.shape == (4, 1, 28, 28)
    np.testing.assert_array_equal(x.reshape(4, -1), pixels)
    np.testing.assert_array_equal(y, labels)


def test_csv_errors_name_the_file_and_problem(tmp_path):
    header = "label," + ",".join(f"pixel{i}" for i in range(1, 785))
    bad_header = tmp_path / "header.csv"
    bad_header.write_text("label,a,b\n1,2,3\n")
    with pytest.raises(DataFormatError, match=f"{bad_header}: header must be"):
        load_csv(bad_header, 10)
    bad_pixel = tmp_path / "pixel.csv"
    bad_pixel.write_text(header + "\n1," + ",".join(["300"] * 784) + "\n")
    with pytest.raises(DataFormatError, match=f"{bad_pixel}: pixel values must be integers 0-255"):
        load_csv(bad_pixel, 10)
    short_row = tmp_path / "short.csv"
    short_row.write_text(header + "\n1,2,3\n")
    with pytest.raises(DataFormatError, match=str(short_row)):
        load_csv(short_row, 10)


def test_stratified_split_keeps_class_proportions():
    labels = np.repeat(np.arange(10), [600, 500, 400, 300, 200, 100, 600, 500, 400, 300])
    rest, chosen = stratified_split(labels, 0.1, seed=7)
    assert len(chosen) == round(0.1 * len(labels))
    assert np.bincount(labels[chosen]).tolist() == [60, 50, 40, 30, 20, 10, 60, 50, 40, 30]
    assert np.intersect1d(rest, chosen).size == 0
    assert np.union1d(rest, chosen).tolist() == list(range(len(labels)))


def test_stratified_split_by_count_adds_up_exactly():
    labels = np.arange(1000) % 10
    _, chosen = stratified_split(labels, 333, seed=0)
    counts = np.bincount(labels[chosen], minlength=10)
    assert counts.sum() == 333 and counts.max() - counts.min() <= 1


def test_stratified_split_is_deterministic_per_seed():
    labels = np.arange(5000) % 10
    a = stratified_split(labels, 0.2, seed=1)[1]
    b = stratified_split(labels, 0.2, seed=1)[1]
    c = stratified_split(labels, 0.2, seed=2)[1]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_prepared_arrays_round_trip(tmp_path):
    arrays = {"x_train": np.zeros((2, 1, 28, 28), np.uint8), "y_train": np.array([1, 2], np.uint8)}
    Prepared(arrays).save(tmp_path / "d.npz")
    loaded = Prepared.load(tmp_path / "d.npz")
    assert loaded.digest() == Prepared(arrays).digest()
    np.testing.assert_array_equal(loaded.labels("train"), [1, 2])


def test_prepared_file_bytes_depend_on_the_arrays_alone(tmp_path):
    """DVC hashes the file: the same arrays saved at different times must give the same bytes."""
    arrays = {"x_train": np.arange(784, dtype=np.uint8).reshape(1, 1, 28, 28), "y_train": np.array([3], np.uint8)}
    Prepared(arrays).save(tmp_path / "a.npz")
    with zipfile.ZipFile(tmp_path / "a.npz") as archive:
        assert {m.date_time for m in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    time.sleep(2.1)  # zip timestamps have a 2-second resolution
    Prepared(arrays).save(tmp_path / "b.npz")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
