"""What every benchmark ends with: its table printed, its results written as JSON for `make docs`."""

from __future__ import annotations

import json
from pathlib import Path


def publish(results: dict, table: str, path: Path) -> None:
    print(table)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
