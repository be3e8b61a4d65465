"""One thin script per DVC stage: read params, call the library (`training`, `serving`), write outputs."""

import serving  # noqa: F401 -- first: it switches telemetry off (serving/telemetry.env) before a stage imports MLflow
