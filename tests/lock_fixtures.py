"""What a bento installs, read against uv.lock: the helpers the set-up and bento build tests share."""

import re
import tomllib

from packaging.markers import Marker
from packaging.utils import canonicalize_name

from tests.conftest import REPO

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
