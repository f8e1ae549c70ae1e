"""Protobuf at the edge: onehop.v1 data messages to and from the catalog's plain types, and
the row filter's expression tree to an Arrow compute expression (checked, never eval'd)."""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from onehop.errors import InvalidArgument
from protos.onehop.v1 import data_pb2
from shard_service.catalog import DatasetInfo
from shard_service.columns import is_numeric, is_text
from shard_service.prepare import Prep

_SCALINGS = {
    data_pb2.SCALING_NONE: "none",
    data_pb2.SCALING_STANDARD: "standard",
    data_pb2.SCALING_MINMAX: "minmax",
}
_IMPUTATIONS = {
    data_pb2.IMPUTE_NONE: "none",
    data_pb2.IMPUTE_MEAN: "mean",
    data_pb2.IMPUTE_ZERO: "zero",
}
_ENCODINGS = {
    data_pb2.CATEGORICAL_KEEP: "keep",
    data_pb2.CATEGORICAL_INDEX: "index",
    data_pb2.CATEGORICAL_ONE_HOT: "one_hot",
}
_PARTITIONINGS = {
    data_pb2.PARTITION_DEFAULT: "",
    data_pb2.PARTITION_ROUND_ROBIN: "round-robin",
    data_pb2.PARTITION_HASH: "hash",
    data_pb2.PARTITION_RANGE: "range",
}
_COMPARE = {
    data_pb2.Comparison.EQ: pc.equal,
    data_pb2.Comparison.NE: pc.not_equal,
    data_pb2.Comparison.LT: pc.less,
    data_pb2.Comparison.LE: pc.less_equal,
    data_pb2.Comparison.GT: pc.greater,
    data_pb2.Comparison.GE: pc.greater_equal,
}
# Bounds on a filter tree, so one request cannot make the server build a huge expression.
MAX_FILTER_DEPTH = 16
MAX_FILTER_NODES = 256


def _option(table: dict[Any, str], value: int, what: str) -> str:
    if value not in table:
        raise InvalidArgument(f"unknown {what} {value}; known: {sorted(table)}")
    return table[value]


def prep_of(
    message: data_pb2.DataRequest | data_pb2.ShardTicket, info: DatasetInfo | None = None
) -> Prep:
    """The read's preparation. The filter needs the dataset (`info`) to be checked; without
    it, a request that has a filter is refused."""
    preprocess = message.preprocess
    clip_sigma = preprocess.clip_sigma
    if not math.isfinite(clip_sigma) or clip_sigma < 0:
        raise InvalidArgument(f"clip_sigma must be a finite number >= 0, got {clip_sigma}")
    expression = None
    filter_columns: tuple[str, ...] = ()
    if message.HasField("filter"):
        if info is None:
            raise InvalidArgument("a filter needs the dataset's schema")
        expression, columns = filter_expression(message.filter, info.logical_schema)
        filter_columns = tuple(sorted(columns))
    return Prep(
        columns=tuple(message.columns),
        scaling=_option(_SCALINGS, preprocess.scaling, "scaling"),
        passthrough=tuple(preprocess.passthrough),
        clip_sigma=clip_sigma,
        impute=_option(_IMPUTATIONS, preprocess.impute, "impute"),
        categorical=_option(_ENCODINGS, preprocess.categorical, "categorical encoding"),
        filter=expression,
        filter_columns=filter_columns,
    )


def filter_expression(
    message: data_pb2.Filter, schema: pa.Schema
) -> tuple[pc.Expression, set[str]]:
    """An Arrow expression for the filter tree, and the columns it reads. Every column must
    exist and every literal must suit its column's type; the error names the field."""
    columns: set[str] = set()
    nodes = 0

    def column(name: str, where: str) -> pa.Field:
        if name not in schema.names:
            raise InvalidArgument(
                f"filter {where}: no column {name!r}; columns: {', '.join(schema.names)}"
            )
        columns.add(name)
        return schema.field(name)

    def literal(value: data_pb2.Literal, field: pa.Field, where: str) -> Any:
        kind = value.WhichOneof("value")
        if kind is None:
            raise InvalidArgument(f"filter {where}: the value is empty")
        ok = {
            "number": is_numeric(field.type) and not pa.types.is_boolean(field.type),
            "text": is_text(field.type),
            "flag": pa.types.is_boolean(field.type),
        }[kind]
        if not ok:
            raise InvalidArgument(
                f"filter {where}: a {kind} cannot be compared with column {field.name!r} "
                f"of type {field.type}"
            )
        return getattr(value, kind)

    def build(node: data_pb2.Filter, where: str, depth: int) -> pc.Expression:
        nonlocal nodes
        nodes += 1
        if depth > MAX_FILTER_DEPTH or nodes > MAX_FILTER_NODES:
            raise InvalidArgument(
                f"filter is too large: at most {MAX_FILTER_DEPTH} levels "
                f"and {MAX_FILTER_NODES} nodes"
            )
        kind = node.WhichOneof("node")
        if kind == "compare":
            compare = node.compare
            if compare.op not in _COMPARE:
                raise InvalidArgument(f"filter {where}.compare: unknown operator {compare.op}")
            field = column(compare.column, f"{where}.compare")
            value = literal(compare.value, field, f"{where}.compare")
            return _COMPARE[compare.op](pc.field(field.name), pa.scalar(value))
        if kind in ("all", "any"):
            terms = getattr(node, kind).terms
            if not terms:
                raise InvalidArgument(f"filter {where}.{kind}: needs at least one term")
            built = [build(t, f"{where}.{kind}[{i}]", depth + 1) for i, t in enumerate(terms)]
            combine = pc.and_kleene if kind == "all" else pc.or_kleene
            result = built[0]
            for term in built[1:]:
                result = combine(result, term)
            return result
        if kind == "negate":
            return pc.invert(build(node.negate, f"{where}.negate", depth + 1))
        if kind == "is_null":
            field = column(node.is_null, f"{where}.is_null")
            return pc.is_null(pc.field(field.name), nan_is_null=True)
        if kind == "in":
            inset = getattr(node, "in")  # `in` is a Python keyword
            field = column(inset.column, f"{where}.in")
            values = [literal(v, field, f"{where}.in") for v in inset.values]
            if not values:
                raise InvalidArgument(f"filter {where}.in: needs at least one value")
            return pc.is_in(pc.field(field.name), pa.array(values))
        raise InvalidArgument(f"filter {where}: empty node")

    # As in SQL, a comparison with a missing value is null, and a null row is dropped.
    return build(message, "filter", 0), columns


def partitioning_of(request: data_pb2.IngestRequest) -> str:
    return _option(_PARTITIONINGS, request.partitioning, "partitioning")


def ticket_for(request: data_pb2.DataRequest, version: int, shard: int) -> data_pb2.ShardTicket:
    ticket = data_pb2.ShardTicket(
        dataset=request.dataset,
        version=version,
        shard=shard,
        preprocess=request.preprocess,
        columns=request.columns,
        epoch=request.epoch,
        seed=request.seed,
        shuffle=request.shuffle,
    )
    if request.HasField("filter"):
        ticket.filter.CopyFrom(request.filter)
    return ticket


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
                categories=c.categories or (),
            )
            for c in info.columns
        ],
        created_unix=info.created_unix,
        versions=info.versions,
        partitioning=info.partitioning,
        target=info.target,
        classes=info.classes,
    )
