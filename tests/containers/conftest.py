"""The container engine and the onehop image for tests/containers.

The engine is the one deploy/build-images.sh picks (a Docker engine, else podman). With
podman, testcontainers talks to a `podman system service` socket this session starts and
stops. The image is built by that script first (incremental), so `pytest tests/containers`
tests this checkout, also on a fresh machine; with no engine at all the tests skip and say why.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "deploy" / "build-images.sh"
IMAGE = os.environ.get("ONEHOP_IMAGE", "localhost/onehop:dev")


def _engine() -> str:
    result = subprocess.run(
        ["bash", str(BUILD), "--engine"], capture_output=True, text=True, timeout=120
    )
    return result.stdout.strip() or "none"


@pytest.fixture(scope="session")
def engine() -> str:
    """docker or podman; skips the container tests when neither can be had."""
    found = _engine()
    if found == "none":
        pytest.skip(
            "no container engine: neither a Docker engine nor podman answers here "
            "(apt-get install -y podman runc debootstrap; see docs/deploy.md)"
        )
    return found


@pytest.fixture(scope="session")
def docker_host(engine: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A DOCKER_HOST for testcontainers: Docker's own, or a podman socket started here."""
    saved = {k: os.environ.get(k) for k in ("DOCKER_HOST", "TESTCONTAINERS_RYUK_DISABLED")}
    service: subprocess.Popen | None = None
    if engine == "podman":
        socket = tmp_path_factory.mktemp("podman") / "podman.sock"
        env = {
            **os.environ,
            "CONTAINERS_CONF": os.environ.get(
                "CONTAINERS_CONF", str(ROOT / "deploy" / "podman" / "containers.conf")
            ),
        }
        service = subprocess.Popen(
            ["podman", "system", "service", "--time=0", f"unix://{socket}"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not socket.exists():
            if service.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"podman system service did not open {socket}")
            time.sleep(0.1)
        os.environ["DOCKER_HOST"] = f"unix://{socket}"
        # Ryuk (the reaper container) needs a bridge network; our fixtures remove what they start.
        os.environ["TESTCONTAINERS_RYUK_DISABLED"] = "true"
    try:
        yield os.environ.get("DOCKER_HOST", "")
    finally:
        if service is not None:
            service.terminate()
            try:
                service.wait(15)
            except subprocess.TimeoutExpired:
                service.kill()
                service.wait()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def image(docker_host: str, engine: str) -> str:
    """The onehop image of this checkout, (re)built by deploy/build-images.sh — layer caches
    make that quick when little changed. ONEHOP_IMAGE names a prebuilt one instead."""
    if "ONEHOP_IMAGE" in os.environ:
        return IMAGE
    build = subprocess.run(
        ["bash", str(BUILD)],
        env={**os.environ, "ONEHOP_IMAGE": IMAGE, "ONEHOP_ENGINE": engine},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return IMAGE
