"""The fetch stage's download logic, against local folders and HTTP servers on loopback."""

import http.server
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import pytest

from tests.conftest import REPO, sha256
from training.datasets import DatasetSpec, get_spec
from training.fetch import FetchError, fetch_dataset, fetch_file, resolve_sources


class _Server(http.server.ThreadingHTTPServer):
    """A file server that records the paths asked for and misbehaves as told, one request at a time."""

    requests: list[str]
    behaviour: list[str]


class _Handler(http.server.SimpleHTTPRequestHandler):
    server: _Server

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.requests.append(self.path)
        behaviour = self.server.behaviour.pop(0) if self.server.behaviour else "serve"
        if behaviour == "503":
            self.send_error(503)
        elif behaviour == "truncate":  # promise the whole file, send half, hang up
            self._send_half()
            self.close_connection = True
        elif behaviour == "stall":  # send half the file, then keep the connection open
            self._send_half()
            time.sleep(30)
        else:
            super().do_GET()

    def _send_half(self):
        data = Path(self.translate_path(self.path)).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()


@pytest.fixture
def http_server():
    servers = []

    def start(folder: Path, behaviour=()):
        server = _Server(("127.0.0.1", 0), partial(_Handler, directory=str(folder)))
        server.requests, server.behaviour = [], list(behaviour)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server, f"http://127.0.0.1:{server.server_port}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def dest(tmp_path) -> Path:
    """The empty download folder."""
    folder = tmp_path / "raw"
    folder.mkdir()
    return folder


@pytest.fixture
def source(tmp_path) -> tuple[Path, str, str]:
    """A folder with one small file; returns (folder, name, sha256)."""
    folder = tmp_path / "source"
    folder.mkdir()
    path = folder / "file.gz"
    path.write_bytes(bytes(range(256)) * 4000)
    return folder, path.name, sha256(path)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_fetches_from_a_local_mirror_folder(dest, source):
    folder, name, digest = source
    path = fetch_file(name, digest, dest, [str(folder)], progress=False)
    assert sha256(path) == digest
    assert _leftovers(dest) == [name]


def test_fetches_from_a_base_url_over_http(dest, source, http_server):
    folder, name, digest = source
    server, url = http_server(folder)
    fetch_file(name, digest, dest, [url], progress=False)
    assert sha256(dest / name) == digest
    assert server.requests == [f"/{name}"]


def test_checksum_mismatch_raises_and_leaves_no_file(dest, source):
    folder, name, _ = source
    with pytest.raises(FetchError, match="sha256 mismatch"):
        fetch_file(name, "0" * 64, dest, [str(folder)], progress=False)
    assert _leftovers(dest) == []


def test_mirror_is_tried_first_then_the_official_urls(tmp_path, dest, source, http_server):
    folder, name, digest = source
    empty = tmp_path / "empty-mirror"
    empty.mkdir()
    spec = DatasetSpec(
        "toy",
        urls=("http://official.invalid/",),
        sha256={name: digest},
        class_names=("a",),
        hflip_ok=False,
        upload_fit=28,
    )
    assert resolve_sources(spec, str(empty)) == [str(empty), "http://official.invalid/"]
    assert resolve_sources(spec, "/data/{dataset}/") == ["/data/toy/", "http://official.invalid/"]
    assert resolve_sources(spec, None) == ["http://official.invalid/"]
    # a mirror that lacks the file falls through to the next source
    server, url = http_server(folder)
    fetch_file(name, digest, dest, [str(empty), url], progress=False)
    assert server.requests == [f"/{name}"]
    # and a mirror that has it is used without touching the next source
    server.requests.clear()
    (dest / name).unlink()
    fetch_file(name, digest, dest, [str(folder), url], progress=False)
    assert server.requests == []


def test_retries_a_transient_http_error(dest, source, http_server):
    folder, name, digest = source
    server, url = http_server(folder, behaviour=["503"])
    fetch_file(name, digest, dest, [url], backoff=0.01, progress=False)
    assert len(server.requests) == 2
    assert sha256(dest / name) == digest


def test_an_interrupted_download_leaves_no_partial_file(dest, source, http_server):
    folder, name, digest = source
    server, url = http_server(folder, behaviour=["truncate"] * 3)
    with pytest.raises(FetchError) as error:
        fetch_file(name, digest, dest, [url], retries=3, backoff=0.01, progress=False)
    assert _leftovers(dest) == []
    assert len(server.requests) == 3
    assert url in str(error.value)


def test_when_every_source_fails_the_error_says_which_and_why(tmp_path, dest, source, http_server):
    _, name, digest = source
    empty = tmp_path / "empty"
    empty.mkdir()
    _, url = http_server(empty)
    unreachable = "http://127.0.0.1:9/"  # the discard port: connection refused
    with pytest.raises(FetchError) as error:
        fetch_file(
            name, digest, dest, [str(empty), url, unreachable], retries=2, backoff=0.01, timeout=2, progress=False
        )
    message = str(error.value)
    assert f"could not fetch {name}" in message
    assert f"{empty}: no file" in message
    assert f"{url}: HTTP 404" in message
    assert f"{unreachable}: attempt 2/2" in message
    assert _leftovers(dest) == []


def test_already_verified_files_are_not_downloaded_again(dest, source, http_server):
    folder, name, digest = source
    server, url = http_server(folder)
    fetch_file(name, digest, dest, [url], progress=False)
    fetch_file(name, digest, dest, [url], progress=False)
    assert server.requests == [f"/{name}"]
    # a corrupted copy is replaced
    (dest / name).write_bytes(b"garbage")
    fetch_file(name, digest, dest, [url], progress=False)
    assert sha256(dest / name) == digest and len(server.requests) == 2


@pytest.mark.parametrize("dataset", ["fashion-mnist", "mnist"])
def test_fetches_the_official_files_from_the_offline_mirror(tmp_path, shared_datasets, dataset):
    spec = get_spec(dataset)
    paths = fetch_dataset(spec, tmp_path / "raw", mirror=str(shared_datasets / "{dataset}"), progress=False)
    assert sorted(p.name for p in paths) == sorted(spec.files)
    assert all(sha256(p) == spec.sha256[p.name] for p in paths)


def test_a_download_killed_midway_leaves_nothing_a_later_run_trusts(tmp_path, dest, http_server):
    """kill -9 while the bytes arrive: no file under the final name; the next run fetches and verifies it
    and removes the partial file."""
    folder, name = tmp_path / "big-source", "big.gz"
    folder.mkdir()
    (folder / name).write_bytes(bytes(range(256)) * 32768)  # 8 MiB: several read chunks before the stall
    digest = sha256(folder / name)
    _, stalling = http_server(folder, behaviour=["stall"])
    code = (
        "import sys; from pathlib import Path; from training.fetch import fetch_file; "
        "fetch_file(sys.argv[1], sys.argv[2], Path(sys.argv[3]), [sys.argv[4]], progress=False)"
    )
    process = subprocess.Popen([sys.executable, "-c", code, name, digest, str(dest), stalling], cwd=REPO)
    deadline = time.monotonic() + 60
    while not any(p.stat().st_size for p in dest.glob("*.part")):
        assert time.monotonic() < deadline and process.poll() is None, "the download never started"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    assert not (dest / name).exists()
    spec = DatasetSpec("toy", urls=(), sha256={name: digest}, class_names=("a",), hflip_ok=False, upload_fit=28)
    fetch_dataset(spec, dest, mirror=str(folder), progress=False)
    assert sha256(dest / name) == digest
    assert _leftovers(dest) == [name]
