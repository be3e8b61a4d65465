"""One thin script per DVC stage: read params, call the library (`training`, `common`), write outputs."""

import common  # noqa: F401 -- first: it switches telemetry off (common/telemetry.env) before a stage imports MLflow
