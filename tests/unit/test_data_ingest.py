"""Ingest from files (no network): streaming readers, categories, two-class targets, range
partitioning, source rules, and bad input that must publish nothing."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from onehop.dataset import file_format, open_batches
from onehop.errors import InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from shard_service.catalog import Catalog
from shard_service.columns import CATEGORICAL, MAX_CATEGORIES
from shard_service.prepare import Prep
from shard_service.sources import Sources


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return Catalog.open(tmp_path / "shard", default_shards=3)


@pytest.fixture
def sources(tmp_path: Path) -> Sources:
    root = tmp_path / "sources"
    root.mkdir()
    return Sources(root)


def make_table(rows: int = 3000, seed: int = 1) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "id": pa.array(np.arange(rows), pa.int64()),
            "amount": rng.normal(100, 20, rows),
            "city": pa.array(rng.choice(["oslo", "lima", "paris"], rows)),
            "outcome": pa.array(rng.choice(["repaid", "default"], rows, p=[0.7, 0.3])),
        }
    )


def ingest_file(catalog: Catalog, sources: Sources, name: str, **options):
    reader = sources.open(name)
    return catalog.ingest("loans", reader.schema, reader, **options)


def nothing_published(catalog: Catalog) -> bool:
    return catalog.list() == [] and not list(catalog.root.glob("*/.tmp-*"))


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".arrow"])
def test_every_format_streams_into_the_same_dataset(catalog, sources, suffix) -> None:
    table = make_table()
    path = sources.root / f"loans{suffix}"
    if suffix == ".csv":
        pacsv.write_csv(table, path)
    elif suffix == ".parquet":
        pq.write_table(table, path, row_group_size=500)
    else:
        with pa.ipc.new_file(path, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=700):
                writer.write_batch(batch)
    info = ingest_file(catalog, sources, path.name, target="outcome")

    assert info.rows == 3000 and sum(s.rows for s in info.shards) == 3000
    city = info.column("city")
    assert city.categories == ("lima", "oslo", "paris")
    assert info.schema.field("city").type == CATEGORICAL
    # A two-class string target is served as 0/1, the second class in sorted order as 1.
    assert info.classes == ("default", "repaid")
    outcome = info.column("outcome")
    expected = (table.column("outcome").to_numpy(zero_copy_only=False) == "repaid").astype(float)
    assert (outcome.type, outcome.min, outcome.max) == ("int8", 0.0, 1.0)
    assert outcome.mean == pytest.approx(expected.mean())
    assert outcome.std == pytest.approx(expected.std())
    read = pa.concat_tables(
        catalog.read_prepared("loans", 1, k, Prep(columns=("id", "outcome"))) for k in range(3)
    ).sort_by("id")
    assert read.schema.field("outcome").type == pa.int8()
    np.testing.assert_array_equal(read.column("outcome").to_numpy(), expected)


def test_positive_class_and_targets_that_are_not_binary(catalog: Catalog) -> None:
    table = make_table(rows=200)
    info = catalog.ingest(
        "loans", table.schema, table.to_batches(), target="outcome", positive_class="default"
    )
    assert info.classes == ("repaid", "default")
    shard = catalog.read_prepared("loans", 1, 0, Prep(columns=("outcome",)))
    outcome = table.column("outcome").to_numpy(zero_copy_only=False)
    assert shard.column("outcome").to_numpy().sum() <= (outcome == "default").sum()
    # Three cities are not two classes: the target stays categorical.
    info = catalog.ingest("loans", table.schema, table.to_batches(), target="city")
    assert info.classes == () and info.column("city").categories == ("lima", "oslo", "paris")
    with pytest.raises(InvalidArgument, match="'maybe' is not a value of 'outcome'"):
        catalog.ingest(
            "loans", table.schema, table.to_batches(), target="outcome", positive_class="maybe"
        )
    with pytest.raises(InvalidArgument, match="target column 'nope'"):
        catalog.ingest("loans", table.schema, table.to_batches(), target="nope")
    assert [i.version for i in catalog.list()] == [2]


def test_high_cardinality_strings_carry_no_categories(catalog: Catalog) -> None:
    rows = MAX_CATEGORIES + 10
    table = pa.table({"id": np.arange(rows), "code": [f"c{i}" for i in range(rows)]})
    info = catalog.ingest("codes", table.schema, table.to_batches(max_chunksize=100))
    assert info.column("code").categories is None
    with pytest.raises(InvalidArgument, match="too many distinct values"):
        catalog.prepared_schema(info, Prep(categorical="index"))


def test_range_partitioning(catalog: Catalog) -> None:
    table = make_table(rows=1000)
    info = catalog.ingest(
        "loans", table.schema, table.to_batches(), key="id", partitioning="range",
        bounds=(100.0, 500.0),
    )  # fmt: skip
    assert [s.rows for s in info.shards] == [100, 400, 500]
    assert info.partitioning == "range:id"
    ids = catalog.read_prepared("loans", 1, 1, Prep(columns=("id",))).column("id").to_pylist()
    assert (min(ids), max(ids)) == (100, 499)
    # Without bounds: the first batch's quantiles split the key into `shards` ranges.
    info = catalog.ingest(
        "loans", table.schema, table.to_batches(), key="amount", partitioning="range", shards=4
    )
    assert len(info.shards) == 4 and all(200 <= s.rows <= 300 for s in info.shards)
    for bad, message in [
        ({"key": "city", "partitioning": "range"}, "numeric key"),
        ({"key": "id", "partitioning": "range", "bounds": (5.0, 1.0)}, "ascending"),
        ({"key": "id", "partitioning": "range", "bounds": (5.0,), "shards": 3}, "make 2 shards"),
        ({"partitioning": "range"}, "needs a key column"),
        ({"key": "id", "bounds": (1.0,)}, "range partitioning only"),
    ]:
        with pytest.raises(InvalidArgument, match=message):
            catalog.ingest("loans", table.schema, table.to_batches(), **bad)
    assert [i.version for i in catalog.list()] == [2]


@pytest.mark.parametrize("good", [50, 200_000])  # in the first block, and blocks later
def test_ragged_csv_names_the_row(catalog: Catalog, sources: Sources, good: int) -> None:
    lines = ["a,b,c"] + [f"{i},{i * 2},x" for i in range(good)] + ["7,8"] + ["1,2,y"] * 5
    (sources.root / "ragged.csv").write_text("\n".join(lines) + "\n")
    row = good + 2  # after the header, 1-based
    with pytest.raises(
        InvalidArgument, match=rf"ragged.csv: CSV parse error: Row #{row}: Expected"
    ):
        ingest_file(catalog, sources, "ragged.csv")
    assert nothing_published(catalog)


def test_non_numeric_value_names_the_column(catalog: Catalog, sources: Sources) -> None:
    rows = 150_000  # several CSV blocks, so the bad value is past type inference
    text = "id,amount\n" + "".join(f"{i},{i}.5\n" for i in range(rows)) + "9,abc\n"
    (sources.root / "bad.csv").write_text(text)
    with pytest.raises(InvalidArgument, match=r"column 'amount': .*invalid value 'abc'") as e:
        ingest_file(catalog, sources, "bad.csv")
    assert "in the rows from row" in e.value.message
    assert nothing_published(catalog)


def test_truncated_and_fake_parquet(catalog: Catalog, sources: Sources) -> None:
    table = make_table()
    whole = sources.root / "whole.parquet"
    pq.write_table(table, whole)
    data = whole.read_bytes()
    (sources.root / "truncated.parquet").write_bytes(data[: len(data) // 2])
    (sources.root / "fake.parquet").write_bytes(b"id,amount\n1,2\n")
    for name in ("truncated.parquet", "fake.parquet"):
        with pytest.raises(InvalidArgument, match=f"{name}: not a readable parquet file"):
            ingest_file(catalog, sources, name)
    assert nothing_published(catalog)


def test_corrupt_arrow_file_is_validated_fully(catalog: Catalog, sources: Sources) -> None:
    table = pa.table({"name": ["alpha", "beta", "gamma"] * 100})
    path = sources.root / "names.arrow"
    with pa.ipc.new_file(path, table.schema) as writer:
        writer.write_table(table)
    data = bytearray(path.read_bytes())
    # Invalid UTF-8 inside the values: offsets and lengths are sound, so only a full
    # validation sees it (a shallow one, and the IPC reader, accept the batch).
    at = data.find(b"alphabeta")
    data[at : at + 2] = b"\xff\xfe"
    path.write_bytes(bytes(data))
    pa.ipc.open_file(path).get_batch(0).validate()
    with pytest.raises(InvalidArgument, match="names.arrow: .*UTF8"):
        ingest_file(catalog, sources, "names.arrow")
    assert nothing_published(catalog)


def test_source_rules(tmp_path: Path, sources: Sources) -> None:
    (sources.root / "in.csv").write_text("a\n1\n")
    outside = tmp_path / "outside.csv"
    outside.write_text("a\n1\n")
    assert sources.open("in.csv").read_all().num_rows == 1
    assert sources.open(f"file://{sources.root / 'in.csv'}").read_all().num_rows == 1
    for source in (str(outside), "../outside.csv", f"file://{outside}"):
        with pytest.raises(PermissionDenied, match="outside the source root"):
            sources.open(source)
    os.symlink(outside, sources.root / "link.csv")
    with pytest.raises(PermissionDenied):
        sources.open("link.csv")
    for uri in ("http://example.com/x.csv", "hdfs://nn/x.csv", "ftp://h/x.csv"):
        with pytest.raises(InvalidArgument, match="is not allowed for sources; allowed: file"):
            sources.open(uri)
    with pytest.raises(NotFound, match="no such source"):
        sources.open("missing.csv")
    with pytest.raises(InvalidArgument, match="cannot tell the format"):
        sources.open("in.xlsx")
    assert file_format("s3://bucket/data.parquet") == "parquet"
    assert file_format("x", "arrow") == "arrow"


def test_open_batches_streams_in_bounded_pieces(tmp_path: Path) -> None:
    table = make_table(rows=150_000)
    path = tmp_path / "big.parquet"
    pq.write_table(table, path, row_group_size=20_000)
    reader = open_batches(pa.OSFile(str(path)), "parquet", "big.parquet")
    sizes = [batch.num_rows for batch in reader]
    assert sum(sizes) == 150_000 and max(sizes) <= 65_536


def test_a_full_disk_is_resource_exhausted_and_publishes_nothing(catalog: Catalog) -> None:
    table = make_table(rows=1000)

    def filling():  # the disk fills while shards are being written
        yield from table.to_batches(max_chunksize=300)[:2]
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ResourceExhausted, match="no space left on the shard service's disk"):
        catalog.ingest("loans", table.schema, filling())
    assert nothing_published(catalog)
    assert catalog.ingest("loans", table.schema, table.to_batches()).version == 1
