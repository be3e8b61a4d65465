"""One thin script per DVC stage; the logic lives in `training`."""
