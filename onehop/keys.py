"""Names and cache keys shared by every service (DESIGN §2)."""

from __future__ import annotations

import hashlib
import re

import numpy as np

from onehop.errors import InvalidArgument
from protos.onehop.v1 import data_pb2

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def validate_name(kind: str, name: str) -> str:
    """Dataset, model and column-free names: no separators, no '..', nothing absolute, so a
    name can never address a path outside the data directory."""
    if not _NAME.fullmatch(name or "") or ".." in name:
        raise InvalidArgument(
            f"invalid {kind} name {name!r}: use 1-128 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit, with no '..'"
        )
    return name


def canonical_rows(rows: np.ndarray) -> np.ndarray:
    """Rows as contiguous little-endian float32: the bytes a prediction key is hashed over."""
    return np.ascontiguousarray(rows, dtype="<f4")


def prediction_keys(model: str, weights_digest: str, rows: np.ndarray) -> list[bytes]:
    """One 256-bit key per row: pred/{model}/{weights_digest}/{sha256(row bytes)}."""
    data = canonical_rows(rows)
    prefix = f"pred/{model}/{weights_digest}/".encode()
    return [prefix + hashlib.sha256(row.tobytes()).hexdigest().encode() for row in data]


def shard_key(ticket: data_pb2.ShardTicket) -> bytes:
    """Cache key of a prepared shard: what shapes its rows' values, not their order.

    The digest covers the preprocessing spec (scaling, clipping, imputation, encoding,
    passthrough), the projection and the row filter, so two preparations never share an
    entry. The cache holds the prepared shard in stored order; shuffle (seed, epoch) and
    offset are applied when it is served, so every epoch of a job hits the same entry.
    """
    spec = data_pb2.ShardTicket()
    spec.CopyFrom(ticket)
    for field in ("offset", "epoch", "seed", "shuffle"):
        spec.ClearField(field)
    digest = hashlib.sha256(spec.SerializeToString(deterministic=True)).hexdigest()
    return f"shard/{ticket.dataset}/{ticket.version}/{ticket.shard}/{digest}".encode()
