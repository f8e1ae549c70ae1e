"""The shard service's core: ingest, versions, statistics, preprocessing (no network)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from onehop.errors import InvalidArgument, NotFound
from shard_service.catalog import Catalog
from shard_service.columns import CATEGORICAL
from shard_service.partition import key_hash
from shard_service.prepare import Prep


def make_table(rows: int = 1000, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    income = rng.normal(50_000, 12_000, rows)
    income[::97] = np.nan  # NaN is missing for the statistics
    return pa.table(
        {
            "id": pa.array(np.arange(rows), pa.int64()),
            "income": pa.array(income, pa.float64()),
            "age": pa.array(rng.integers(18, 90, rows), pa.int32()),
            "ratio": pa.array(rng.random(rows), pa.float32()),
            "constant": pa.array(np.full(rows, 3.0)),
            "city": pa.array(rng.choice(["paris", "lima", "oslo"], rows)),
            "label": pa.array(rng.integers(0, 2, rows), pa.int8()),
        }
    )


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return Catalog.open(tmp_path / "shard", default_shards=4)


def read_all_shards(catalog: Catalog, name: str, version: int = 0, prep: Prep | None = None):
    info = catalog.describe(name, version)
    prep = prep or Prep()
    return [catalog.read_prepared(name, info.version, k, prep) for k in range(len(info.shards))]


def stored_schema(schema: pa.Schema) -> pa.Schema:
    """The schema the catalog stores and serves: strings dictionary-encoded."""
    return pa.schema(
        [pa.field(f.name, CATEGORICAL) if f.type == pa.string() else f for f in schema]
    )


def decoded(table: pa.Table) -> pa.Table:
    """Dictionary columns back to plain strings, for value comparisons."""
    return table.cast(
        pa.schema(
            [pa.field(f.name, pa.string()) if f.type == CATEGORICAL else f for f in table.schema]
        )
    )


def assert_same_rows(actual: pa.Table, expected: pa.Table) -> None:
    """Equal schema (as stored) and values, NaN equal to NaN (Table.equals treats NaN as
    unequal)."""
    assert actual.schema == stored_schema(expected.schema)
    actual = decoded(actual).sort_by("id")
    for name in expected.schema.names:
        np.testing.assert_array_equal(
            actual.column(name).to_numpy(zero_copy_only=False),
            expected.column(name).to_numpy(zero_copy_only=False),
        )


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


@pytest.mark.parametrize("key", ["", "id", "city"])
def test_ingest_places_every_row_in_exactly_one_shard(catalog: Catalog, key: str) -> None:
    table = make_table()
    info = catalog.ingest("loans", table.schema, table.to_batches(max_chunksize=64), key=key)

    assert info.version == 1 and info.rows == table.num_rows
    assert len(info.shards) == 4
    assert sum(s.rows for s in info.shards) == table.num_rows
    shards = read_all_shards(catalog, "loans")
    assert [s.num_rows for s in shards] == [s.rows for s in info.shards]
    if key != "city":  # three cities cannot fill four shards
        assert all(s.rows > 0 for s in info.shards)
    ids = np.concatenate([s.column("id").to_numpy() for s in shards])
    assert sorted(ids.tolist()) == list(range(table.num_rows))
    # Reassembled by id, every value is the one ingested.
    assert_same_rows(pa.concat_tables(shards), table)
    version_dir = catalog.root / "loans" / "v1"
    assert sorted(os.listdir(version_dir)) == [
        "dataset.json",
        *(f"shard-{k:05d}.arrows" for k in range(4)),
    ]
    stored = pa.ipc.open_stream(pa.memory_map(str(version_dir / "shard-00000.arrows")))
    assert stored.read_all().num_rows == info.shards[0].rows


def test_versions_stored_as_parquet_are_still_read(tmp_path: Path) -> None:
    """Manifest format 1 (Parquet shards, before Arrow IPC) reads as before."""
    table = make_table()
    catalog = Catalog.open(tmp_path / "shard")
    catalog.ingest("old", table.schema, table.to_batches(max_chunksize=100), shards=2)
    version_dir = catalog.root / "old" / "v1"
    expected = [catalog.read_prepared("old", 1, k, Prep()) for k in range(2)]
    for k in range(2):
        arrows = version_dir / f"shard-{k:05d}.arrows"
        pq.write_table(
            pa.ipc.open_stream(pa.memory_map(str(arrows))).read_all(),
            arrows.with_suffix(".parquet"),
        )
        arrows.unlink()
    manifest = json.loads((version_dir / "dataset.json").read_text())
    (version_dir / "dataset.json").write_text(json.dumps({**manifest, "format": 1}))

    reopened = Catalog.open(tmp_path / "shard")
    assert reopened.describe("old").storage == "parquet"
    for k in range(2):
        assert_same_rows(reopened.read_prepared("old", 1, k, Prep()), expected[k])


def test_key_sharding_keeps_each_key_in_one_shard(catalog: Catalog) -> None:
    table = make_table()
    catalog.ingest("by-city", table.schema, table.to_batches(max_chunksize=50), key="city")
    cities_per_shard = [
        set(s.column("city").to_pylist()) for s in read_all_shards(catalog, "by-city")
    ]
    seen: list[str] = [c for cities in cities_per_shard for c in cities]
    assert sorted(seen) == ["lima", "oslo", "paris"]  # no city in two shards


def test_key_hash_is_stable_and_slice_independent() -> None:
    values = pa.array(["x", "a", "bb", "", None, "a"])
    hashed = key_hash(values)
    assert hashed[1] == hashed[5] and hashed[1] != hashed[2]
    assert (key_hash(values.slice(1)) == hashed[1:]).all()
    # Known value: a change of the function would move every row of existing datasets.
    assert key_hash(pa.array([1], pa.int64()))[0] == key_hash(pa.array([1], pa.int8()))[0]


def test_one_large_batch_still_fills_every_shard(catalog: Catalog) -> None:
    table = make_table(rows=10)
    info = catalog.ingest("one-batch", table.schema, [table.combine_chunks().to_batches()[0]])
    assert [s.rows for s in info.shards] == [3, 3, 2, 2]


def test_stats_equal_numpy(catalog: Catalog) -> None:
    table = make_table(rows=5000, seed=3)
    info = catalog.ingest("stats", table.schema, table.to_batches(max_chunksize=333))
    for name in ("id", "income", "age", "ratio", "constant", "label"):
        values = table.column(name).to_numpy().astype(np.float64)
        present = values[~np.isnan(values)]
        stats = info.column(name)
        assert stats.count == len(present)
        assert stats.nulls == len(values) - len(present)
        assert stats.mean is not None and stats.std is not None
        np.testing.assert_allclose(stats.mean, present.mean(), rtol=1e-10)
        np.testing.assert_allclose(stats.std, present.std(ddof=0), rtol=1e-9, atol=1e-12)
        assert stats.min == present.min() and stats.max == present.max()
    city = info.column("city")
    assert (city.count, city.nulls, city.mean, city.std) == (5000, 0, None, None)
    assert info.column("income").nulls == len(range(0, 5000, 97))


def test_stats_count_arrow_nulls(catalog: Catalog) -> None:
    table = pa.table({"x": pa.array([1.0, None, 3.0, None]), "s": pa.array(["a", None, "b", "c"])})
    info = catalog.ingest("nulls", table.schema, table.to_batches())
    assert (info.column("x").count, info.column("x").nulls, info.column("x").mean) == (2, 2, 2.0)
    assert (info.column("s").count, info.column("s").nulls) == (3, 1)


def test_versions_increase_and_stay_readable(catalog: Catalog) -> None:
    first = make_table(rows=100, seed=1)
    second = make_table(rows=150, seed=2)
    assert catalog.ingest("loans", first.schema, first.to_batches()).version == 1
    info = catalog.ingest("loans", second.schema, second.to_batches(), shards=2)
    assert (info.version, info.versions, len(info.shards)) == (2, (1, 2), 2)
    assert catalog.describe("loans").version == 2
    assert catalog.describe("loans", 1).rows == 100
    assert_same_rows(pa.concat_tables(read_all_shards(catalog, "loans", 1)), first)
    assert [i.name for i in catalog.list()] == ["loans"]
    assert catalog.list()[0].version == 2
    # A fresh catalog over the same directory sees the same versions.
    reopened = Catalog.open(catalog.root.parent)
    assert reopened.describe("loans").versions == (1, 2)


def test_concurrent_ingests_get_distinct_versions(catalog: Catalog) -> None:
    table = make_table(rows=200)
    versions: list[int] = []
    errors: list[BaseException] = []

    def ingest() -> None:
        try:
            versions.append(catalog.ingest("race", table.schema, table.to_batches(50)).version)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=ingest) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(versions) == [1, 2, 3, 4, 5, 6]
    assert catalog.describe("race").versions == (1, 2, 3, 4, 5, 6)


def test_bad_batch_mid_stream_publishes_nothing(catalog: Catalog) -> None:
    table = make_table(rows=300)
    good = table.to_batches(max_chunksize=100)
    bad = table.set_column(1, "income", pa.array(["garbage"] * 300)).to_batches(100)[0]

    def stream():
        yield good[0]
        yield good[1]
        yield bad
        yield good[2]

    with pytest.raises(InvalidArgument, match="batch 3: column 'income' is string"):
        catalog.ingest("loans", table.schema, stream())
    assert catalog.list() == []
    with pytest.raises(NotFound):
        catalog.describe("loans")
    assert files_under(catalog.root) <= {".locks", ".locks/loans.lock"}

    # A published version survives a later failed ingest untouched.
    catalog.ingest("loans", table.schema, good)
    with pytest.raises(InvalidArgument):
        catalog.ingest("loans", table.schema, stream())
    assert catalog.describe("loans").versions == (1,)
    assert sorted(os.listdir(catalog.root / "loans")) == ["v1"]


def test_a_failing_source_publishes_nothing(catalog: Catalog) -> None:
    table = make_table(rows=100)

    def broken():
        yield table.to_batches()[0]
        raise pa.ArrowInvalid("CSV parse error: Expected 7 columns, got 2")

    with pytest.raises(InvalidArgument, match="malformed input after batch 1: CSV parse error"):
        catalog.ingest("csv", table.schema, broken())
    with pytest.raises(InvalidArgument, match="batch 1 is a str"):
        catalog.ingest("csv", table.schema, ["not a batch"])
    assert catalog.list() == []


@pytest.mark.parametrize(
    "batches",
    [[], [pa.table({"x": pa.array([], pa.float64())}).to_batches()]],
    ids=["none", "0-rows"],
)
def test_empty_input_is_rejected(catalog: Catalog, batches) -> None:
    schema = pa.schema([("x", pa.float64())])
    flat = [b for group in batches for b in group]
    with pytest.raises(InvalidArgument, match="no rows"):
        catalog.ingest("empty", schema, flat)
    assert catalog.list() == []


def test_bad_ingest_options(catalog: Catalog) -> None:
    table = make_table(rows=10)
    with pytest.raises(InvalidArgument, match="key column 'nope'"):
        catalog.ingest("x", table.schema, table.to_batches(), key="nope")
    with pytest.raises(InvalidArgument, match="shards must be between 1 and 4096"):
        catalog.ingest("x", table.schema, table.to_batches(), shards=5000)
    with pytest.raises(InvalidArgument, match="cannot shard by a key column of type list"):
        nested = pa.table({"k": pa.array([[1], [2]])})
        catalog.ingest("x", nested.schema, nested.to_batches(), key="k")
    assert catalog.list() == []


@pytest.mark.parametrize("name", ["", "/etc", "..", "../escape", "a/b", "a/../../b", ".hidden"])
def test_bad_names_write_nothing(tmp_path: Path, name: str) -> None:
    catalog = Catalog.open(tmp_path / "shard")
    table = make_table(rows=10)
    before = files_under(tmp_path)
    with pytest.raises(InvalidArgument, match="invalid dataset name"):
        catalog.ingest(name, table.schema, table.to_batches())
    with pytest.raises(InvalidArgument, match="invalid dataset name"):
        catalog.describe(name)
    assert files_under(tmp_path) == before
    assert not (tmp_path.parent / "escape").exists() and not (tmp_path / "b").exists()


def test_standardisation_matches_numpy(catalog: Catalog) -> None:
    table = make_table(rows=2000, seed=5)
    catalog.ingest("std", table.schema, table.to_batches(max_chunksize=128))
    prep = Prep(scaling="standard", passthrough=("label", "id"))
    info = catalog.describe("std")
    shards = read_all_shards(catalog, "std", prep=prep)
    out = pa.concat_tables(shards).sort_by("id")
    assert out.schema == catalog.prepared_schema(info, prep)
    assert out.schema.field("income").type == pa.float32()
    assert out.schema.field("age").type == pa.float32()
    assert out.schema.field("label").type == pa.int8()  # passthrough
    assert out.schema.field("city").type == CATEGORICAL  # not numeric
    for name in ("income", "age", "ratio"):
        raw = table.column(name).to_numpy().astype(np.float64)
        present = raw[~np.isnan(raw)]
        expected = (raw - present.mean()) / present.std()
        np.testing.assert_allclose(
            out.column(name).to_numpy(zero_copy_only=False), expected, rtol=1e-5, atol=1e-5
        )
    # A constant column (std 0) is only centered.
    assert set(out.column("constant").to_pylist()) == {0.0}
    assert out.column("label").equals(table.column("label"))


def test_projection_keeps_the_requested_order(catalog: Catalog) -> None:
    table = make_table(rows=100)
    catalog.ingest("proj", table.schema, table.to_batches())
    prep = Prep(columns=("label", "income"), scaling="standard", passthrough=("label",))
    shard = catalog.read_prepared("proj", 1, 0, prep)
    assert shard.schema.names == ["label", "income"]
    assert shard.schema.types == [pa.int8(), pa.float32()]
    plain = catalog.read_prepared("proj", 1, 0, Prep(columns=("city",)))
    assert plain.schema.names == ["city"]


def test_unknown_column_and_missing_things(catalog: Catalog) -> None:
    table = make_table(rows=100)
    catalog.ingest("proj", table.schema, table.to_batches())
    with pytest.raises(InvalidArgument, match="no column 'salary'"):
        catalog.read_prepared("proj", 1, 0, Prep(columns=("income", "salary")))
    with pytest.raises(InvalidArgument, match="no column 'target'"):
        catalog.read_prepared("proj", 1, 0, Prep(scaling="standard", passthrough=("target",)))
    with pytest.raises(NotFound, match="no dataset 'other'"):
        catalog.read_prepared("other", 0, 0, Prep())
    with pytest.raises(NotFound, match="has no version 7; versions: 1"):
        catalog.read_prepared("proj", 7, 0, Prep())
    with pytest.raises(NotFound, match="has no shard 4"):
        catalog.read_prepared("proj", 1, 4, Prep())


def test_unfinished_ingests_are_cleaned_on_open(tmp_path: Path) -> None:
    catalog = Catalog.open(tmp_path / "shard")
    stale = catalog.root / "loans" / ".tmp-deadbeef"
    stale.mkdir(parents=True)
    (stale / "shard-00000.arrows").write_bytes(b"partial")
    reopened = Catalog.open(tmp_path / "shard")
    assert not stale.exists()
    assert reopened.list() == []
