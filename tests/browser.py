"""Headless Debian Chromium driven by Selenium, for tests that look at pages as a person does.

`make test` installs chromium and chromium-driver first (tests/install_debian_packages.sh); where they are missing
the browser tests skip and say why. Screenshots go to test-artifacts/screenshots (TEST_ARTIFACTS overrides).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import REPO

ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", REPO / "test-artifacts")) / "screenshots"
# Without the background-networking flags Chromium keeps dialling out, and a closed network refuses it,
# many times at every start.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1100",
)


def chromium_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip(
            "Chromium and ChromeDriver are not installed (Debian packages chromium, chromium-driver; "
            "`make test` installs them where it runs as root with apt-get)"
        )
    return chromium, driver


@contextlib.contextmanager
def chromium(tmp_path: Path):
    """A fresh headless Chromium with its own profile; Selenium Manager stays offline (SE_OFFLINE)."""
    binary, driver_path = chromium_paths()
    os.environ.setdefault("SE_OFFLINE", "true")  # never try to download a driver or a browser
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: webdriver.Chrome, name: str) -> Path:
    """A PNG of the whole page under test-artifacts/screenshots, for a person to look at."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    width, height = driver.execute_script(
        "return [window.outerWidth, document.documentElement.scrollHeight]"
    )  # the whole page, not just the top
    driver.set_window_size(width, max(1100, min(int(height) + 40, 4000)))
    driver.save_screenshot(str(path))
    return path


def wait_for(driver: webdriver.Chrome, condition: Callable[[webdriver.Chrome], object], what: str, timeout: float = 60):
    """Wait until `condition(driver)` is truthy; on timeout, fail naming `what` (with a screenshot)."""
    try:
        return WebDriverWait(driver, timeout).until(condition)
    except TimeoutException:
        shot = screenshot(driver, f"timeout-{what.replace(' ', '-')}")
        pytest.fail(f"timed out after {timeout} s waiting for {what} (screenshot {shot})")
