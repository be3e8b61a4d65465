"""The BentoML service for the exported champion (serving/service.py), with the shared package `common`."""

import common  # noqa: F401 -- first: it switches telemetry off before BentoML or onnxruntime loads
