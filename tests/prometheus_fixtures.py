"""Debian's Prometheus on loopback, configured from monitoring/ and scraping a server of the test's: for the tests
of the alert rules and of what the service's metrics add up to."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import requests
import yaml

from benchmarks.local_server import ChildServer
from tests.conftest import REPO

MONITORING = REPO / "monitoring"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(
            f"{name} is not installed (Debian package prometheus; `make test` installs it where it runs as root "
            "with apt-get)"
        )
    return path


class Prometheus(ChildServer):
    """monitoring/prometheus.yml and its rules, scraping `target` (host:port, or several) every second."""

    def __init__(self, target: str | list[str], folder: Path):
        config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        config["rule_files"] = [str(MONITORING / rule) for rule in config["rule_files"]]
        config["scrape_configs"][0]["static_configs"] = [{"targets": [target] if isinstance(target, str) else target}]
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        command = [
            tool("prometheus"),
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            "--web.listen-address=127.0.0.1:{port}",
        ]
        super().__init__(command, folder / "prometheus.log", "/-/ready", cwd=folder)

    def query(self, expression: str) -> float | None:
        """The instant value of a PromQL expression that gives one sample, or None while it gives none."""
        answer = requests.get(f"{self.url}/api/v1/query", params={"query": expression}, timeout=10).json()
        assert answer["status"] == "success", answer
        samples = answer["data"]["result"]
        return float(samples[0]["value"][1]) if samples else None

    def wait_for(self, expression: str, until, timeout: float = 60) -> float:
        """The expression's value once `until(value)` holds (Prometheus scrapes and evaluates every second)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.query(expression)
            if value is not None and until(value):
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{expression} was {value} after {timeout} s\n{self.log_path.read_text()[-3000:]}")
            time.sleep(1)
