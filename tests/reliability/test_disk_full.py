"""Disk full: the mesh's data dir on a size-limited tmpfs, filled to the brim, during an
ingest, cache Puts and a training job (the model registry's write; the trainer's periodic
checkpoints join this scenario once they land). Each fails with RESOURCE_EXHAUSTED, earlier
data stays intact, nothing partial is published, and once space is freed writes succeed."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from harness import (
    REPORT,
    Clients,
    Ledger,
    MeshUnderTest,
    Workloads,
    check_whole,
    code_of,
    seed,
)

from protos.onehop.v1 import cache_pb2, gateway_pb2, trainer_pb2

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]

DISK_MIB = 96


class Disk:
    """A tmpfs of DISK_MIB and a filler file that takes (and gives back) its free space."""

    def __init__(self, root: Path):
        self.root = root
        self.filler = root / "filler"

    def fill(self, leave: int = 0) -> None:
        with open(self.filler, "ab") as f:
            block = b"\0" * (1 << 20)
            while True:
                try:
                    f.write(block)
                    f.flush()
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
        size = self.filler.stat().st_size
        os.truncate(self.filler, max(0, size - leave))
        REPORT.fault("disk full")

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Disk]:
    root = tmp_path_factory.mktemp("tmpfs")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_MIB}m", "tmpfs", str(root)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield Disk(root)
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


@pytest.fixture(scope="module")
def small(disk: Disk) -> Iterator[tuple[MeshUnderTest, Clients, Ledger, Workloads]]:
    mesh = MeshUnderTest(disk.root / "data", env={"ONEHOP_CACHE_SIZE_BYTES": str(32 << 20)})
    mesh.start()
    clients = Clients(mesh)
    ledger = Ledger()
    try:
        workloads = Workloads(clients, ledger, seed(clients, ledger))
        for _ in range(20):
            workloads.cache_put(5.0)
        workloads.ingest(20.0, name="before")
        yield mesh, clients, ledger, workloads
    finally:
        clients.close()
        mesh.stop()


def big_table(rows: int = 400_000) -> pa.Table:
    rng = np.random.default_rng(5)
    return pa.table({f"c{i}": rng.normal(size=rows) for i in range(8)})


def assert_intact(mesh: MeshUnderTest, clients: Clients, ledger: Ledger) -> None:
    mesh.wait_healthy()
    assert ledger.verify(clients) == []
    assert check_whole(clients) == []


def test_ingest_on_a_full_disk(disk: Disk, small) -> None:  # type: ignore[no-untyped-def]
    mesh, clients, ledger, _ = small
    disk.fill()
    try:
        with pytest.raises(Exception) as failed:
            clients.ingest("big", big_table(), deadline=60)
        code = code_of(failed.value)
    finally:
        disk.free()
    names = {
        d.name
        for d in clients.gateway.ListDatasets(
            gateway_pb2.ListDatasetsRequest(), timeout=10
        ).datasets
    }
    assert "big" not in names  # nothing partial published
    assert_intact(mesh, clients, ledger)
    assert code == "RESOURCE_EXHAUSTED", failed.value
    info = clients.ingest("big", big_table(20_000), deadline=60)  # space again: it works
    assert info.rows == 20_000


def test_cache_puts_on_a_full_disk(disk: Disk, small) -> None:  # type: ignore[no-untyped-def]
    mesh, clients, ledger, workloads = small
    disk.fill()
    codes = []
    try:
        for i in range(64):
            key = f"full/{i}".encode()
            try:
                clients.cache.Put(
                    cache_pb2.PutRequest(key=key, value=os.urandom(256 << 10)), timeout=10
                )
            except Exception as exc:
                codes.append(code_of(exc))
                break
    finally:
        disk.free()
    assert_intact(mesh, clients, ledger)
    assert codes == ["RESOURCE_EXHAUSTED"], codes
    workloads.cache_put(5.0)  # space again: it works


def test_training_on_a_full_disk(disk: Disk, small) -> None:  # type: ignore[no-untyped-def]
    mesh, clients, ledger, workloads = small
    before = clients.gateway.GetModel(trainer_pb2.GetModelRequest(name="risk"), timeout=10)
    disk.fill()
    try:
        with pytest.raises(Exception) as failed:
            workloads.train(30.0, model="risk")
    finally:
        disk.free()
    after = clients.gateway.GetModel(trainer_pb2.GetModelRequest(name="risk"), timeout=10)
    assert (after.version, after.weights_digest) == (before.version, before.weights_digest)
    assert_intact(mesh, clients, ledger)
    message = str(failed.value).lower()
    assert any(word in message for word in ("space", "disk", "full")), message
