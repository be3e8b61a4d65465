"""`bentoml serve` as a child process on loopback, ready when /readyz says so: for tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

import requests

from common.ports import free_ports

REPO = Path(__file__).resolve().parents[1]


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(host, 1)[0]


class ChildServer:
    """Starts a server command (`{port}` in it: `port`, by default a free loopback port), with `env` added to
    the environment, and waits for `ready_path` to answer 200; `close()` stops it (SIGTERM, then kill), and with
    `group` every process it started too (its own session: for a launcher whose server outlives it). `routes`
    are the paths its clients post each kind of request to (benchmarks/loadgen.py's defaults: the service's)."""

    def __init__(
        self,
        command: list[str],
        log_path: Path,
        ready_path: str,
        *,
        cwd: Path | str = REPO,
        port: int | None = None,
        group: bool = False,
        env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
    ):
        self.port = port or free_port(host)
        self.routes: dict[str, str] = {}
        self.url = f"http://{host}:{self.port}"
        self.ready_path = ready_path
        self.log_path = log_path
        self.log = open(log_path, "w")  # noqa: SIM115 -- open while the server runs; close() closes it
        self.command = [part.format(port=self.port) for part in command]
        self.process = subprocess.Popen(
            self.command,
            cwd=cwd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "BENTOML_DO_NOT_TRACK": "true", **(env or {})},
            start_new_session=group,
        )
        self.group = group

    def wait_ready(self, timeout: float = 180) -> Self:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None or "Application startup failed" in self.log_path.read_text():
                self.close()
                raise RuntimeError(f"{self.command[0]} failed to start:\n{self.log_path.read_text()[-5000:]}")
            try:
                if requests.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.close()
        raise RuntimeError(f"not ready within {timeout}s:\n{self.log_path.read_text()[-5000:]}")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        if self.group:
            self.close_group()
        elif self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()

    def close_group(self) -> None:
        """SIGTERM to every process of the server's session; SIGKILL to those left after 30 s."""
        deadline = time.monotonic() + 30
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
            while time.monotonic() < deadline:
                self.process.poll()  # reaps the launcher, so that only live processes count
                os.killpg(self.process.pid, 0)
                time.sleep(0.2)
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


class LocalServer(ChildServer):
    """`bentoml serve <target>` on a free loopback port, ready when /readyz says so."""

    def __init__(self, target: str, log_path: Path, *, cwd: Path | str = REPO, **env: str):
        super().__init__(
            [str(Path(sys.executable).parent / "bentoml"), "serve", target, "--host", "127.0.0.1", "--port", "{port}"],
            log_path,
            "/readyz",
            cwd=cwd,
            env=env,
        )


def benchmarked_service(log_path: Path, **env: str) -> LocalServer:
    """The service as `make serve` runs it, ready, its prediction log in a folder of its own beside `log_path`:
    a benchmark's traffic stays out of the workspace's log (what `make monitor` reads), and every run starts
    from an empty one."""
    env.setdefault("SERVING_PREDICTION_LOG_DIR", str(log_path.with_name(f"{log_path.stem}-predictions")))
    return LocalServer("serving.service:Classifier", log_path, **env).wait_ready()
