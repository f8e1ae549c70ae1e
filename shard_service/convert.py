"""Protobuf at the edge: onehop.v1 data messages to and from the catalog's plain types."""

from __future__ import annotations

import math

from onehop.errors import InvalidArgument
from protos.onehop.v1 import data_pb2
from shard_service.catalog import DatasetInfo, Prep

_SCALINGS = {data_pb2.SCALING_NONE: False, data_pb2.SCALING_STANDARD: True}


def prep_of(message: data_pb2.DataRequest | data_pb2.ShardTicket) -> Prep:
    scaling = message.preprocess.scaling
    if scaling not in _SCALINGS:
        raise InvalidArgument(
            f"unknown scaling {scaling}; use SCALING_NONE (0) or SCALING_STANDARD (1)"
        )
    return Prep(
        columns=tuple(message.columns),
        standardize=_SCALINGS[scaling],
        passthrough=tuple(message.preprocess.passthrough),
    )


def ticket_for(request: data_pb2.DataRequest, version: int, shard: int) -> data_pb2.ShardTicket:
    return data_pb2.ShardTicket(
        dataset=request.dataset,
        version=version,
        shard=shard,
        preprocess=request.preprocess,
        columns=request.columns,
        epoch=request.epoch,
        seed=request.seed,
        shuffle=request.shuffle,
    )


def _number(value: float | None) -> float:
    return math.nan if value is None else value


def info_to_pb(info: DatasetInfo) -> data_pb2.DatasetInfo:
    """Non-numeric columns (and numeric ones without values) carry NaN where a statistic
    does not apply."""
    return data_pb2.DatasetInfo(
        name=info.name,
        version=info.version,
        rows=info.rows,
        shards=[data_pb2.ShardInfo(shard=s.shard, rows=s.rows, bytes=s.bytes) for s in info.shards],
        columns=[
            data_pb2.ColumnStats(
                name=c.name,
                type=c.type,
                count=c.count,
                nulls=c.nulls,
                mean=_number(c.mean),
                std=_number(c.std),
                min=_number(c.min),
                max=_number(c.max),
            )
            for c in info.columns
        ],
        created_unix=info.created_unix,
        versions=info.versions,
    )
