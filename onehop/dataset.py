"""A seeded credit-default table in the shape of the UCI "default of credit card clients"
data: numeric amounts, categorical codes (sex, education, marriage, repayment status) and a
binary `default` target drawn from a latent risk score, so models have signal to learn; and
the streaming readers of input files (CSV, Parquet, Arrow IPC) that ingest uses."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from onehop.errors import InvalidArgument

TARGET = "default"
MONTHS = 6


def credit_default(rows: int, seed: int = 7) -> pa.Table:
    rng = np.random.default_rng(seed)
    limit = np.round(rng.lognormal(11.7, 0.7, rows), -3).clip(10_000, 1_000_000)
    sex = rng.integers(1, 3, rows)
    education = rng.choice([1, 2, 3, 4], rows, p=[0.35, 0.47, 0.16, 0.02])
    marriage = rng.choice([1, 2, 3], rows, p=[0.45, 0.53, 0.02])
    age = rng.integers(21, 76, rows)
    # Repayment status per month: -1 paid duly, 1..8 months of delay; persistent per client.
    habit = rng.normal(0.0, 1.0, rows)
    pay = np.stack(
        [np.clip(np.round(habit * 1.2 + rng.normal(0, 0.8, rows)), -2, 8) for _ in range(MONTHS)],
        axis=1,
    )
    utilisation = np.clip(rng.beta(2, 3, rows) + 0.08 * habit, 0, 1.2)
    bill = np.stack(
        [limit * np.clip(utilisation + rng.normal(0, 0.05, rows), 0, 1.3) for _ in range(MONTHS)],
        axis=1,
    ).round(0)
    paid_share = np.clip(rng.beta(2, 5, rows) - 0.05 * habit, 0, 1)
    payment = (bill * paid_share[:, None] * rng.uniform(0.7, 1.3, (rows, MONTHS))).round(0)

    score = (
        -1.6
        + 0.55 * pay[:, 0]
        + 0.20 * pay[:, 1:3].mean(axis=1)
        + 1.1 * (utilisation - 0.4)
        - 2.0 * (paid_share - 0.25)
        - 0.25 * (np.log(limit) - 11.7)
        + 0.08 * (education == 3)
        - 0.01 * (age - 40) / 10
        + 0.06 * (sex == 1)
    )
    default = (rng.random(rows) < 1 / (1 + np.exp(-score))).astype(np.int64)

    columns: dict[str, np.ndarray] = {
        "LIMIT_BAL": limit,
        "SEX": sex,
        "EDUCATION": education,
        "MARRIAGE": marriage,
        "AGE": age,
    }
    for month, name in enumerate(["PAY_0", "PAY_2", "PAY_3", "PAY_4", "PAY_5", "PAY_6"]):
        columns[name] = pay[:, month].astype(np.int64)
    for month in range(MONTHS):
        columns[f"BILL_AMT{month + 1}"] = bill[:, month]
    for month in range(MONTHS):
        columns[f"PAY_AMT{month + 1}"] = payment[:, month]
    columns[TARGET] = default
    return pa.table(columns)


def write_csv(table: pa.Table, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pacsv.write_csv(table, tmp)
    tmp.replace(path)
    return path


# --- reading input files --------------------------------------------------------------------

FORMATS = {
    ".csv": "csv",
    ".txt": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".arrow": "arrow",
    ".ipc": "arrow",
    ".feather": "arrow",
}
# Rows per batch from Parquet and bytes per CSV block. Arrow's CSV reader reads several
# blocks ahead and holds each parsed several times over: 1 MiB blocks keep an ingest's
# memory near 70 MiB of Arrow data whatever the file's size (4 MiB: ~170 MiB).
READ_BATCH_ROWS = 64 * 1024
CSV_BLOCK_BYTES = 1 << 20


def file_format(name: str, format: str = "") -> str:
    """ "csv", "parquet" or "arrow": the given format, else the one the file's extension says."""
    if format:
        if format not in set(FORMATS.values()):
            raise InvalidArgument(f"unknown format {format!r}: use csv, parquet or arrow")
        return format
    suffix = PurePosixPath(name).suffix.lower()
    if suffix not in FORMATS:
        raise InvalidArgument(
            f"cannot tell the format of {name!r} from {suffix or 'no extension'}: "
            "use .csv, .parquet or .arrow, or name the format"
        )
    return FORMATS[suffix]


def open_batches(source: pa.NativeFile, format: str, name: str) -> pa.RecordBatchReader:
    """A streaming reader over one input file (never loaded whole), whose errors are
    InvalidArgument naming `name` and the row or column at fault.

    `source` must be seekable for Parquet and Arrow files. Arrow IPC batches are validated
    fully (offsets, UTF-8, dictionary indices) before they are passed on.
    """
    try:
        if format == "csv":
            reader = _open_csv(source, use_threads=True)
        elif format == "parquet":
            parquet = pq.ParquetFile(source)
            reader = pa.RecordBatchReader.from_batches(
                parquet.schema_arrow, parquet.iter_batches(batch_size=READ_BATCH_ROWS)
            )
        else:
            reader = _open_ipc(source)
    except (pa.ArrowInvalid, OSError) as exc:
        if format == "csv":
            raise InvalidArgument(f"{name}: {_csv_error(source, first_line(exc))}") from None
        raise InvalidArgument(f"{name}: not a readable {format} file: {first_line(exc)}") from None
    return pa.RecordBatchReader.from_batches(reader.schema, _checked(reader, source, format, name))


def _open_csv(source: pa.NativeFile, use_threads: bool) -> pa.RecordBatchReader:
    return pacsv.open_csv(
        source,
        read_options=pacsv.ReadOptions(use_threads=use_threads, block_size=CSV_BLOCK_BYTES),
    )


def _csv_error(source: pa.NativeFile, message: str) -> str:
    """Arrow names the row of a malformed CSV line only when it parses on one thread: on
    this error path alone, read the file again that way to find the row."""
    if not message.startswith("CSV parse error") or "Row #" in message or not source.seekable():
        return message
    try:
        source.seek(0)
        for _ in _open_csv(source, use_threads=False):
            pass
    except (pa.ArrowInvalid, OSError) as exc:
        return first_line(exc)
    return message


def _open_ipc(source: pa.NativeFile) -> pa.RecordBatchReader:
    """The Arrow IPC file format (random access), else the stream format."""
    try:
        file = pa.ipc.open_file(source)
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_stream(source)
    return pa.RecordBatchReader.from_batches(
        file.schema, (file.get_batch(i) for i in range(file.num_record_batches))
    )


def _checked(
    reader: pa.RecordBatchReader, source: pa.NativeFile, format: str, name: str
) -> Iterator[pa.RecordBatch]:
    schema = reader.schema
    rows = 0
    while True:
        try:
            batch = reader.read_next_batch()
            if format == "arrow":
                batch.validate(full=True)
        except StopIteration:
            return
        except (pa.ArrowInvalid, OSError) as exc:
            message = first_line(exc)
            if format == "csv":
                message = _csv_error(source, message)
            raise InvalidArgument(f"{name}: {_located(message, schema, rows, format)}") from None
        rows += batch.num_rows
        yield batch


_CSV_COLUMN = re.compile(r"In CSV column #(\d+): (.*)")


def _located(message: str, schema: pa.Schema, rows: int, format: str) -> str:
    """Arrow's message with the column's name and where the failing block starts."""
    found = _CSV_COLUMN.match(message)
    if found and int(found.group(1)) < len(schema):
        column = schema.names[int(found.group(1))]
        # +2: data rows are 1-based and follow the header line.
        return f"column {column!r}: {found.group(2)} (in the rows from row {rows + 2})"
    if format == "csv":
        return message
    return f"{message} (after row {rows})"


def first_line(exc: BaseException) -> str:
    """An Arrow error's first line (no C++ context), short enough for a client's message."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
