"""What `make` installs and what a bento installs: the torch source it chooses, and requirements pinned to uv.lock."""

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.lock_fixtures import REQUIREMENTS, pinned, unlocked_or_missing
from tests.pipeline_fixtures import VENV_BIN


def test_the_bento_requirements_are_uv_lock_exported():
    command = subprocess.run(["make", "-s", "-n", "requirements"], cwd=REPO, capture_output=True, text=True)
    export = command.stdout.split()[1:]  # the Makefile's own command, after its uv, to standard output
    export = [a for a in export if a not in ("--quiet", "--output-file", "serving/requirements.txt")]
    done = subprocess.run(
        [str(VENV_BIN / "uv"), *export],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout == REQUIREMENTS.read_text(), "serving/requirements.txt is stale: run `make requirements`"


def test_the_bento_requirements_pin_every_package_they_install_to_uv_lock():
    pins = pinned(REQUIREMENTS.read_text())
    assert {"bentoml", "onnxruntime-gpu", "numpy", "pillow"} <= set(pins) and "torch" not in pins
    assert unlocked_or_missing(pins) == []


def test_onnxruntime_gpu_where_it_has_wheels_and_the_cpu_build_on_macos():
    lines = REQUIREMENTS.read_text().splitlines()
    assert any(re.fullmatch(r"onnxruntime-gpu==\S+ ; sys_platform != 'darwin'", line) for line in lines)
    assert any(re.fullmatch(r"onnxruntime==\S+ ; sys_platform == 'darwin'", line) for line in lines)


def make_setup(*variables: str) -> str:
    """What `make setup` would run (`make -n -B`: nothing is run)."""
    done = subprocess.run(["make", "-n", "-B", "setup", *variables], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_without_the_local_cpu_wheel_make_installs_pypis_torch_and_says_why(tmp_path: Path):
    plan = make_setup(f"TORCH_WHEELS={tmp_path / 'no-wheels-here'}")
    assert "torch 2.13.0: PyPI's build (TORCH_EXTRA=pypi; CUDA-enabled, it runs on a CPU too), as no GPU" in plan
    sync = next(line for line in plan.splitlines() if " sync --frozen " in line)
    assert sync.split(" sync ", 1)[1].startswith("--frozen --extra pipeline --extra pypi")
    # and uv.lock installs it with the wheel folder hidden: PyPI's torch, no local source
    hidden = subprocess.run(
        [
            "unshare",
            "--mount",
            "sh",
            "-c",
            f"mount -t tmpfs none /opt/wheels && UV_PROJECT_ENVIRONMENT={tmp_path / 'venv'} "
            f"{VENV_BIN / 'uv'} sync --frozen --extra pipeline --extra pypi --dry-run",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if hidden.returncode != 0 and "mount" in hidden.stderr + hidden.stdout and "Would" not in hidden.stderr:
        pytest.skip(f"cannot hide /opt/wheels in a mount namespace here: {hidden.stderr.strip()}")
    assert hidden.returncode == 0, hidden.stderr
    assert re.search(r"^ \+ torch==2\.13\.0$", hidden.stderr, re.MULTILINE), hidden.stderr
    assert re.search(r"^ \+ nvidia-cudnn", hidden.stderr, re.MULTILINE)


def test_with_the_local_cpu_wheel_make_installs_it():
    wheels = next(Path("/opt/wheels").glob("torch-2.13.0+cpu-*.whl"), None)
    if wheels is None:
        pytest.skip("this machine has no local CPU torch wheel in /opt/wheels")
    plan = make_setup()
    assert f"torch 2.13.0: the CPU build {wheels} (TORCH_EXTRA=cpu)" in plan
    assert "--extra pipeline --extra cpu" in plan
