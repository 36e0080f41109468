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
