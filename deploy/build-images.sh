#!/usr/bin/env bash
# Build the onehop image with whichever container engine this machine has.
#
#   deploy/build-images.sh            build localhost/onehop:dev (CPU torch) — `make images`
#   deploy/build-images.sh --gpu      build localhost/onehop:dev-gpu on a CUDA base (needs a registry)
#   deploy/build-images.sh --engine   print the engine that would be used (docker|podman|none)
#
# Engine: a Docker engine that answers `docker info`, else podman (see ../shared/CONTAINERS.md
# for the machines where only podman runs: runc, cgroupfs, host networking). With podman and
# no reachable registry the base image is made locally with debootstrap (Debian bookworm,
# python3 3.11) and kept as localhost/onehop-base:bookworm; an existing base is reused.
#
# Python packages: every wheel the image needs is first gathered on the host into
# deploy/wheels/ (pip download, which reuses pip's own find-links and cache — the CPU torch
# wheel comes from there), and the Dockerfile bind-mounts that folder into its install step,
# so no wheel lands in a layer and the build itself needs no network. With Docker and an
# empty deploy/wheels/ the Dockerfile simply installs from the package index.
#
# Environment: ONEHOP_IMAGE (default localhost/onehop:dev), BASE_IMAGE (skip base detection),
# DEBIAN_MIRROR (debootstrap mirror; default the host's apt source), ONEHOP_ENGINE (force).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEPLOY="$ROOT/deploy"
WHEELS="$DEPLOY/wheels"
IMAGE="${ONEHOP_IMAGE:-localhost/onehop:dev}"
LOCAL_BASE="localhost/onehop-base:bookworm"
UPSTREAM_BASE="docker.io/library/python:3.11-slim"
CUDA_BASE_IMAGE="${CUDA_BASE_IMAGE:-docker.io/nvidia/cuda:12.6.3-base-ubuntu24.04}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3

say() { printf 'images: %s\n' "$*" >&2; }

# --- engine --------------------------------------------------------------------------------

podman_env() {
    # Our containers.conf unless the caller brings one (runc, cgroupfs, no ulimits).
    export CONTAINERS_CONF="${CONTAINERS_CONF:-$DEPLOY/podman/containers.conf}"
}

detect_engine() {
    if [ -n "${ONEHOP_ENGINE:-}" ]; then
        echo "$ONEHOP_ENGINE"
    elif command -v docker >/dev/null && timeout 20 docker info >/dev/null 2>&1; then
        echo docker
    elif command -v podman >/dev/null && (podman_env && timeout 30 podman info >/dev/null 2>&1); then
        echo podman
    else
        echo none
    fi
}

# --- base image (podman without a registry) ------------------------------------------------

debian_mirror() {
    if [ -n "${DEBIAN_MIRROR:-}" ]; then
        echo "$DEBIAN_MIRROR"
        return
    fi
    local uri
    uri="$( (grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null \
              | awk '{print $2}'
             grep -hE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
              | awk '{print $2}') | grep -E '/debian/?$' | head -1)"
    echo "${uri:-http://deb.debian.org/debian}"
}

build_local_base() {
    command -v debootstrap >/dev/null || {
        say "debootstrap is missing (apt-get install -y debootstrap)"
        exit 1
    }
    local rootfs
    rootfs="$(mktemp -d /tmp/onehop-rootfs.XXXXXX)"
    # shellcheck disable=SC2064
    trap "rm -rf '$rootfs'" EXIT
    local mirror
    mirror="$(debian_mirror)"
    say "building $LOCAL_BASE with debootstrap from $mirror"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
        tail -20 "$rootfs.log" >&2
        exit 1
    }
    rm -f "$rootfs.log"
    # Like the official slim images: no apt lists, no docs in the layer.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/usr/share/doc/* \
        "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
    tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$LOCAL_BASE" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
}

pick_base() {
    local engine=$1
    if [ -n "${BASE_IMAGE:-}" ]; then
        echo "$BASE_IMAGE"
    elif [ "$engine" = docker ]; then
        echo "$UPSTREAM_BASE"
    elif podman image exists "$LOCAL_BASE"; then
        echo "$LOCAL_BASE"
    elif podman image exists "$UPSTREAM_BASE" || timeout 120 podman pull -q "$UPSTREAM_BASE" >/dev/null 2>&1; then
        echo "$UPSTREAM_BASE"
    else
        say "no registry reachable: making the base image locally"
        build_local_base
        echo "$LOCAL_BASE"
    fi
}

# --- wheels ----------------------------------------------------------------------------------

gather_wheels() {
    # The runtime dependencies of pyproject.toml plus the build backend, for this CPython.
    mkdir -p "$WHEELS"
    local reqs
    reqs="$(mktemp)"
    "$PY" - "$ROOT/pyproject.toml" >"$reqs" <<'EOF'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))
print("\n".join(project["project"]["dependencies"] + project["build-system"]["requires"]))
EOF
    # The same requirements as last time: the wheels are all there.
    local stamp="$WHEELS/.requirements" wanted
    wanted="$(cat "$reqs" "$ROOT/constraints-cpu.txt")"
    if [ -f "$stamp" ] && [ "$wanted" = "$(cat "$stamp")" ]; then
        rm -f "$reqs"
        return
    fi
    # Link (not copy) wheels already on this disk, e.g. the CPU torch in pip's find-links.
    local links
    links="$("$PY" -m pip config get global.find-links 2>/dev/null || true) ${PIP_FIND_LINKS:-}"
    for dir in $links; do
        [ -d "$dir" ] || continue
        for whl in "$dir"/*.whl; do
            [ -e "$whl" ] && [ ! -e "$WHEELS/$(basename "$whl")" ] &&
                { ln "$whl" "$WHEELS/" 2>/dev/null || cp "$whl" "$WHEELS/"; }
        done
    done
    say "gathering wheels into deploy/wheels"
    "$PY" -m pip download --quiet --only-binary=:all: --dest "$WHEELS" \
        -c "$ROOT/constraints-cpu.txt" -r "$reqs" 2> >(grep -v 'is ignored: it is neither' >&2)
    printf '%s' "$wanted" >"$stamp"
    rm -f "$reqs"
}

# --- build -----------------------------------------------------------------------------------

build() {
    local engine=$1 base=$2 tag=$3
    local started=$SECONDS
    say "building $tag with $engine from $base"
    if [ "$engine" = podman ]; then
        # Offline: every wheel is in deploy/wheels/ already.
        podman build --pull=never --network=none --layers -f "$DEPLOY/Dockerfile" -t "$tag" \
            --build-arg BASE_IMAGE="$base" \
            --build-arg PIP_FLAGS="--no-index --find-links /wheels" "$ROOT"
    else
        DOCKER_BUILDKIT=1 docker build -f "$DEPLOY/Dockerfile" -t "$tag" \
            --build-arg BASE_IMAGE="$base" "$ROOT"
    fi
    say "built $tag in $((SECONDS - started)) s"
}

main() {
    local mode=${1:-build}
    local engine
    engine="$(detect_engine)"
    case "$mode" in
    --engine)
        echo "$engine"
        return
        ;;
    build | --gpu) ;;
    *)
        sed -n '2,8p' "$0"
        return 2
        ;;
    esac
    if [ "$engine" = none ]; then
        say "no container engine: neither a Docker engine nor podman answers" \
            "(apt-get install -y podman runc debootstrap, see docs/deploy.md)"
        return 1
    fi
    [ "$engine" = podman ] && podman_env
    if [ "$mode" = --gpu ]; then
        # CUDA base + python3, then the same Dockerfile without the CPU torch pin: pip takes
        # torch's default (CUDA) build from the index. Needs a reachable registry and index.
        local gpu_base="localhost/onehop-cuda-base:latest"
        "$engine" build -f "$DEPLOY/Dockerfile.cuda-base" -t "$gpu_base" \
            --build-arg CUDA_BASE_IMAGE="$CUDA_BASE_IMAGE" "$DEPLOY"
        DOCKER_BUILDKIT=1 "$engine" build -f "$DEPLOY/Dockerfile" -t "${IMAGE}-gpu" \
            --build-arg BASE_IMAGE="$gpu_base" --build-arg CONSTRAINTS= --build-arg PIP_FLAGS= "$ROOT"
        return
    fi
    local base
    base="$(pick_base "$engine")"
    if [ "$engine" = podman ]; then
        gather_wheels
    else
        mkdir -p "$WHEELS"
    fi
    build "$engine" "$base" "$IMAGE"
    "$engine" image inspect --format '{{.Size}}' "$IMAGE" |
        awk -v t="$IMAGE" '{printf "images: %s is %.0f MB\n", t, $1 / 1e6}' >&2
}

main "$@"
