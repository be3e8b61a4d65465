"""Two replicas behind a load balancer, as docs/serving.md's deployment topology: each replica on a host of its
own (a network namespace with its own address and hostname, joined to this machine by a bridge), Debian's nginx
in front with deploy/nginx.conf, Debian's Prometheus scraping both, SeaweedFS (as `make storage` runs it) as
the store of their prediction logs. 60 s of bounded load through nginx; one replica killed with SIGKILL at 15 s
(and started again, as a supervisor would, after the load); the store stopped from 30 s to 50 s. Then: every
answer 200 (but a request the killed replica was answering at the kill, which nginx cannot retry), the bucket
holds each 200 answer's record exactly once (DuckDB), the killed replica's included, labels for 200
predictions of both replicas posted through nginx are all accepted, and `make monitor` on the bucket reports
their true accuracy."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from benchmarks.local_server import free_port
from common.log_queries import count_predictions, read_predictions
from tests.conftest import REPO
from tests.prometheus_fixtures import Prometheus
from tests.serving_fixtures import MODEL_NAME, png
from tests.storage_fixtures import start_storage

pytestmark = pytest.mark.slow
SUBNET = "10.77.0"  # deploy/nginx.conf's upstream addresses
BRIDGE = "fm-replicas"
REPLICAS = {"replica-1": f"{SUBNET}.2", "replica-2": f"{SUBNET}.3"}
PORT = 3000
CLIENTS = 8
LOAD_S, KILL_AT_S, STORE_DOWN_S = 60, 15, (30, 50)
IN_FLIGHT_S = 5  # a request the killed replica had begun to answer fails within this of the kill: nginx retries
# a request only until its answer has begun to reach the client
TOKEN = "a-feedback-token-for-tests"


def run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True)


@contextlib.contextmanager
def hosts():
    """A bridge holding this machine's address on the subnet, and a namespace per replica joined to it."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    for tool in ("ip", "unshare", "nginx", "prometheus"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is missing (tests/install_debian_packages.sh installs nginx and prometheus as root)")
    if f"{SUBNET}." in subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout:
        pytest.skip(f"{SUBNET}.0/24 is in use on this machine")
    try:
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        run("ip", "addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
        run("ip", "link", "set", BRIDGE, "up")
        for n, (name, address) in enumerate(REPLICAS.items()):
            run("ip", "netns", "add", name)
            run("ip", "link", "add", f"fm-veth{n}", "type", "veth", "peer", "name", "eth0", "netns", name)
            run("ip", "link", "set", f"fm-veth{n}", "master", BRIDGE)
            run("ip", "link", "set", f"fm-veth{n}", "up")
            run("ip", "netns", "exec", name, "ip", "addr", "add", f"{address}/24", "dev", "eth0")
            run("ip", "netns", "exec", name, "ip", "link", "set", "eth0", "up")
            run("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield
    finally:
        for n, name in enumerate(REPLICAS):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            subprocess.run(["ip", "link", "del", f"fm-veth{n}"], capture_output=True)
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


class Replica:
    """`bentoml serve` in the replica's namespace, under its own hostname, its log in a folder of its own."""

    def __init__(self, name: str, folder: Path, env: dict[str, str]):
        self.name, self.url = name, f"http://{REPLICAS[name]}:{PORT}"
        self.folder, self.env = folder / name, env | {"SERVING_PREDICTION_LOG_DIR": str(folder / name / "log")}
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen | None = None

    def start(self) -> Replica:
        bentoml = str(Path(sys.executable).parent / "bentoml")
        serve = [bentoml, "serve", "serving.service:Classifier", "--host", REPLICAS[self.name], "--port", str(PORT)]
        named = ["unshare", "--uts", "sh", "-c", f'hostname {self.name} && exec "$@"', "sh", *serve]
        with open(self.folder / "serve.log", "a") as log:
            self.process = subprocess.Popen(
                ["ip", "netns", "exec", self.name, *named], cwd=REPO, env=self.env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.folder / "serve.log").read_text()[-3000:]
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            time.sleep(0.5)
        raise AssertionError(f"{self.name} not ready:\n{(self.folder / 'serve.log').read_text()[-3000:]}")

    def pids(self) -> list[int]:
        """Every process of the replica's host: bentoml serve and its workers, wherever they were started."""
        listed = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True).stdout
        return [int(pid) for pid in listed.split()]

    def signal_all(self, signal_number: int) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal_number)

    def kill(self) -> None:
        """SIGKILL to every process of the replica's host at once, as a machine lost."""
        self.signal_all(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while self.pids():
            assert time.monotonic() < deadline, f"{self.name} outlived SIGKILL: {self.pids()}"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.signal_all(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.contextmanager
def nginx(folder: Path):
    """deploy/nginx.conf as it is, listening on a free loopback port instead of 8080."""
    port = free_port()
    config = (REPO / "deploy" / "nginx.conf").read_text().replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    (folder / "nginx.conf").write_text(config)
    command = ["nginx", "-p", str(folder), "-c", str(folder / "nginx.conf"), "-g", "daemon off;"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(requests.ConnectionError):
                requests.get(f"{url}/livez", timeout=2)
                break
            assert process.poll() is None and time.monotonic() < deadline, (folder / "error.log").read_text()
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


class Load:
    """`CLIENTS` clients posting test images to /predict through nginx, one request at a time each, until stopped
    (at the latest when its block ends, so that a failed test leaves no client running): every answer's status,
    prediction id, image index and the time it came."""

    def __init__(self, url: str, images: list[bytes]):
        self.url, self.images = url, images
        self.answers: list[tuple[int, str | None, int, float]] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(CLIENTS)]
        for thread in self.threads:
            thread.start()

    def _client(self, n: int) -> None:
        with requests.Session() as session:
            i = n
            while not self.stopping.is_set():
                index = i % len(self.images)
                try:
                    response = session.post(
                        f"{self.url}/predict", files={"image": ("x.png", self.images[index])}, timeout=60
                    )
                    status, body = response.status_code, response.json() if response.status_code == 200 else {}
                except requests.RequestException:
                    status, body = 0, {}
                self.answers.append((status, body.get("prediction_id"), index, time.time()))
                i += CLIENTS

    def stop(self) -> list[tuple[int, str | None, int, float]]:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=120)
        return self.answers

    def __enter__(self) -> Load:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def test_two_replicas_behind_nginx_survive_a_killed_replica_and_a_store_outage(served_model, tmp_path, monkeypatch):
    with hosts():
        store = start_storage(tmp_path / "storage", host=f"{SUBNET}.1")
        for name, value in store.env.items():
            monkeypatch.setenv(name, value)
        env = {
            **os.environ,
            "BENTOML_HOME": str(served_model["home"]),
            "BENTO_MODEL_TAG": f"{MODEL_NAME}:latest",
            "BENTOML_DO_NOT_TRACK": "true",
            "SERVING_WORKERS": "1",
            "SERVING_FEEDBACK_TOKEN": TOKEN,
            "SERVING_PREDICTION_LOG_FILE_S": "1",
        }
        replicas = {name: Replica(name, tmp_path, env).start() for name in REPLICAS}
        targets = [f"{address}:{PORT}" for address in REPLICAS.values()]
        prometheus = Prometheus(targets, tmp_path).wait_ready()
        images = [png(image[0]) for image in served_model["x"]]
        try:
            for target in targets:
                prometheus.wait_for(f'up{{instance="{target}"}}', lambda up: up == 1)
            with nginx(tmp_path) as url:
                started = time.monotonic()
                with Load(url, images) as load:
                    time.sleep(KILL_AT_S)
                    killed_at = time.time()
                    replicas["replica-1"].kill()
                    time.sleep(STORE_DOWN_S[0] - KILL_AT_S)
                    store.close()
                    time.sleep(STORE_DOWN_S[1] - STORE_DOWN_S[0])
                    store = start_storage(tmp_path / "storage", port=store.server.port, host=f"{SUBNET}.1")
                    time.sleep(max(0.0, LOAD_S - (time.monotonic() - started)))
                    answers = load.stop()
                replicas["replica-1"].start()  # as a supervisor would: it closes and uploads what the killed one left

                # Prometheus saw the killed replica down, and the other's uploads fail while the store was away
                replica_1 = targets[0]
                assert prometheus.query(f'min_over_time(up{{instance="{replica_1}"}}[5m])') == 0
                failures = f'max_over_time(serving_prediction_log_upload_failures_total{{instance="{targets[1]}"}}[5m])'
                assert (prometheus.query(failures) or 0) > 0

                # every answer 200 but those the killed replica was giving at the kill (a connection cut mid-answer)
                failed = [(status, when - killed_at) for status, _, _, when in answers if status != 200]
                assert all(status == 0 and 0 <= after <= IN_FLIGHT_S for status, after in failed), failed
                served = {pid: (index, when) for status, pid, index, when in answers if status == 200}
                assert len(served) == len(answers) - len(failed)  # every id once

                bucket = f"{store.env['STORAGE_URL']}/prediction-log"
                deadline = time.monotonic() + 120
                while count_predictions(bucket) != (len(served), len(served)) and time.monotonic() < deadline:
                    time.sleep(1)
                records, distinct = count_predictions(bucket)
                logged = {r["id"] for r in read_predictions(bucket, columns=("id",))}
                assert records == distinct == len(served) and logged == set(served), sorted(set(served) ^ logged)[:10]
                print(f"answers {len(answers)}, failed at the kill {len(failed)}, records {records}")

                assert len({pid[:16] for pid in logged}) == 2  # a worker of each replica answered
                chosen = pick_from_each_worker(sorted(logged), 200)
                truth = {pid: int(served_model["y"][served[pid][0]]) for pid in chosen}
                for pid in chosen:
                    answer = requests.post(
                        f"{url}/feedback", json={"prediction_id": pid, "label": truth[pid]},
                        headers={"authorization": f"Bearer {TOKEN}"}, timeout=60,
                    )  # fmt: skip
                    assert answer.status_code == 201, answer.text
            predicted = {r["id"]: r["label"] for r in read_predictions(bucket, columns=("id", "label"))}
            deadline = time.monotonic() + 60
            report = monitor(tmp_path, served_model, bucket)
            while report["feedback"] < len(chosen) and time.monotonic() < deadline:  # the last labels' uploads
                time.sleep(2)
                report = monitor(tmp_path, served_model, bucket)
            assert report["feedback"] == len(chosen)
            true_accuracy = np.mean([predicted[pid] == truth[pid] for pid in chosen])
            assert report["live_accuracy"] == pytest.approx(true_accuracy)
        finally:
            prometheus.close()
            for replica in replicas.values():
                replica.stop()
            store.close()


def pick_from_each_worker(ids: list[str], count: int) -> list[str]:
    """`count` ids, as evenly as may be from each worker's (the token their first 16 digits name)."""
    by_worker: dict[str, list[str]] = {}
    for pid in ids:
        by_worker.setdefault(pid[:16], []).append(pid)
    chosen: list[str] = []
    while len(chosen) < count:
        for worker_ids in by_worker.values():
            if worker_ids and len(chosen) < count:
                chosen.append(worker_ids.pop())
    return chosen


def monitor(folder: Path, served_model, bucket: str) -> dict:
    """`make monitor` on the bucket: its JSON report."""
    env = {
        **os.environ,
        "BENTOML_HOME": str(served_model["home"]),
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
        "DO_NOT_TRACK": "1",
    }
    command = [sys.executable, "-m", "monitoring.report", "--log-dir", bucket, "--out", str(folder / "reports")]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((folder / "reports" / "latest.json").read_text())
