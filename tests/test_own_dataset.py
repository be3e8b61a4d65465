"""A dataset of the user's own, as image folders (`data.dataset: folders`), through the whole product against
real processes: `dvc repro` in a copy of the repo, then `bentoml serve` of what it chose, whose answers, model
card, Open Inference Protocol metadata and demo page name the folders' three classes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image, ImageDraw
from selenium.webdriver.common.by import By

from benchmarks.local_server import LocalServer
from tests.browser import chromium, screenshot, wait_for
from tests.conftest import copy_repo
from tests.pipeline_fixtures import VENV_BIN, edit_params, run, stage_env
from tests.test_demo_page import shown_prediction, upload

pytestmark = pytest.mark.slow
CLASSES = ["circle", "cross", "square"]  # sorted, as the pipeline orders the folders


def colour(rng: np.random.Generator, low: int, high: int) -> tuple[int, ...]:
    return tuple(int(v) for v in rng.integers(low, high, 3))


def shape_image(kind: str, rng: np.random.Generator, image_format: str = "PNG") -> bytes:
    """A photo-like file of one shape: any size, position and colours, dark on light or light on dark."""
    width, height = (int(v) for v in rng.integers(40, 160, 2))
    light = rng.random() < 0.5
    background, ink = (
        (colour(rng, 235, 256), colour(rng, 0, 90)) if light else (colour(rng, 0, 20), colour(rng, 160, 256))
    )
    image = Image.new("RGB", (width, height), background)
    side = int(rng.integers(min(width, height) // 3, min(width, height) - 4))
    left, top = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
    box = (left, top, left + side, top + side)
    draw = ImageDraw.Draw(image)
    if kind == "circle":
        draw.ellipse(box, fill=ink)
    elif kind == "square":
        draw.rectangle(box, fill=ink)
    else:
        stroke = max(2, side // 6)
        draw.line(box, fill=ink, width=stroke)
        draw.line((box[0], box[3], box[2], box[1]), fill=ink, width=stroke)
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def write_shapes(folder: Path, per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        (folder / kind).mkdir(parents=True)
        for n in range(per_class):
            image_format = ("PNG", "JPEG")[n % 2]
            (folder / kind / f"{kind}-{n:03d}.{image_format.lower()}").write_bytes(shape_image(kind, rng, image_format))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """`dvc repro` on 300 generated images in three class folders, then `bentoml serve` of its champion."""
    root = tmp_path_factory.mktemp("shapes")
    repo = copy_repo(root / "repo")
    write_shapes(repo / "data/own/shapes", 100, seed=0)

    def own_dataset(params: dict) -> None:
        params["data"].update(dataset="folders", contrast="auto")
        params["data"]["folders"].update(name="shapes", train="data/own/shapes", test="", test_size=0.2)
        params["train"].update(epochs=10, batch_size=16, verbose=2)

    edit_params(repo, {"train": 0, "test": 0}, ["cnn_basic"], own_dataset)
    env = stage_env(root / "no-mirror", root / "bentoml")  # nothing to fetch: no dataset mirror at all
    log = run([str(VENV_BIN / "dvc"), "repro"], repo, env, timeout=900)
    server = LocalServer("serving.service:Classifier", root / "serve.log", cwd=repo, BENTOML_HOME=env["BENTOML_HOME"])
    with server.wait_ready():
        yield repo, server, log


def test_the_pipeline_takes_its_classes_from_the_folders(shapes):
    repo, _, _ = shapes
    card = json.loads((repo / "data/prepared/card.json").read_text())
    assert card["dataset"] == "shapes" and card["class_names"] == CLASSES
    assert card["per_class"]["test"] == dict.fromkeys(CLASSES, 20)  # a stratified fifth held out as the test set
    assert json.loads((repo / "reports/evaluation/cnn_basic/confusion_matrix.json").read_text())["labels"] == CLASSES
    assert all(name in (repo / "reports/report.md").read_text() for name in CLASSES)
    champion = json.loads((repo / "champion.json").read_text())
    assert champion["registered_model"] == "shapes-classifier"
    assert champion["bentoml_tag"].startswith("shapes-classifier:")


def test_the_served_model_answers_in_the_folders_classes(shapes):
    _, server, _ = shapes
    rng = np.random.default_rng(1)  # images the pipeline never saw
    truth = [CLASSES[n % 3] for n in range(30)]
    answers = [
        requests.post(
            f"{server.url}/predict?details=true", files={"image": ("x.png", shape_image(kind, rng))}, timeout=30
        ).json()
        for kind in truth
    ]
    assert {tuple(p["class_name"] for p in a["probabilities"]) for a in answers} == {tuple(CLASSES)}
    assert np.mean([a["class_name"] == kind for a, kind in zip(answers, truth, strict=True)]) >= 0.8
    card = requests.get(f"{server.url}/model", timeout=10).json()
    assert card["class_names"] == CLASSES and card["dataset"] == "shapes"
    assert card["registered_model"] == "shapes-classifier"
    metadata = requests.get(f"{server.url}/v2/models/shapes-classifier", timeout=10).json()
    assert metadata["parameters"]["class_names"] == CLASSES
    assert {o["name"]: o["shape"] for o in metadata["outputs"]}["probabilities"] == [-1, 3]


def test_the_demo_page_shows_the_folders_classes(shapes, tmp_path):
    _, server, _ = shapes
    path = tmp_path / "square.png"
    path.write_bytes(shape_image("square", np.random.default_rng(2)))
    with chromium(tmp_path) as page:
        page.get(f"{server.url}/ui")
        wait_for(page, lambda d: "shapes" in d.find_element(By.ID, "model-card").text, "the model card")
        assert "circle, cross, square" in page.find_element(By.ID, "model-card").text
        upload(page, path)
        predicted, bars = shown_prediction(page, path.name)
        screenshot(page, "demo-page-own-dataset")
    assert list(bars) == CLASSES and predicted in CLASSES
