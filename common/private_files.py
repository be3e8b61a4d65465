"""Files that hold a secret: made readable by their owner alone, and refused when others could read them."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

SECRET_MODE = 0o600


class ExposedSecretError(PermissionError):
    """A secret file that others may read; its message says how to fix it."""


def write_private(path: Path, text: str) -> None:
    """A new file only its owner can read (mode 0600 from its creation on, never wider for a moment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_MODE), "w") as f:
        f.write(text + "\n")


def read_private(path: Path) -> str:
    """A secret file's content; a file others could read is refused rather than used."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ExposedSecretError(f"{path} is mode {mode:o}: others may read it; `chmod 600 {path}`")
    return path.read_text().strip()


def secret(path: Path) -> tuple[str, bool]:
    """The secret kept in `path`, made (random, URL-safe) on first use; and whether it was made just now."""
    if path.exists():
        return read_private(path), False
    write_private(path, secrets.token_urlsafe(24))
    return read_private(path), True
