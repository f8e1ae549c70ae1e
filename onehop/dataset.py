"""A seeded credit-default table in the shape of the UCI "default of credit card clients"
data: numeric amounts, categorical codes (sex, education, marriage, repayment status) and a
binary `default` target drawn from a latent risk score, so models have signal to learn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

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
