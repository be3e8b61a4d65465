"""Print a preset as `dvc exp run` arguments: `dvc exp run $(python -m pipelines.preset full)`."""

import json
import sys

from training.config import Params, apply_overrides, load_params, preset_overrides
from training.errors import ConfigError


def as_text(value: object) -> str:
    """A value the way `-S` reads it: plain strings and [a,b] lists, no quotes for the shell to mind."""
    if isinstance(value, list):
        return "[" + ",".join(as_text(v) for v in value) + "]"
    return value if isinstance(value, str) else json.dumps(value)


def as_argument(key: str, value: object) -> str:
    return f"-S {key}={as_text(value)}"


def main() -> None:
    overrides = preset_overrides(sys.argv[1] if len(sys.argv) > 1 else "full")
    Params.from_dict(apply_overrides(load_params(), overrides))  # refuse keys and values params.yaml can't take
    print(" ".join(as_argument(k, v) for k, v in overrides.items()))


if __name__ == "__main__":
    try:
        main()
    except ConfigError as exc:
        sys.exit(f"preset: {exc}")
