"""Image folders as training data, feedback as an image folder, the retraining advice: in-process."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.preprocess import MAX_IMAGE_PIXELS, image_to_input
from monitoring.report import retrain_advice
from pipelines import feedback_data
from training.config import MonitorSettings, Params
from training.data import Prepared, PreparedDataset
from training.errors import ConfigError
from training.folders import FolderFormatError, add_extra_folders, held_out, prepare, read_folder

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def photo(seed: int, size=(90, 60), mode="RGB") -> bytes:
    """A colour photo-like file: a dark object on a light background."""
    rng = np.random.default_rng(seed)
    pixels = np.full((*size[::-1], 3), 235, np.uint8)
    pixels[10:-10, 15:-15] = rng.integers(0, 80, (size[1] - 20, size[0] - 30, 3))
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="JPEG" if mode == "RGB" else "PNG")
    return buffer.getvalue()


def make_folder(root, files: dict[str, int]):
    """{class name: how many photos}, each with its own name."""
    for name, count in files.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for n in range(count):
            (root / name / f"{name[:3]}-{n}.jpg").write_bytes(photo(n))
    return root


def test_a_folder_is_read_with_the_services_preprocessing(tmp_path):
    folder = make_folder(tmp_path / "photos", {"Sneaker": 3, "Bag": 2})
    (folder / "Bag" / ".DS_Store").write_bytes(b"\0")  # dot files are skipped
    read = read_folder(folder, CLASSES, upload_fit=28)
    assert read.names == [
        "Bag/Bag-0.jpg",
        "Bag/Bag-1.jpg",
        "Sneaker/Sne-0.jpg",
        "Sneaker/Sne-1.jpg",
        "Sneaker/Sne-2.jpg",
    ]
    assert read.labels.tolist() == [8, 8, 7, 7, 7] and read.images.shape == (5, 1, 28, 28)
    np.testing.assert_array_equal(read.images[2], image_to_input(photo(0), 28, 28, MAX_IMAGE_PIXELS))


def test_a_typo_in_a_class_folder_is_one_line_naming_it(tmp_path):
    folder = make_folder(tmp_path / "photos", {"Sneaker": 1, "Sneakr": 1})
    with pytest.raises(ConfigError) as error:
        read_folder(folder, CLASSES, 28)
    message = str(error.value)
    assert "'Sneakr' is not a class name" in message and "T-shirt_top, Trouser" in message and "\n" not in message


def test_a_file_that_is_no_image_is_one_line_naming_it(tmp_path):
    folder = make_folder(tmp_path / "photos", {"Bag": 1})
    (folder / "Bag" / "notes.txt").write_text("not an image")
    with pytest.raises(FolderFormatError) as error:
        read_folder(folder, CLASSES, 28)
    assert str(error.value).startswith(f"{folder / 'Bag' / 'notes.txt'}: the file is not an image")
    assert "\n" not in str(error.value)


def folder_settings(**folders):
    """The committed data params with `data.dataset: folders` and these `data.folders` keys."""
    raw = Params.load(REPO_PARAMS).model_dump()
    raw["data"].update(dataset="folders", val_size=0.2)
    raw["data"]["folders"].update(folders)
    return Params.from_dict(raw).data


def test_a_dataset_of_folders_takes_its_classes_from_the_folder_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_folder(tmp_path / "data/own/mine", {"zebra": 10, "apple": 10, "mango": 5})
    settings = folder_settings(name="mine", train="data/own/mine", test="", test_size=0.2)
    assert settings.contrast_spec is None  # auto: nothing to contrast a dataset of anything with
    card = prepare(settings, tmp_path / "data/raw").card
    assert card["dataset"] == "mine" and card["source"] == "folders"
    assert card["class_names"] == ["apple", "mango", "zebra"]
    assert card["per_class"]["test"] == {"apple": 2, "mango": 1, "zebra": 2}  # a stratified fifth
    assert sum(card["images"].values()) == 25
    make_folder(tmp_path / "data/own/mine-test", {"apple": 3, "zebra": 2})  # a test folder may lack a class
    tested = prepare(
        settings.model_copy(update={"folders": settings.folders.model_copy(update={"test": "data/own/mine-test"})}),
        tmp_path,
    )
    assert tested.card["per_class"]["test"] == {"apple": 3, "mango": 0, "zebra": 2}
    assert tested.card["images"]["train"] + tested.card["images"]["val"] == 25


def test_a_dataset_of_folders_needs_2_to_100_classes_each_with_images(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = folder_settings(train="data/own/mine")
    make_folder(tmp_path / "data/own/mine", {"apple": 4})
    with pytest.raises(ConfigError, match=r"data/own/mine: 1 class folders \(apple\); a dataset takes 2 to 100"):
        prepare(settings, tmp_path)
    (tmp_path / "data/own/mine/pear").mkdir()
    with pytest.raises(ConfigError, match="class folders with no image files: pear"):
        prepare(settings, tmp_path)
    make_folder(tmp_path / "data/own/test", {"apple": 1, "pears": 1})
    (tmp_path / "data/own/mine/pear/p.jpg").write_bytes(photo(1))
    with pytest.raises(ConfigError, match="'pears' is not a class name; expected one of apple, pear"):
        prepare(
            settings.model_copy(update={"folders": settings.folders.model_copy(update={"test": "data/own/test"})}),
            tmp_path,
        )


def test_dataset_folders_must_be_where_the_prepare_stage_looks():
    with pytest.raises(ConfigError) as error:
        folder_settings(train="/home/me/pictures")
    assert str(error.value) == (
        "params.yaml: data.folders.train is '/home/me/pictures': this folder goes in data/own/ (the prepare stage's "
        "dependency)"
    )
    with pytest.raises(ConfigError) as error:
        folder_settings(name="My Images")
    assert str(error.value).startswith("params.yaml: data.folders.name is 'My Images': lowercase letters, digits")


def test_the_held_out_share_follows_the_file_name_alone():
    names = [f"Bag/{n}.png" for n in range(2000)]
    mask = held_out(names, 0.2)
    assert 0.17 < mask.mean() < 0.23
    moved = [name.replace("Bag/", "Coat/") for name in names[:100]]  # relabelled by a move: same side
    np.testing.assert_array_equal(held_out(moved, 0.2), mask[:100])


def test_extra_folders_join_training_and_hold_out_their_share(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_folder(tmp_path / "data/extra/photos", {"Sneaker": 20, "Bag": 20})
    rng = np.random.default_rng(0)
    arrays = {
        f"{kind}_{split}": rng.integers(0, 10 if kind == "y" else 256, (n, 1, 28, 28) if kind == "x" else n).astype(
            np.uint8
        )
        for split, n in (("train", 50), ("val", 10), ("test", 10))
        for kind in ("x", "y")
    }
    base = PreparedDataset(Prepared(arrays), {"class_names": CLASSES, "dataset": "fashion-mnist"})
    settings = Params.load(REPO_PARAMS).data.model_copy(update={"extra": ["data/extra/photos"]})
    result = add_extra_folders(base, settings)
    extra = result.card["extra"]["data/extra/photos"]
    assert extra["train"] + extra["holdout"] == 40 and 0 < extra["holdout"] < 20
    assert len(result.prepared.labels("train")) == 50 + extra["train"]
    assert len(result.prepared.labels("holdout_photos")) == extra["holdout"]
    for split in ("val", "test"):  # the official splits stay exactly as they are
        np.testing.assert_array_equal(result.prepared.images(split), arrays[f"x_{split}"])
    assert result.card["images"]["holdout_photos"] == extra["holdout"]
    assert add_extra_folders(base, settings.model_copy(update={"extra": []})) is base


def test_the_feedback_folder_is_read_by_default_once_it_holds_images(tmp_path, monkeypatch):
    """params.yaml lists data/extra/feedback: absent or empty, it adds nothing and changes nothing (the prepared
    data stays byte for byte what it was); once `make feedback-data` wrote images, they train."""
    monkeypatch.chdir(tmp_path)
    settings = Params.load(REPO_PARAMS).data
    assert settings.extra == ["data/extra/feedback"]
    rng = np.random.default_rng(0)
    arrays = {f"x_{s}": rng.integers(0, 256, (10, 1, 28, 28)).astype(np.uint8) for s in ("train", "val", "test")}
    arrays |= {f"y_{s}": rng.integers(0, 10, 10).astype(np.uint8) for s in ("train", "val", "test")}
    base = PreparedDataset(Prepared(arrays), {"class_names": CLASSES, "dataset": "fashion-mnist"})
    assert add_extra_folders(base, settings) is base
    (tmp_path / "data/extra/feedback").mkdir(parents=True)
    assert add_extra_folders(base, settings) is base
    make_folder(tmp_path / "data/extra/feedback", {"Bag": 30})
    result = add_extra_folders(base, settings)
    assert result.card["extra"]["data/extra/feedback"]["train"] + len(result.prepared.labels("holdout_feedback")) == 30
    with pytest.raises(ConfigError, match="data/extra/photos: no such folder"):
        add_extra_folders(base, settings.model_copy(update={"extra": ["data/extra/photos"]}))  # any other: must exist


def test_feedback_images_keep_what_a_person_did_until_a_newer_label(tmp_path, monkeypatch):
    folder = tmp_path / "feedback"
    monkeypatch.setattr(feedback_data, "MANIFEST", tmp_path / "feedback.json")
    pixels = np.arange(784, dtype=np.uint8).tobytes()
    now = time.time()
    assert feedback_data.write_folder({"ab": (now, "Dress", pixels)}, folder)["added"] == 1
    written = folder / "Dress" / "ab.png"
    assert np.asarray(Image.open(written)).tobytes() == pixels
    (folder / "Coat").mkdir()
    written.rename(folder / "Coat" / "ab.png")  # a person relabels it by moving the file
    assert feedback_data.write_folder({"ab": (now, "Dress", pixels)}, folder)["unchanged"] == 1
    assert (folder / "Coat" / "ab.png").exists() and not written.exists()
    relabelled = feedback_data.write_folder({"ab": (now + 1, "Bag", pixels)}, folder)  # a newer label
    assert relabelled["relabelled"] == 1 and sorted(folder.glob("*/ab.png")) == [folder / "Bag" / "ab.png"]
    feedback_data.write_folder({"cd": (now, "T-shirt/top", pixels)}, folder)
    assert (folder / "T-shirt_top" / "cd.png").exists()  # a class folder for T-shirt/top
    assert read_folder(folder, CLASSES, 28).labels.tolist() == [8, 0]  # and back: every file a class


def test_retraining_is_advised_on_drift_or_low_accuracy_with_enough_new_labels():
    settings = MonitorSettings(min_live_accuracy=0.85, min_new_labels=200)
    assert retrain_advice(False, 0.9, 500, settings)[0] is False
    advised, reason = retrain_advice(False, 0.8, 500, settings)
    assert advised and "live accuracy 80.00% under 85.00%" in reason
    assert retrain_advice(True, None, 500, settings)[0] is True
    waiting, why = retrain_advice(True, None, 10, settings)
    assert not waiting and "only 10 new labels (at least 200)" in why
