"""One thin script per DVC stage: read params, call the library (`training`, `serving`), write outputs."""
