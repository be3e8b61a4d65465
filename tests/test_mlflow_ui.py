"""The MLflow comparison as a person sees it: `mlflow ui` on the tiny pipeline's store, in headless Chromium."""

import json

import pytest
from mlflow import MlflowClient
from PIL import Image
from selenium.webdriver.common.by import By

from benchmarks.local_server import ChildServer
from tests.browser import chromium, screenshot, wait_for
from tests.pipeline_fixtures import VENV_BIN, ZOO, zoo_runs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mlflow_ui(pipeline, tmp_path_factory):
    """`mlflow ui` (what `make ui` starts) on the pipeline's own tracking store, on a loopback port."""
    repo, *_ = pipeline
    folder = tmp_path_factory.mktemp("mlflow-ui")
    server = ChildServer(
        [
            str(VENV_BIN / "mlflow"),
            "ui",
            "--backend-store-uri",
            f"sqlite:///{repo / 'mlflow.db'}",
            "--artifacts-destination",
            str(folder / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            "{port}",
            "--workers",
            "1",
        ],
        folder / "mlflow-ui.log",
        "/health",
    )
    yield server.wait_ready()
    server.close()


@pytest.fixture(scope="module")
def runs(pipeline):
    repo, *_ = pipeline
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fashion-mnist")
    found = zoo_runs(client.search_runs([experiment.experiment_id]))
    return experiment.experiment_id, {r.info.run_name: r for r in found}


@pytest.fixture
def browser(tmp_path):
    with chromium(tmp_path) as driver:
        driver.set_window_size(1800, 1100)  # room for the runs table beside MLflow's side panels
        yield driver


def page_text(driver) -> str:
    return driver.find_element(By.TAG_NAME, "body").text


SCROLL_TO_METRICS = """
    const heading = [...document.querySelectorAll("body *")].find(
        (e) => /^Metrics \\(\\d+\\)$/.test(e.textContent.trim()) && e.children.length < 3);
    if (heading) heading.scrollIntoView();"""


def shown_metrics(text: str, names: tuple[str, ...]) -> dict[str, str]:
    """The values a run page's Metrics table shows (each metric's name, then its value, one per line)."""
    if "Metrics (" not in text:  # not rendered yet
        return {}
    lines = text[text.index("Metrics (") :].splitlines()
    return {name: lines[lines.index(name) + 1] for name in names if name in lines}


def test_every_zoo_model_is_listed_with_its_metrics(mlflow_ui, runs, browser):
    experiment_id, by_name = runs
    assert sorted(by_name) == sorted(ZOO)
    browser.get(f"{mlflow_ui.url}/#/experiments/{experiment_id}/runs")
    wait_for(browser, lambda d: all(name in page_text(d) for name in ZOO), "every zoo model in the runs list")
    screenshot(browser, "mlflow-runs")
    # the Dataset column: each run's training split, by name and digest, as logged with mlflow.log_input
    trained_on = {
        i.dataset.digest for run in by_name.values() for i in run.inputs.dataset_inputs if i.tags[0].value == "train"
    }
    assert len(trained_on) == 1  # the same prepared data for every model
    shown = f"fashion-mnist ({next(iter(trained_on))})"
    wait_for(
        browser,
        lambda d: "Dataset" in page_text(d) and shown in page_text(d),
        "the training dataset in the runs list's Dataset column",
    )

    metrics = ("val_accuracy", "best_val_accuracy", "test_loss", "test_accuracy")
    for name in ZOO:
        run = by_name[name]
        browser.get(f"{mlflow_ui.url}/#/experiments/{experiment_id}/runs/{run.info.run_id}")
        wait_for(browser, lambda d: len(shown_metrics(page_text(d), metrics)) == len(metrics), f"the metrics of {name}")
        browser.execute_script(SCROLL_TO_METRICS)  # for the screenshot
        screenshot(browser, f"mlflow-run-{name}")
        assert name in page_text(browser)
        for metric, shown in shown_metrics(page_text(browser), metrics).items():
            digits = shown.rstrip("…")  # long values are cut short with an ellipsis
            assert len(digits) >= 4 and repr(run.data.metrics[metric]).startswith(digits), (name, metric, shown)


def test_the_champions_confusion_matrix_is_shown(mlflow_ui, runs, pipeline, browser):
    repo, *_ = pipeline
    experiment_id, by_name = runs
    champion = json.loads((repo / "champion.json").read_text())
    assert by_name[champion["model"]].info.run_id == champion["run_id"]
    browser.get(
        f"{mlflow_ui.url}/#/experiments/{experiment_id}/runs/{champion['run_id']}"
        "/artifacts/evaluation/confusion_matrix.png"
    )
    # the preview fetches the file and shows it from a blob: URL; the figure is the only large image
    image = wait_for(
        browser,
        lambda d: (
            "evaluation/confusion_matrix.png" in page_text(d)
            and next(
                (
                    img
                    for img in d.find_elements(By.TAG_NAME, "img")
                    if d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 400
                ),
                None,
            )
        ),
        "the confusion matrix image",
    )
    screenshot(browser, "mlflow-champion-confusion-matrix")
    shown = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
    figure = Image.open(repo / "reports/evaluation" / champion["model"] / "confusion_matrix.png")
    assert tuple(shown) == figure.size  # the evaluate stage's figure, decoded by the browser
    assert "pipeline_report" in page_text(browser)  # the report logged by the select stage, beside it
