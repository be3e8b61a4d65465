"""The expected failures of a pipeline stage: bad input data, bad params, a missing prerequisite.

A stage reports one of these as one line naming what is wrong; anything else is a bug and keeps its
traceback."""

from __future__ import annotations


class PipelineError(Exception):
    """A failure the user can fix (the message says how); never a bug in the pipeline's code."""


class ConfigError(PipelineError):
    """A params.yaml value, preset or model option that the pipeline does not accept."""
