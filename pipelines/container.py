"""`make container`: the champion's bento as an OCI image, built with buildah, with no registry and nothing
downloaded inside the build.

1. A base image from Debian's packages: debootstrap's minimal bookworm with its Python 3.11 (the project's
   version) and the uv that `make` installs, imported into buildah's store (`localhost/fashion-mnist-base`);
   made once, reused after.
2. The bento's Python packages as wheels in build/container/wheels, fetched on this machine from PyPI (or
   pip's cache): serving/requirements.txt, the versions of uv.lock.
3. `bentoml build` of bentofile.yaml with that base image and those wheels (`no_index`: the build installs
   from them alone), then `bentoml containerize --backend buildah`. The image runs as BentoML's unprivileged
   user `bentoml`; its workers and threads follow the CPUs the container may use (serving/settings.py).

It prints the image's name, size and build time, and writes them to build/container/image.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "build" / "container"
BASE_IMAGE = "localhost/fashion-mnist-base:bookworm"
IMAGE = "localhost/fashion-mnist-classifier"
BENTO_PATH = "/home/bentoml/bento"  # where BentoML's image keeps the bento
DEBIAN_PACKAGES = "python3,python3-venv,ca-certificates"
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64", "any")


class ContainerError(Exception):
    """A missing tool or a failed build step; the message says which."""


def run(command: list[str], env: dict[str, str] | None = None, quiet: bool = False) -> str:
    print("+", " ".join(command[:6]) + (" ..." if len(command) > 6 else ""), file=sys.stderr, flush=True)
    done = subprocess.run(command, env=env, cwd=REPO, text=True, capture_output=True)
    if done.returncode != 0:
        raise ContainerError(f"{command[0]} {command[1]} failed:\n{(done.stdout + done.stderr)[-4000:]}")
    if not quiet:
        print(done.stderr[-2000:], file=sys.stderr, end="")
    return done.stdout


def require(tool: str, package: str) -> str:
    found = shutil.which(tool)
    if found is None:
        raise ContainerError(f"{tool} is missing: `apt-get install {package}` (as root)")
    return found


def image_exists(name: str, env: dict[str, str]) -> bool:
    inspect = [require("buildah", "buildah"), "inspect", "--type", "image", name]
    return subprocess.run(inspect, env=env, capture_output=True).returncode == 0


def base_image(env: dict[str, str], mirror: str) -> None:
    """Debian's minimal bookworm with Python 3.11 and uv, in buildah's store (made when it is not there)."""
    if image_exists(BASE_IMAGE, env):
        return
    if os.geteuid() != 0:
        raise ContainerError("the base image is made with debootstrap, which needs root: run as root once")
    debootstrap = require("debootstrap", "debootstrap")
    buildah = require("buildah", "buildah")
    with tempfile.TemporaryDirectory(prefix="fashion-mnist-rootfs-") as rootfs:
        run([debootstrap, "--variant=minbase", f"--include={DEBIAN_PACKAGES}", "bookworm", rootfs, mirror])
        shutil.copy2(REPO / ".tools" / "bin" / "uv", Path(rootfs) / "usr" / "local" / "bin" / "uv")
        container = run([buildah, "from", "scratch"], env, quiet=True).strip()
        try:
            run([buildah, "copy", "--quiet", container, rootfs, "/"], env, quiet=True)
            run([buildah, "config", "--env", "LANG=C.UTF-8", container], env)
            run([buildah, "commit", "--quiet", container, BASE_IMAGE], env, quiet=True)
        finally:
            subprocess.run([buildah, "rm", container], env=env, capture_output=True)


def wheels(build: Path) -> list[Path]:
    """serving/requirements.txt as wheels for Linux x86-64 and CPython 3.11, in `build`/wheels."""
    folder = build / "wheels"
    shutil.rmtree(folder, ignore_errors=True)
    platforms = [flag for platform in WHEEL_PLATFORMS for flag in ("--platform", platform)]
    pip = [str(REPO / ".tools" / "bin" / "pip"), "download", "--quiet", "--disable-pip-version-check"]
    run([*pip, "--only-binary=:all:", "--no-deps", "--python-version", "3.11", "--implementation", "cp",
         *platforms, "-r", "serving/requirements.txt", "-d", str(folder)], quiet=True)  # fmt: skip
    return sorted(folder.glob("*.whl"))


def container_bentofile(wheel_files: list[Path], build: Path) -> Path:
    """bentofile.yaml with the base image above and the wheels as the only package source."""
    bentofile = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    bentofile["docker"] = {"base_image": BASE_IMAGE}  # Debian's Python: no CUDA, no python.org download
    bentofile["python"].update(
        wheels=[w.relative_to(REPO).as_posix() for w in wheel_files],
        no_index=True,
        find_links=[f"{BENTO_PATH}/env/python/wheels"],
    )
    path = build / "bentofile.yaml"
    path.write_text(yaml.safe_dump(bentofile, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default=IMAGE, help="the image's name; tagged with the bento's version")
    parser.add_argument("--mirror", default=os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian"))
    parser.add_argument("--build", type=Path, default=BUILD, help="the wheels, the bentofile and image.json")
    args = parser.parse_args()
    started = time.monotonic()
    env = {
        **os.environ,
        "BUILDAH_ISOLATION": os.environ.get("BUILDAH_ISOLATION", "chroot"),
        "BENTOML_DO_NOT_TRACK": "true",
    }
    bentoml = str(Path(sys.executable).parent / "bentoml")
    try:
        args.build.mkdir(parents=True, exist_ok=True)
        base_image(env, args.mirror)
        bentofile = container_bentofile(wheels(args.build), args.build)
        tag = run([bentoml, "build", "-f", str(bentofile), "--output", "tag"], env, quiet=True)
        bento = tag.strip().splitlines()[-1].removeprefix("__tag__:")
        image = f"{args.image}:{bento.split(':')[1]}"
        run([bentoml, "containerize", "--backend", "buildah", bento, "-t", image], env)
        listed = json.loads(run([require("buildah", "buildah"), "images", "--json", image], env, quiet=True))
    except ContainerError as exc:
        sys.exit(f"container: {exc}")
    summary = {
        "image": image,
        "bento": bento,
        "size": listed[0]["size"],
        "build_seconds": round(time.monotonic() - started, 1),
    }
    (args.build / "image.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"container: {image}, {summary['size']}, built in {summary['build_seconds']} s")


if __name__ == "__main__":
    main()
