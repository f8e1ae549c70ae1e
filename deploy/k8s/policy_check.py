"""Policy check over rendered Kubernetes manifests (`kubectl kustomize OVERLAY | python
deploy/k8s/policy_check.py -`): what a schema cannot see but onehop's pods must have.

- every container (init and sidecar too): CPU and memory requests, a memory limit, no
  privilege escalation, a read-only root filesystem, all capabilities dropped;
- every pod: runAsNonRoot, the RuntimeDefault seccomp profile, no service-account token;
- every long-running container (Deployments, StatefulSets, native sidecars): native gRPC
  startup, readiness and liveness probes on its plaintext ONEHOP_HEALTH_PORT;
- every Deployment and StatefulSet: a PodDisruptionBudget that selects its pods;
- a default-deny NetworkPolicy, and an allow policy selecting each workload's pods;
- every HorizontalPodAutoscaler: a CPU metric and a per-pod custom metric;
- images pinned to a tag other than `latest`.

Prints one line per violation and exits 1 if there is any, else prints a summary.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any

import yaml

Manifest = dict[str, Any]
WORKLOADS = ("Deployment", "StatefulSet", "Job")
LONG_RUNNING = ("Deployment", "StatefulSet")


def _name(doc: Manifest) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def _selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """matchLabels-only selectors (all onehop uses); an empty selector selects everything."""
    wanted = (selector or {}).get("matchLabels", {})
    return all(labels.get(key) == value for key, value in wanted.items())


def _containers(pod: dict[str, Any]) -> Iterator[tuple[dict[str, Any], bool]]:
    """(container, runs for the pod's lifetime?) — native sidecars count as long-running."""
    for init in pod.get("initContainers", []):
        yield init, init.get("restartPolicy") == "Always"
    for container in pod.get("containers", []):
        yield container, True


def check_container(where: str, container: dict[str, Any], needs_probes: bool) -> list[str]:
    problems = []
    at = f"{where} container {container['name']}"
    resources = container.get("resources", {})
    for kind in ("cpu", "memory"):
        if kind not in resources.get("requests", {}):
            problems.append(f"{at}: no {kind} request")
    if "memory" not in resources.get("limits", {}):
        problems.append(f"{at}: no memory limit")
    security = container.get("securityContext", {})
    if security.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{at}: allowPrivilegeEscalation is not false")
    if security.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{at}: readOnlyRootFilesystem is not true")
    if "ALL" not in security.get("capabilities", {}).get("drop", []):
        problems.append(f"{at}: capabilities do not drop ALL")
    image = container.get("image", "")
    if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
        problems.append(f"{at}: image {image!r} is not pinned to a tag")
    if needs_probes:
        env = {item["name"]: item.get("value") for item in container.get("env", [])}
        health = env.get("ONEHOP_HEALTH_PORT")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            port = container.get(probe, {}).get("grpc", {}).get("port")
            if port is None:
                problems.append(f"{at}: no native gRPC {probe}")
            elif str(port) != health:
                # The kubelet speaks plaintext gRPC: probes go to the health-only port.
                problems.append(f"{at}: {probe} on {port}, not on ONEHOP_HEALTH_PORT ({health})")
    return problems


def check_workload(doc: Manifest) -> list[str]:
    where = _name(doc)
    pod = doc["spec"]["template"]["spec"]
    security = pod.get("securityContext", {})
    problems = []
    if security.get("runAsNonRoot") is not True:
        problems.append(f"{where}: pod securityContext.runAsNonRoot is not true")
    if security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append(f"{where}: pod seccompProfile is not RuntimeDefault")
    if pod.get("automountServiceAccountToken") is not False:
        problems.append(f"{where}: the service-account token is mounted")
    for container, long_running in _containers(pod):
        needs_probes = long_running and doc["kind"] in LONG_RUNNING
        problems += check_container(where, container, needs_probes)
    return problems


def _is_default_deny(doc: Manifest) -> bool:
    spec = doc["spec"]
    return (
        not spec.get("podSelector")
        and set(spec.get("policyTypes", [])) == {"Ingress", "Egress"}
        and not spec.get("ingress")
        and not spec.get("egress")
    )


def check(docs: list[Manifest]) -> tuple[list[str], str]:
    """(violations, a one-line summary of what was checked)."""
    by_kind: dict[str, list[Manifest]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    workloads = [doc for kind in WORKLOADS for doc in by_kind.get(kind, [])]
    problems: list[str] = []
    for doc in workloads:
        problems += check_workload(doc)

    budgets = by_kind.get("PodDisruptionBudget", [])
    policies = by_kind.get("NetworkPolicy", [])
    if not any(_is_default_deny(policy) for policy in policies):
        problems.append(
            "no default-deny NetworkPolicy (podSelector {}, Ingress and Egress, no rules)"
        )
    allows = [policy for policy in policies if policy["spec"].get("podSelector")]
    for doc in workloads:
        labels = doc["spec"]["template"]["metadata"].get("labels", {})
        if doc["kind"] in LONG_RUNNING and not any(
            _selects(pdb["spec"].get("selector"), labels) for pdb in budgets
        ):
            problems.append(f"{_name(doc)}: no PodDisruptionBudget selects its pods")
        if not any(_selects(policy["spec"]["podSelector"], labels) for policy in allows):
            problems.append(f"{_name(doc)}: no NetworkPolicy allows its traffic")

    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        types = {metric["type"] for metric in hpa["spec"].get("metrics", [])}
        if not {"Resource", "Pods"} <= types:
            problems.append(f"{_name(hpa)}: wants a CPU (Resource) and a per-pod (Pods) metric")

    summary = (
        f"{len(workloads)} workloads, {len(budgets)} PDBs, {len(policies)} NetworkPolicies, "
        f"{len(by_kind.get('HorizontalPodAutoscaler', []))} HPAs"
    )
    return problems, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", help="rendered manifests (multi-document YAML); - for stdin")
    parser.add_argument("--label", default="", help="what the file is, for the messages")
    args = parser.parse_args(argv)
    stream = sys.stdin if args.file == "-" else open(args.file)
    with stream:
        docs = [doc for doc in yaml.safe_load_all(stream) if doc]
    problems, summary = check(docs)
    label = args.label or args.file
    for problem in problems:
        print(f"{label}: {problem}")
    if problems:
        return 1
    print(f"{label}: policy ok ({summary})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
