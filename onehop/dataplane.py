"""The data plane's shared pieces: how a prepared shard is arranged for one read (shuffle by
(seed, epoch), resume offset), so the shard service and the cache serve identical rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from protos.onehop.v1 import data_pb2


def epoch_permutation(rows: int, seed: int, epoch: int, salt: int = 0) -> np.ndarray:
    """A permutation of range(rows) that is a pure function of (seed, epoch, salt)."""
    return np.random.default_rng([seed, epoch, salt]).permutation(rows)


def arrange(table: pa.Table, ticket: data_pb2.ShardTicket) -> pa.Table:
    """The rows one ticket names: the prepared shard, shuffled when asked, from its offset."""
    if ticket.shuffle:
        table = table.take(
            pa.array(epoch_permutation(table.num_rows, ticket.seed, ticket.epoch, ticket.shard))
        )
    if ticket.offset:
        table = table.slice(min(ticket.offset, table.num_rows))
    return table
