"""Watching the served model: the drift and quality report (`make monitor`), Prometheus' configuration and alerts."""
