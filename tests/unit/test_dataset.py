from onehop.dataset import TARGET, credit_default


def test_credit_default_is_seeded_and_shaped_like_the_uci_table() -> None:
    a, b = credit_default(5_000, seed=3), credit_default(5_000, seed=3)
    assert a.equals(b)
    assert not a.equals(credit_default(5_000, seed=4))
    assert a.num_columns == 24 and a.column_names[-1] == TARGET
    rate = a[TARGET].to_numpy().mean()
    assert 0.15 < rate < 0.30
    assert set(a["EDUCATION"].to_numpy()) <= {1, 2, 3, 4}
