"""What training and serving both use, and neither imports from the other: this package imports neither.

Importing it switches off the telemetry of the tools the project runs (common/telemetry.env), where the
environment does not say otherwise: onnxruntime's is on by default, and BentoML's, MLflow's and DVC's too.
"""

import os
from pathlib import Path

TELEMETRY_SWITCHES = Path(__file__).with_name("telemetry.env")


def telemetry_switches() -> dict[str, str]:
    """common/telemetry.env's `NAME ?= value` lines (the Makefile includes the same file)."""
    lines = (line.split("#")[0].strip() for line in TELEMETRY_SWITCHES.read_text().splitlines())
    return {name.strip(): value.strip() for name, _, value in (line.partition("?=") for line in lines if line)}


for _name, _value in telemetry_switches().items():
    os.environ.setdefault(_name, _value)
