"""The Kubernetes manifests in deploy/: valid against the Kubernetes API's schemas (strict: no unknown field),
with the probes, resources and drain the service needs; `kubectl apply --dry-run=client` where a cluster
answers."""

import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO

MANIFESTS = REPO / "deploy" / "kubernetes.yaml"
KUBERNETES = "1.32.0"


def documents() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFESTS.read_text())}


def test_the_manifests_are_valid_kubernetes_objects():
    found = documents()
    assert sorted(found) == ["Deployment", "Service"]
    for doc in found.values():
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    broken = documents()["Deployment"]
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def test_the_deployment_probes_limits_drains_and_runs_unprivileged():
    deployment, service = documents()["Deployment"], documents()["Service"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    resources = container["resources"]
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"]  # the quota the workers are sized by
    assert container["lifecycle"]["preStop"]["sleep"]["seconds"] < pod["terminationGracePeriodSeconds"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]


def test_kubectl_accepts_the_manifests():
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    if subprocess.run(["kubectl", "cluster-info"], capture_output=True, timeout=60).returncode != 0:
        pytest.skip("kubectl reaches no cluster: its client-side dry run needs the API server's discovery")
    done = subprocess.run(
        ["kubectl", "apply", "--dry-run=client", "-f", str(MANIFESTS)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
