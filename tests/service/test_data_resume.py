"""A reader resumes after the shard service dies mid-stream: the shard service runs as a real
process (`python -m shard_service`), is killed with SIGKILL while a shuffled shard is on the
wire, and is started again on the same data directory; the reader redeems the same ticket
from the offset it had reached and gets every row exactly once, in the epoch's order."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from onehop.channels import flight_location
from onehop.dataplane import put_dataset
from onehop.launcher import health_status, read_run_file
from protos.onehop.v1 import data_pb2

pytestmark = pytest.mark.timeout(90)

# 32 MB on the wire: far more than the client's flow-control window takes in before it
# reads, so the kill always lands mid-stream.
ROWS = 2_000_000


class ShardProcess:
    """`python -m shard_service` on port 0 over one data directory."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.process: subprocess.Popen | None = None
        self.flight = ""

    def start(self, timeout: float = 30.0) -> str:
        env = {
            **os.environ,
            "ONEHOP_DATA_DIR": str(self.data_dir),
            "ONEHOP_DEFAULT_SHARDS": "1",
            "ONEHOP_LOG_LEVEL": "WARNING",
        }
        self.process = subprocess.Popen([sys.executable, "-m", "shard_service"], env=env)
        deadline = time.monotonic() + timeout
        pause = 0.02
        while True:
            info = read_run_file(self.data_dir, "shard")
            if info and info["pid"] == self.process.pid:
                if health_status(info["endpoints"]["grpc"]) == "SERVING":
                    self.flight = flight_location(info["endpoints"]["flight"])
                    return self.flight
            assert self.process.poll() is None, "the shard service exited during start"
            assert time.monotonic() < deadline, "the shard service did not become healthy"
            threading.Event().wait(pause)
            pause = min(pause * 2, 0.25)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@pytest.fixture
def shard(tmp_path: Path) -> Iterator[ShardProcess]:
    process = ShardProcess(tmp_path / "data")
    try:
        yield process
    finally:
        process.stop()


def test_a_resumed_reader_gets_every_row_exactly_once(shard: ShardProcess) -> None:
    table = pa.table(
        {
            "id": pa.array(np.arange(ROWS), pa.int64()),
            "x": np.random.default_rng(0).normal(size=ROWS),
        }
    )
    with flight.connect(shard.start()) as client:
        put_dataset(client, "big", table)
        request = data_pb2.DataRequest(dataset="big", shuffle=True, seed=5, epoch=3)
        descriptor = flight.FlightDescriptor.for_command(request.SerializeToString())
        (endpoint,) = client.get_flight_info(descriptor).endpoints

        stream = client.do_get(endpoint.ticket)
        received = [stream.read_chunk().data]
        shard.kill()
        with pytest.raises((flight.FlightError, pa.ArrowException, OSError)):
            while True:  # batches already in flight still arrive, then the cut shows
                try:
                    received.append(stream.read_chunk().data)
                except StopIteration:
                    pytest.fail("the stream ended cleanly: the kill came after the last batch")
    got = sum(batch.num_rows for batch in received)
    assert 0 < got < ROWS  # the cut came mid-stream

    ticket = data_pb2.ShardTicket.FromString(endpoint.ticket.ticket)
    ticket.offset = got
    with flight.connect(shard.start()) as client:  # a new process, a new port
        rest = client.do_get(flight.Ticket(ticket.SerializeToString())).read_all()
        whole = client.do_get(endpoint.ticket).read_all()

    ids = np.concatenate(
        [batch.column(0).to_numpy() for batch in received] + [rest.column("id").to_numpy()]
    )
    assert len(ids) == ROWS and len(np.unique(ids)) == ROWS  # every row, exactly once
    np.testing.assert_array_equal(ids, whole.column("id").to_numpy())  # in the epoch's order
    assert not np.array_equal(ids[:1000], np.arange(1000))  # and it was shuffled
