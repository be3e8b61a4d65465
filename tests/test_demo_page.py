"""The demo page at /ui, in headless Chromium against a real `bentoml serve`: as a person uses it."""

import numpy as np
import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By

from common.model_store import read_metadata
from common.runtime import onnx_outputs
from tests.browser import chromium, screenshot, wait_for
from tests.serving_fixtures import contrast_images, png, serving

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(served_model, tmp_path_factory):
    with serving(served_model, tmp_path_factory.mktemp("logs") / "serve.log") as srv:
        yield srv


@pytest.fixture
def page(server, tmp_path):
    with chromium(tmp_path) as driver:
        driver.get(f"{server.url}/ui")
        wait_for(driver, lambda d: "Model" in d.find_element(By.ID, "model-card").text, "the model card")
        yield driver


def upload(driver, path) -> None:
    driver.find_element(By.ID, "file-input").send_keys(str(path))


def shown_prediction(driver, filename: str) -> tuple[str, dict[str, float]]:
    """The predicted class and every bar (class name: width as a fraction of its track) once the page has
    drawn its answer for `filename`: an earlier answer stays on screen until the new one replaces it."""
    wait_for(driver, lambda d: d.find_element(By.ID, "status").text == f"Classified {filename}.", "the prediction")
    assert driver.find_element(By.ID, "result").is_displayed()
    bars = {}
    for bar in driver.find_elements(By.CSS_SELECTOR, "#probabilities li"):
        track = bar.find_element(By.CLASS_NAME, "track").size["width"]
        bars[bar.get_attribute("data-class-name")] = bar.find_element(By.CLASS_NAME, "fill").size["width"] / track
    return driver.find_element(By.ID, "predicted-class").text, bars


def model_input_pixels(driver) -> np.ndarray:
    """The grey pixels of the page's "what the model sees" canvas."""
    rgba = driver.execute_script("""
        const canvas = document.getElementById('model-input');
        return Array.from(canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data);""")
    return np.asarray(rgba, dtype=np.uint8).reshape(28, 28, 4)[..., 0]


def test_uploading_a_test_image_shows_what_the_model_sees_and_says(page, served_model, tmp_path):
    image = served_model["x"][0, 0]
    path = tmp_path / "test-image-0.png"
    path.write_bytes(png(image))
    upload(page, path)
    predicted, bars = shown_prediction(page, path.name)
    screenshot(page, "demo-page-prediction")

    expected = served_model["offline"]["int8"]["probabilities"][0]  # what the served (int8) file says offline
    class_names = [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ]
    assert predicted == class_names[int(expected.argmax())]
    assert list(bars) == class_names
    assert max(bars, key=bars.get) == predicted
    np.testing.assert_allclose([bars[name] for name in class_names], expected, atol=0.02)  # widths, in pixels
    np.testing.assert_array_equal(model_input_pixels(page), image)  # a 28x28 dataset image is taken as it is
    card = page.find_element(By.ID, "model-card").text
    assert "mlp_512" in card and "CPUExecutionProvider" in card and "fashion-mnist" in card


def test_an_image_unlike_the_training_data_is_flagged(page, served_model, tmp_path):
    """An MNIST digit the served file scores over its threshold: the page says to doubt the prediction; a
    Fashion-MNIST image it scores under the threshold: no such warning."""
    served = served_model["files"]["int8"]
    threshold = read_metadata(served)["ood_threshold"]
    digits = contrast_images()[:200]
    digit = digits[int(np.argmax(onnx_outputs(served, digits)["ood_score"] > threshold))]
    clothes = served_model["x"][int(np.argmax(served_model["offline"]["int8"]["ood_score"] < threshold)), 0]
    for pixels, flagged in ((digit[0], True), (clothes, False)):
        path = tmp_path / f"flagged-{flagged}.png"
        path.write_bytes(png(pixels))
        upload(page, path)
        shown_prediction(page, path.name)
        warning = page.find_element(By.ID, "out-of-distribution")
        wait_for(
            page,
            lambda d, w=warning, f=flagged: w.is_displayed() == f,
            f"the warning {'shown' if flagged else 'hidden'}",
        )
        if flagged:
            assert "Unlike the images the model learned from" in warning.text
            screenshot(page, "demo-page-out-of-distribution")


def test_a_file_that_is_not_an_image_shows_the_apis_error(page, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("these are notes, not a picture")
    upload(page, path)
    error = wait_for(
        page,
        lambda d: d.find_element(By.ID, "error").is_displayed() and d.find_element(By.ID, "error"),
        "the error message",
    )
    screenshot(page, "demo-page-error")
    assert "Error 400" in error.text
    assert "the file is not an image in a format this service reads" in error.text  # the API's own words
    assert not page.find_element(By.ID, "result").is_displayed()


def test_a_drawing_is_classified(page):
    sketch = page.find_element(By.ID, "sketch")
    stroke = ActionChains(page).move_to_element_with_offset(sketch, -60, -100).click_and_hold()
    for dx, dy in ((0, 60), (0, 60), (0, 60), (60, 0), (60, 0)):  # an L-shaped stroke
        stroke = stroke.move_by_offset(dx, dy)
    stroke.release().perform()
    page.find_element(By.ID, "classify-drawing").click()
    predicted, bars = shown_prediction(page, "drawing.png")
    screenshot(page, "demo-page-drawing")
    assert predicted in bars and sum(bars.values()) == pytest.approx(1, abs=0.03)
    pixels = model_input_pixels(page)
    assert pixels.max() == 255 and (pixels > 0).mean() < 0.6  # the stroke, scaled and centred on black
