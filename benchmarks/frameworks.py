"""TorchServe and Triton, the serving frameworks people pick instead of this service, as `make bench` runs them
(and py-spy, the profiler of `make bench-profile`).

Each is installed by the bench into its own environment under .bench/ (neither is a dependency of the project,
so neither enters uv.lock), with the project's versions of onnxruntime and Pillow, and serves the file
the service serves with the service's split of the CPUs: as many workers (TorchServe) or instances (Triton) as
the service's workers, SERVING_THREADS onnxruntime threads each, batches of up to 64 images gathered for at most
1 ms. Their configurations: benchmarks/torchserve/ and benchmarks/triton/.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from benchmarks.local_server import REPO, ChildServer, free_port

ENVIRONMENTS = REPO / ".bench"
UV = REPO / ".tools" / "bin" / "uv"
TORCHSERVE = REPO / "benchmarks" / "torchserve"
TRITON = REPO / "benchmarks" / "triton"
PACKAGES = {
    "torchserve": ["torchserve==0.12.0", "torch-model-archiver==0.12.0", "pyyaml", "psutil", "packaging"],
    "triton": ["nvidia-pytriton==0.7.0"],
    "py-spy": ["py-spy==0.4.3"],  # the sampling profiler of `make bench-profile`
}
HANDLERS = ("torchserve", "triton")  # the environments that run benchmarks/answers.py


def same_as_ours(name: str) -> list[str]:
    """The project's own versions of what every framework's handler imports (numpy as Triton's client allows:
    below 2)."""
    pins = [f"onnxruntime=={importlib.metadata.version('onnxruntime-gpu')}"]
    pins.append(f"pillow=={importlib.metadata.version('pillow')}")
    if name != "triton":
        pins.append(f"numpy=={importlib.metadata.version('numpy')}")
    return pins


def torch_requirement() -> list[str]:
    """TorchServe's Python worker imports torch: the project's version, from the local CPU wheel folder where
    pyproject.toml's `torch-cpu-wheels` index exists (PyPI's build elsewhere)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    version = project["project"]["optional-dependencies"]["cpu"][0].split("==")[1]
    folders = [i["url"] for i in project["tool"]["uv"]["index"] if i["name"] == "torch-cpu-wheels"]
    if folders and list(Path(folders[0]).glob(f"torch-{version}+cpu-*.whl")):
        return [f"torch=={version}+cpu", "--find-links", folders[0]]
    return [f"torch=={version}"]


def environment(name: str) -> Path:
    """The framework's environment, made (or remade, where its package list changed) with the project's uv."""
    folder = ENVIRONMENTS / name
    packages = PACKAGES[name] + (same_as_ours(name) if name in HANDLERS else [])
    packages += torch_requirement() if name == "torchserve" else []
    stamp = folder / "installed.txt"
    if stamp.is_file() and stamp.read_text() == "\n".join(packages):
        return folder
    print(f"installing {name} into {folder}: {' '.join(packages)}", file=sys.stderr)
    shutil.rmtree(folder, ignore_errors=True)
    base_python = getattr(sys, "_base_executable", sys.executable)  # not the project's environment
    subprocess.run([UV, "venv", "--quiet", "--python", base_python, folder], check=True)
    subprocess.run([UV, "pip", "install", "--quiet", "--python", folder / "bin" / "python", *packages], check=True)
    stamp.write_text("\n".join(packages))
    return folder


def missing_java() -> str | None:
    """Why TorchServe cannot run here, if it cannot: its frontend needs Java 17 or later (Debian's
    openjdk-17-jre-headless)."""
    if not shutil.which("java"):
        return "TorchServe needs Java 17 or later: apt-get install openjdk-17-jre-headless"
    version = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr
    major = int(version.split('"')[1].split(".")[0]) if '"' in version else 0
    return None if major >= 17 else f"TorchServe needs Java 17 or later, not {version.splitlines()[0]}"


def peer_environment(threads: int) -> dict[str, str]:
    """What each framework's handler needs: the project's code (common.preprocess, benchmarks.answers) and the
    thread count."""
    return {"PYTHONPATH": str(REPO), "PEER_THREADS": str(threads)}


def torchserve(model: Path, folder: Path, workers: int, threads: int) -> ChildServer:
    """TorchServe 0.12 (Java frontend, Python workers) on `model`: benchmarks/torchserve/handler.py in a
    model archive, benchmarks/torchserve/config.properties."""
    env = environment("torchserve")
    store = folder / "torchserve-store"
    store.mkdir()
    subprocess.run(
        [
            env / "bin" / "torch-model-archiver",
            "--model-name",
            "fashion",
            "--version",
            "1.0",
            "--serialized-file",
            model,
            "--handler",
            TORCHSERVE / "handler.py",
            "--export-path",
            store,
            "--archive-format",
            "no-archive",
        ],
        check=True,
    )
    port = free_port()
    config = folder / "torchserve.properties"
    config.write_text(
        (TORCHSERVE / "config.properties")
        .read_text()
        .format(
            inference_port=port,
            management_port=free_port(),
            metrics_port=free_port(),
            model_store=store,
            workers=workers,
        )
    )
    command = [str(env / "bin" / "torchserve"), "--start", "--foreground", "--ts-config", str(config), "--ncs"]
    server = ChildServer(
        command,
        folder / "torchserve.log",
        "/ping",
        cwd=folder,
        port=port,
        group=True,
        env={
            "PATH": f"{env / 'bin'}:/usr/local/bin:/usr/bin:/bin",
            "LOG_LOCATION": str(folder / "torchserve-logs"),
            "METRICS_LOCATION": str(folder / "torchserve-logs"),
            **peer_environment(threads),
        },
    )
    server.routes = dict.fromkeys(("png", "json", "bulk"), "/predictions/fashion")
    return server.wait_ready()


class Triton(ChildServer):
    """Triton's server (the binary PyPI's nvidia-pytriton ships) with the python backend running
    benchmarks/triton/'s model, and in front of it benchmarks/triton/front.py, which decodes uploads. Clients
    post uploads to the front, and tensors (kind `tensor`) to Triton itself at `tensor_url`."""

    def __init__(self, model: Path, folder: Path, workers: int, threads: int):
        env = environment("triton")
        python = env / "bin" / "python"
        site = next((env / "lib").glob("python3*/site-packages"))
        packaged = site / "pytriton" / "tritonserver"
        backends = folder / "triton-backends"
        shutil.copytree(packaged / "backends", backends)
        stub = (
            packaged / "python_backend_stubs" / site.parent.name.removeprefix("python") / "triton_python_backend_stub"
        )
        shutil.copy(stub, backends / "python")  # the stub for the environment's Python, as PyTriton picks it
        repository = folder / "triton-models"
        shutil.copytree(TRITON / "model_repository", repository)
        shutil.copy(model, repository / "fashion" / "1" / "model.onnx")
        config = repository / "fashion" / "config.pbtxt"
        config.write_text(config.read_text().replace("count: 2", f"count: {workers}"))
        triton_env = {
            **peer_environment(threads),
            "PYTHONPATH": f"{REPO}:{site}",
            # the libraries the stub's RPATH names relative to the wheel's folder, which the copy left behind
            "LD_LIBRARY_PATH": str(site / "nvidia_pytriton.libs"),
            # the stub's embedded Python takes the environment of the first `python` on the PATH, as PyTriton's
            "PATH": f"{env / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        }
        self.triton = ChildServer(
            [
                str(packaged / "bin" / "tritonserver"),
                "--model-repository",
                str(repository),
                "--backend-directory",
                str(backends),
                "--http-address",
                "127.0.0.1",
                "--http-port",
                "{port}",
                "--allow-grpc",
                "false",
                "--allow-metrics",
                "false",
                "--exit-on-error",
                "true",
            ],
            folder / "tritonserver.log",
            "/v2/health/ready",
            group=True,
            env=triton_env,
        ).wait_ready()
        self.tensor_url = self.triton.url
        super().__init__(
            [str(python), "-m", "benchmarks.triton.front", "--port", "{port}", "--workers", str(workers)],
            folder / "triton-front.log",
            "/readyz",
            group=True,
            env={"TRITON_URL": self.triton.url, "PEER_MODEL": str(model), **peer_environment(threads)},
        )

    def close(self) -> None:
        super().close()
        self.triton.close()
