"""Server-side preprocessing (no network): scaling, clipping, imputation, categorical
encodings and the protobuf filter tree, checked against numpy on the same rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from onehop.errors import InvalidArgument
from onehop.keys import shard_key
from protos.onehop.v1 import data_pb2
from shard_service.catalog import Catalog, DatasetInfo
from shard_service.convert import prep_of, ticket_for
from shard_service.prepare import Prep

ROWS = 2000


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Catalog, DatasetInfo, pa.Table]:
    rng = np.random.default_rng(3)
    income = rng.normal(50_000, 12_000, ROWS)
    income[::50] = np.nan
    income[7] = 1e7  # an outlier for clipping
    table = pa.table(
        {
            "id": pa.array(np.arange(ROWS), pa.int64()),
            "income": pa.array(income, pa.float64(), mask=np.arange(ROWS) % 101 == 0),
            "age": pa.array(rng.integers(18, 90, ROWS), pa.int32()),
            "city": pa.array(rng.choice(["paris", "lima", "oslo"], ROWS)),
            "label": pa.array(rng.choice(["no", "yes"], ROWS)),
        }
    )
    catalog = Catalog.open(tmp_path_factory.mktemp("prep") / "shard", default_shards=1)
    info = catalog.ingest(
        "loans", table.schema, table.to_batches(max_chunksize=300), target="label"
    )
    return catalog, info, table


def read(loaded, request: data_pb2.DataRequest) -> pa.Table:
    catalog, info, _ = loaded
    return catalog.read_prepared("loans", 1, 0, prep_of(request, info))


def request(**fields) -> data_pb2.DataRequest:
    return data_pb2.DataRequest(dataset="loans", **fields)


def income_numpy(table: pa.Table) -> tuple[np.ndarray, float, float]:
    raw = table.column("income").to_numpy(zero_copy_only=False).astype(np.float64)
    present = raw[~np.isnan(raw)]
    return raw, float(present.mean()), float(present.std())


def test_standard_clip_and_impute_match_numpy(loaded) -> None:
    _, _, table = loaded
    preprocess = data_pb2.Preprocessing(
        scaling=data_pb2.SCALING_STANDARD, clip_sigma=3.0, impute=data_pb2.IMPUTE_MEAN
    )
    out = read(loaded, request(preprocess=preprocess, columns=["id", "income"]))
    raw, mean, std = income_numpy(table)
    expected = (
        np.clip(np.where(np.isnan(raw), mean, raw), mean - 3 * std, mean + 3 * std) - mean
    ) / std
    assert out.schema.field("income").type == pa.float32()
    np.testing.assert_allclose(out.column("income").to_numpy(), expected, rtol=1e-5, atol=1e-5)
    assert out.column("income").null_count == 0
    assert out.column("income").to_numpy()[7] == pytest.approx(3.0, rel=1e-5)


def test_minmax_without_imputation_keeps_missing_values(loaded) -> None:
    _, info, table = loaded
    preprocess = data_pb2.Preprocessing(scaling=data_pb2.SCALING_MINMAX)
    out = read(loaded, request(preprocess=preprocess, columns=["age", "income"]))
    age = table.column("age").to_numpy().astype(np.float64)
    np.testing.assert_allclose(
        out.column("age").to_numpy(), (age - age.min()) / (age.max() - age.min()), rtol=1e-6
    )
    raw, _, _ = income_numpy(table)
    served = out.column("income").to_numpy(zero_copy_only=False)
    assert np.array_equal(np.isnan(served), np.isnan(raw))
    assert np.nanmin(served) == 0.0 and np.nanmax(served) == 1.0


def test_categorical_encodings(loaded) -> None:
    _, info, table = loaded
    cities = table.column("city").to_numpy(zero_copy_only=False)
    assert info.column("city").categories == ("lima", "oslo", "paris")
    index = read(
        loaded,
        request(
            preprocess=data_pb2.Preprocessing(categorical=data_pb2.CATEGORICAL_INDEX),
            columns=["city"],
        ),
    )
    assert index.schema.field("city").type == pa.int32()
    np.testing.assert_array_equal(
        index.column("city").to_numpy(), np.searchsorted(["lima", "oslo", "paris"], cities)
    )
    one_hot = read(
        loaded,
        request(
            preprocess=data_pb2.Preprocessing(categorical=data_pb2.CATEGORICAL_ONE_HOT),
            columns=["id", "city"],
        ),
    )
    assert one_hot.schema.names == ["id", "city=lima", "city=oslo", "city=paris"]
    for name in ("lima", "oslo", "paris"):
        np.testing.assert_array_equal(
            one_hot.column(f"city={name}").to_numpy(), (cities == name).astype(np.float32)
        )
    # The two-class target is 0/1 whatever the categorical encoding.
    assert read(loaded, request(columns=["label"])).schema.field("label").type == pa.int8()


def test_filter_tree_matches_numpy(loaded) -> None:
    _, _, table = loaded
    age = table.column("age").to_numpy()
    cities = table.column("city").to_numpy(zero_copy_only=False)
    labels = table.column("label").to_numpy(zero_copy_only=False)

    def number(value: float) -> data_pb2.Literal:
        return data_pb2.Literal(number=value)

    tree = data_pb2.Filter(
        all=data_pb2.FilterList(
            terms=[
                data_pb2.Filter(
                    compare=data_pb2.Comparison(
                        column="age", op=data_pb2.Comparison.GE, value=number(30)
                    )
                ),
                data_pb2.Filter(
                    any=data_pb2.FilterList(
                        terms=[
                            data_pb2.Filter(
                                compare=data_pb2.Comparison(
                                    column="city", value=data_pb2.Literal(text="oslo")
                                )
                            ),
                            data_pb2.Filter(
                                negate=data_pb2.Filter(
                                    **{"in": data_pb2.InSet(column="label", values=[number(0)])}
                                )
                            ),
                        ]
                    )
                ),
            ]
        )
    )
    out = read(loaded, request(filter=tree, columns=["id"]))
    expected = np.flatnonzero((age >= 30) & ((cities == "oslo") | (labels == "yes")))
    assert out.schema.names == ["id"]  # filter columns are read, not served
    np.testing.assert_array_equal(out.column("id").to_numpy(), expected)

    missing = read(loaded, request(filter=data_pb2.Filter(is_null="income"), columns=["id"]))
    raw, _, _ = income_numpy(table)
    np.testing.assert_array_equal(missing.column("id").to_numpy(), np.flatnonzero(np.isnan(raw)))


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        (data_pb2.Filter(is_null="salary"), "filter.is_null: no column 'salary'"),
        (
            data_pb2.Filter(
                compare=data_pb2.Comparison(column="city", value=data_pb2.Literal(number=3))
            ),
            "a number cannot be compared with column 'city'",
        ),
        (
            data_pb2.Filter(compare=data_pb2.Comparison(column="age")),
            "filter.compare: the value is empty",
        ),
        (data_pb2.Filter(all=data_pb2.FilterList()), "needs at least one term"),
        (data_pb2.Filter(), "empty node"),
    ],
)
def test_invalid_filters_name_the_field(loaded, tree: data_pb2.Filter, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        read(loaded, request(filter=tree))


def test_deep_filters_are_refused(loaded) -> None:
    tree = data_pb2.Filter(is_null="age")
    for _ in range(20):
        tree = data_pb2.Filter(negate=tree)
    with pytest.raises(InvalidArgument, match="filter is too large"):
        read(loaded, request(filter=tree))


def test_bad_options(loaded) -> None:
    with pytest.raises(InvalidArgument, match="clip_sigma"):
        read(loaded, request(preprocess=data_pb2.Preprocessing(clip_sigma=-1)))
    with pytest.raises(InvalidArgument, match="unknown scaling 9"):
        read(loaded, request(preprocess=data_pb2.Preprocessing(scaling=9)))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="no column 'x'"):
        read(loaded, request(columns=["x"]))


def test_every_preparation_has_its_own_cache_key(loaded) -> None:
    """The cache key covers preprocessing, projection and filter; not order or offset."""
    _, info, _ = loaded
    base = request(columns=["id", "income"])
    variants = [
        base,
        request(columns=["income", "id"]),
        request(columns=["id", "income"], preprocess=data_pb2.Preprocessing(clip_sigma=2)),
        request(
            columns=["id", "income"],
            preprocess=data_pb2.Preprocessing(scaling=data_pb2.SCALING_MINMAX),
        ),
        request(columns=["id", "income"], filter=data_pb2.Filter(is_null="income")),
    ]
    keys = {shard_key(ticket_for(r, 1, 0)) for r in variants}
    assert len(keys) == len(variants)
    reordered = ticket_for(base, 1, 0)
    reordered.epoch, reordered.seed, reordered.shuffle, reordered.offset = 4, 9, True, 100
    assert shard_key(reordered) == shard_key(ticket_for(base, 1, 0))
    assert Prep().numeric_transform is False


def test_prep_refuses_unknown_options() -> None:
    with pytest.raises(InvalidArgument, match="unknown scaling 'zscore'"):
        Prep(scaling="zscore")
    with pytest.raises(InvalidArgument, match="unknown categorical encoding"):
        Prep(categorical="hash")
