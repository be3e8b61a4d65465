"""The Prometheus configuration and alert rules in monitoring/: valid, and each alert firing on the traffic it
is for and not on healthy traffic (promtool test rules: monitoring/alerts_test.yml)."""

import subprocess

from tests.prometheus_fixtures import MONITORING, tool


def promtool(*arguments: str) -> str:
    done = subprocess.run([tool("promtool"), *arguments], cwd=MONITORING, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_configuration_and_rules_are_valid():
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml")
    assert "SUCCESS: 9 rules found" in promtool("check", "rules", "alerts.yml")


def test_each_alert_fires_on_its_traffic_and_not_on_healthy_traffic():
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml")
