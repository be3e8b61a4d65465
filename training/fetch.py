"""Download the official dataset files: mirror first, checksum-verified, atomic, with retries."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

import requests
import urllib3
from tqdm import tqdm

from common.files import sha256_file
from training.datasets import DatasetSpec
from training.errors import PipelineError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
MIRROR_ENV = "DATASET_MIRROR"


class FetchError(PipelineError):
    """Every source failed for a file; the message lists each source and why."""


class ChecksumError(RuntimeError):
    pass


class _PermanentError(RuntimeError):
    """A failure that retrying the same source cannot fix (404, missing file, bad checksum)."""


def resolve_sources(spec: DatasetSpec, mirror: str | None) -> list[str]:
    """The mirror (a folder or base URL; `{dataset}` is replaced by the dataset name) comes first."""
    sources = []
    if mirror:
        sources.append(mirror.replace("{dataset}", spec.name))
    sources.extend(spec.urls)
    return sources


def _is_url(source: str) -> bool:
    return urlparse(source).scheme in ("http", "https")


def _open_source(source: str, name: str, timeout: float) -> tuple[BinaryIO, int | None]:
    """A readable stream of `name` at `source` and its size when known."""
    if _is_url(source):
        url = source.rstrip("/") + "/" + name
        try:
            response = requests.get(url, stream=True, timeout=timeout)
        except requests.RequestException as exc:
            raise ConnectionError(f"{type(exc).__name__}: {exc}") from exc
        if response.status_code in (400, 401, 403, 404, 410):
            response.close()
            raise _PermanentError(f"HTTP {response.status_code} for {url}")
        if response.status_code != 200:
            response.close()
            raise ConnectionError(f"HTTP {response.status_code} for {url}")
        size = response.headers.get("content-length")
        response.raw.decode_content = False  # keep the .gz bytes exactly as served
        return response.raw, int(size) if size else None  # type: ignore[return-value]  # urllib3's stream is a BinaryIO
    folder = Path(source[len("file://") :] if source.startswith("file://") else source)
    path = folder / name
    if not path.is_file():
        raise _PermanentError(f"no file {path}")
    return open(path, "rb"), path.stat().st_size


def _download_once(source: str, name: str, expected: str, dest: Path, timeout: float, progress: bool) -> None:
    """Copy one file into a temporary sibling of `dest`, verify it, then rename it into place."""
    stream, size = _open_source(source, name, timeout)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with (
            stream,
            os.fdopen(fd, "wb") as out,
            tqdm(total=size, unit="B", unit_scale=True, desc=name, disable=not progress, leave=False) as bar,
        ):
            for chunk in iter(lambda: stream.read(CHUNK), b""):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        if size is not None and tmp.stat().st_size != size:
            raise ConnectionError(f"truncated: got {tmp.stat().st_size} of {size} bytes")
        actual = digest.hexdigest()
        if actual != expected:
            raise ChecksumError(f"sha256 mismatch: expected {expected}, got {actual}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)  # on any failure or interruption, nothing partial stays


def fetch_file(
    name: str,
    expected: str,
    dest_dir: Path,
    sources: Iterable[str],
    retries: int = 3,
    timeout: float = 60.0,
    backoff: float = 1.0,
    progress: bool = True,
) -> Path:
    """Fetch one file unless a verified copy is already there; raise FetchError naming every source."""
    dest = dest_dir / name
    if dest.is_file():
        if sha256_file(dest) == expected:
            log.info("%s: already present and verified", name)
            return dest
        log.warning("%s: present but its checksum is wrong; downloading it again", name)
        dest.unlink()
    failures = []
    for source in sources:
        for attempt in range(1, retries + 1):
            try:
                _download_once(source, name, expected, dest, timeout, progress)
                log.info("%s: fetched from %s", name, source)
                return dest
            except (_PermanentError, ChecksumError) as exc:
                failures.append(f"{source}: {exc}")
                break
            except (OSError, urllib3.exceptions.HTTPError) as exc:
                reason = f"{source}: attempt {attempt}/{retries}: {exc}"
                log.warning("%s: %s", name, reason)
                if attempt == retries:
                    failures.append(reason)
                else:
                    time.sleep(backoff * 2 ** (attempt - 1))
    tried = "\n  ".join(failures)
    raise FetchError(f"could not fetch {name}; tried:\n  {tried}")


def fetch_dataset(
    spec: DatasetSpec,
    dest_dir: Path,
    mirror: str | None = None,
    progress: bool = True,
    files: tuple[str, ...] | None = None,
    **kwargs,
) -> list[Path]:
    """The dataset's official files (or those of them named in `files`) in `dest_dir`, and nothing else there."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    sources = resolve_sources(spec, mirror)
    log.info("fetching %s from %s", spec.name, ", ".join(sources))
    paths = [
        fetch_file(name, checksum, dest_dir, sources, progress=progress, **kwargs)
        for name, checksum in spec.sha256.items()
        if files is None or name in files
    ]
    for stale in set(dest_dir.iterdir()) - set(paths):  # files of another dataset
        if stale.is_file():
            stale.unlink()
        else:
            shutil.rmtree(stale)
    return paths
