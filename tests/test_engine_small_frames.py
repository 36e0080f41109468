"""The engine's small-frame paths (online lookups) give exactly what its general paths give."""
from __future__ import annotations

import numpy as np
import pytest

import finfeat.transforms.features as engine


def _general(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "_SMALL", -1)


@pytest.mark.parametrize("seed", range(40))
def test_range_max_small_equals_sparse_table(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, engine._SMALL + 1))
    values = rng.integers(-10**12, 10**12, n)
    lo = rng.integers(0, n + 1, n)
    hi = np.minimum(n, lo + rng.integers(0, n + 1, n))
    small = engine._range_max(values, lo, hi)
    _general(monkeypatch)
    general = engine._range_max(values, lo, hi)
    assert small.dtype == general.dtype
    np.testing.assert_array_equal(small, general)
    np.testing.assert_array_equal(-engine._range_max(-values, lo, hi), [
        min(values[a:b]) if b > a else 0 for a, b in zip(lo, hi)])


@pytest.mark.parametrize("seed", range(40))
def test_distinct_small_equals_general(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, engine._SMALL + 1))
    groups = np.sort(rng.integers(0, 3, n))
    group = np.unique(groups, return_inverse=True)[1].astype(np.int64)
    t = np.concatenate([np.sort(rng.integers(0, 10**10, int((group == g).sum()))) for g in np.unique(group)])
    columns = {"merchant_id": (rng.integers(0, 6, n).astype(np.int64), None),
               "amount_minor": (rng.integers(0, 10**6, n).astype(np.int64), None)}
    spec = engine.FeatureSpec.default()
    defs = [f for f in spec.for_entity("card") if f.agg in {"distinct", "max"}]
    rows = np.arange(n)
    small = engine.compute_sorted_entity_features(group, t, columns, defs, rows)
    _general(monkeypatch)
    general = engine.compute_sorted_entity_features(group, t, columns, defs, rows)
    for name, (values, valid) in general.items():
        np.testing.assert_array_equal(small[name][1], valid)
        np.testing.assert_array_equal(small[name][0][valid], values[valid])


def _sorted_columns(table, entity: str):  # noqa: ANN001, ANN202
    """The table sorted by (entity, event_time, txn_id) as the array frame takes it (its own sort,
    not the engine's)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from finfeat.transforms.spec import ENTITY_COLUMNS

    key = ENTITY_COLUMNS[entity]
    order = pc.sort_indices(table, sort_keys=[(key, "ascending"), ("event_time", "ascending"),
                                              ("txn_id", "ascending")]).to_numpy()
    s = table.take(pa.array(order))
    group = np.unique(s.column(key).to_numpy(zero_copy_only=False), return_inverse=True)[1].astype(np.int64)
    t = s.column("event_time").cast(pa.int64()).to_numpy()

    def codes(name: str):  # noqa: ANN202
        return np.unique(s.column(name).to_numpy(zero_copy_only=False), return_inverse=True)[1].astype(np.int64)

    def floats(name: str):  # noqa: ANN202
        col = s.column(name)
        return col.fill_null(0.0).to_numpy(), col.is_valid().to_numpy(zero_copy_only=False)

    label = s.column("label_time").cast(pa.int64())
    columns = {"amount_minor": (s.column("amount_minor").to_numpy(), None),
               "merchant_id": (codes("merchant_id"), None), "card_token": (codes("card_token"), None),
               "merchant_lat": floats("merchant_lat"), "merchant_lon": floats("merchant_lon"),
               "is_fraud": (s.column("is_fraud").fill_null(False).to_numpy(zero_copy_only=False), None),
               "label_time": (label.fill_null(0).to_numpy(), label.is_valid().to_numpy(zero_copy_only=False))}
    return order, group, t, columns


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("entity", ["card", "merchant"])
def test_features_at_some_rows_equal_features_at_every_row(seed: int, entity: str) -> None:
    """The stream's flushes, online lookups and point-in-time joins ask for a few rows of a long
    frame: every aggregation evaluated at those rows gives what it gives when every row is asked."""
    import pyarrow as pa

    from finfeat.transforms.spec import FeatureDef

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    day = 86_400_000_000
    coarse = int(rng.choice([1, 3_600_000_000]))  # whole hours make ties
    t = rng.integers(0, 40 * day, n) // coarse * coarse
    fraud = rng.random(n) < 0.3
    located = rng.random(n) < 0.8
    table = pa.table({
        "txn_id": [f"t{i:05d}" for i in rng.permutation(n)],
        "card_token": [f"c{k}" for k in rng.integers(0, 6, n)],
        "merchant_id": [f"m{k}" for k in rng.integers(0, 9, n)],
        "amount_minor": rng.integers(0, 10**7, n),
        "event_time": pa.array(t, pa.int64()).cast(pa.timestamp("us", "UTC")),
        "merchant_lat": pa.array(rng.uniform(-60, 60, n), mask=~located),
        "merchant_lon": pa.array(rng.uniform(-170, 170, n), mask=~located),
        "is_fraud": fraud,
        "label_time": pa.array(t + rng.integers(0, 9 * day, n), pa.int64(),
                               mask=~fraud | (rng.random(n) < 0.3)).cast(pa.timestamp("us", "UTC")),
    })
    spec = engine.FeatureSpec.default()
    other = "merchant" if entity == "card" else "card"
    defs = [FeatureDef(entity=entity, agg=a, field=f, window=w) for a, f, w in [
        ("count", None, "1h"), ("count", None, "7d"), ("sum", "amount", "24h"), ("avg", "amount", "30d"),
        ("max", "amount", "24h"), ("min", "amount", "7d"), ("std", "amount", "30d"), ("zscore", "amount", "7d"),
        ("distinct", other, "24h"), ("distinct", other, "30d"), ("is_new", other, "7d"),
        ("seconds_since_last", None, None), ("geo_velocity", None, None)]]
    defs += [FeatureDef(entity=entity, agg="fraud_rate", window="7d", delay="2d")]
    assert {f.agg for f in defs} >= {f.agg for f in spec.for_entity("card")}
    order, group, t_sorted, columns = _sorted_columns(table, entity)
    full = engine.compute_entity_features(table, defs, entity)
    rows = np.flatnonzero(rng.random(n) < rng.choice([0.05, 0.3, 1.0]))
    if rng.random() < 0.3:
        rows = rng.permutation(rows)  # any order is accepted
    got = engine.compute_sorted_entity_features(group, t_sorted, columns, defs, rows)
    for f in defs:
        want = full[f.name].take(pa.array(order[rows]))
        values, valid = got[f.name]
        assert valid.tolist() == want.is_valid().to_pylist(), f.name
        np.testing.assert_array_equal(values[valid], want.drop_null().to_numpy(zero_copy_only=False), err_msg=f.name)
