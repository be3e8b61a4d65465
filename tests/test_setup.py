"""What `make` installs and what a bento installs: the torch source it chooses, and requirements pinned to uv.lock."""

import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.utils import canonicalize_name

from tests.conftest import REPO
from tests.pipeline_fixtures import VENV_BIN

REQUIREMENTS = REPO / "serving" / "requirements.txt"
# a bento's container: Debian on x86_64, CPython 3.11 (bentofile.yaml)
BENTO_PLATFORM = {
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "python_version": "3.11",
    "python_full_version": "3.11.7",
    "extra": "",
}


def locked_packages() -> dict[str, list[dict]]:
    """uv.lock's packages by name (a package can be locked twice: torch, once per source)."""
    packages: dict[str, list[dict]] = {}
    for package in tomllib.loads((REPO / "uv.lock").read_text())["package"]:
        packages.setdefault(package["name"], []).append(package)
    return packages


def pinned(requirements: str) -> dict[str, str]:
    """name: version of every requirement line that applies on the bento's platform; each must be `==`."""
    pins = {}
    for line in requirements.splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        spec, _, marker = line.partition(";")
        if marker and not Marker(marker).evaluate(BENTO_PLATFORM):
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)==(\S+)", spec.strip())
        assert match, f"not pinned to one version: {line!r}"
        pins[str(canonicalize_name(match[1].split("[")[0]))] = str(match[2])
    return pins


def unlocked_or_missing(pins: dict[str, str]) -> list[str]:
    """What a `pip install -r` of `pins` would install that uv.lock does not hold at that version: a pin at
    another version, or a dependency of a pinned package (on the bento's platform) that is not pinned."""
    locked = locked_packages()
    problems = []
    for name, version in pins.items():
        entries = [p for p in locked.get(name, []) if p["version"] == version]
        if not entries:
            problems.append(f"{name}=={version} (uv.lock: {[p['version'] for p in locked.get(name, [])]})")
            continue
        for dependency in entries[0].get("dependencies", []):
            if "marker" in dependency and not Marker(dependency["marker"]).evaluate(BENTO_PLATFORM):
                continue
            if canonicalize_name(dependency["name"]) not in pins:
                problems.append(f"{dependency['name']} (needed by {name}) is not pinned")
    return problems


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
