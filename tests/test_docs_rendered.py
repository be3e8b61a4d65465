"""README.md and docs/*.md rendered by a CommonMark renderer (markdown-it, with GitHub's tables) and shown in
headless Chromium: what a person reading them on GitHub sees, with a screenshot of each page."""

from pathlib import Path

import pytest
from markdown_it import MarkdownIt
from selenium.webdriver.common.by import By

from pipelines.docs import DOCUMENTS
from tests.browser import chromium, screenshot
from tests.conftest import REPO

pytestmark = pytest.mark.slow
STYLE = """body { font: 15px/1.5 sans-serif; max-width: 1000px; margin: 2em auto; }
table { border-collapse: collapse; } th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; }
pre { background: #f4f4f4; padding: 8px; overflow-x: auto; } img { max-width: 480px; }"""


def render(doc: str, folder: Path) -> Path:
    """`doc` as an HTML page beside a <base> at its own folder, so its relative links and images resolve."""
    source = REPO / doc
    body = MarkdownIt("commonmark").enable("table").render(source.read_text())
    page = folder / (doc.replace("/", "-") + ".html")
    base = source.parent.as_uri() + "/"
    page.write_text(f'<!doctype html><meta charset="utf-8"><base href="{base}"><style>{STYLE}</style>{body}')
    return page


def section(driver, title: str) -> list:
    """The elements between the h2 `title` and the next h2 (XPath: later siblings with that h2 before them)."""
    xpath = (
        f"//h2[normalize-space()='{title}']/following-sibling::*[preceding-sibling::h2[1][normalize-space()='{title}']]"
    )
    return driver.find_elements(By.XPATH, xpath)


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rendered")
    return {doc: render(doc, folder) for doc in DOCUMENTS}


def test_readme_renders_its_sections_outside_the_diagram(pages, tmp_path):
    with chromium(tmp_path) as driver:
        driver.get(pages["README.md"].as_uri())
        screenshot(driver, "docs-README")
        diagrams = driver.find_elements(By.CSS_SELECTOR, "pre > code.language-mermaid")
        assert len(diagrams) == 1 and diagrams[0].text.startswith("flowchart LR")
        assert "## " not in diagrams[0].text and "|" not in diagrams[0].text.replace("-->|", "").split("\n")[0]
        configuration = section(driver, "Configuration")
        assert configuration and configuration[0].tag_name == "table"
        assert "dataset mirror" in configuration[0].text
        team = section(driver, "Working as a team")
        blocks = [e for e in team if e.tag_name == "pre"]
        assert blocks and "make mlflow-server" in blocks[0].text
        headings = [h.text for h in driver.find_elements(By.TAG_NAME, "h2")]
        assert {"Quick start", "Configuration", "Working as a team", "Serving", "Results", "Tests"} <= set(headings)
        images = driver.find_elements(By.TAG_NAME, "img")
        assert images and all(driver.execute_script("return arguments[0].naturalWidth", i) > 0 for i in images)


@pytest.mark.parametrize("doc", [d for d in DOCUMENTS if d != "README.md"])
def test_each_doc_renders_with_its_tables_and_images(pages, doc, tmp_path):
    with chromium(tmp_path) as driver:
        driver.get(pages[doc].as_uri())
        screenshot(driver, "docs-" + Path(doc).stem)
        text = driver.find_element(By.TAG_NAME, "body").text
        assert "```" not in text and "<!-- begin" not in text  # no fence or block marker shown as text
        assert driver.find_elements(By.TAG_NAME, "table"), f"{doc} renders no table"
        for image in driver.find_elements(By.TAG_NAME, "img"):
            assert driver.execute_script("return arguments[0].naturalWidth", image) > 0, image.get_attribute("src")
