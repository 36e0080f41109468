"""Every feature against the independent DuckDB oracle (tests/oracle.py), exact or to 1e-9."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from finfeat.transforms.features import compute_features
from finfeat.transforms.spec import FeatureSpec
from tests.conftest import load_events
from tests.oracle import FEATURE_COLUMNS, compare_features, oracle_features

SPEC = FeatureSpec.default()


def test_spec_and_oracle_cover_the_same_features() -> None:
    assert SPEC.names == FEATURE_COLUMNS


def test_sparkov_features_match_the_oracle(sparkov_events: pa.Table) -> None:
    ours = compute_features(sparkov_events, SPEC)
    assert ours.num_rows == sparkov_events.num_rows == 23_769
    assert compare_features(ours, oracle_features(sparkov_events)) == []


@pytest.fixture(scope="module")
def generated_events(tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    from finfeat.jobs.generate import generate

    path = tmp_path_factory.mktemp("gen") / "events.parquet"
    # whole-second times and a small card population: many tied timestamps within a card
    generate(out=path, events=30_000, seed=11, days=20, cards=300, merchants=60, time_resolution="s")
    events, dead = load_events(path, "generated")
    assert dead.num_rows == 0
    return events.drop_columns(["_source", "_source_row"])


def test_generated_data_has_ties_and_matches_the_oracle_in_any_row_order(generated_events: pa.Table) -> None:
    ev = generated_events
    keys = list(zip(ev.column("card_token").to_pylist(), ev.column("event_time").to_pylist()))
    assert len(keys) - len(set(keys)) > 0, "the data must hold same-card, same-time ties"
    oracle = oracle_features(ev)
    shuffled = ev.take(pa.array(np.random.default_rng(3).permutation(ev.num_rows)))
    for table in (ev, shuffled):
        assert compare_features(compute_features(table, SPEC), oracle) == []


def test_hand_built_ties_are_ordered_by_txn_id() -> None:
    from finfeat.schemas.events import TransactionEvent, events_to_table

    t = 1_700_000_000_000_000
    rows = [TransactionEvent(txn_id=i, card_token="c", merchant_id=m, merchant_category=None, amount_minor=a,
                             currency="USD", event_time_us=t, channel="pos")
            for i, m, a in (("b", "m1", 100), ("a", "m2", 300), ("c", "m1", 200))]
    out = compute_features(events_to_table(rows), SPEC).sort_by("txn_id").to_pydict()
    # order within the tie: a < b < c
    assert out["card_count_1h"] == [0, 1, 2]
    assert out["card_sum_amount_1h"] == [0, 300, 400]
    assert out["card_max_amount_24h"] == [None, 300, 300]
    assert out["card_distinct_merchants_24h"] == [0, 1, 2]
    assert out["card_is_new_merchant_30d"] == [True, True, False]
    assert out["card_seconds_since_last"] == [None, 0.0, 0.0]
    assert out["card_geo_velocity_kmh"] == [None, None, None]
    assert out["card_std_amount_30d"][:2] == [None, None]
    assert out["card_std_amount_30d"][2] == pytest.approx(np.std([300, 100], ddof=1))


def test_a_row_elsewhere_never_changes_a_features_last_bit(sparkov_events: pa.Table) -> None:
    """The same window gives bit-identical floats whatever else the table holds (batch partitions,
    streaming state and online lookups hold different neighbours)."""
    from finfeat.schemas.events import TransactionEvent, events_to_table

    base = sparkov_events.slice(0, 3000)
    huge = events_to_table([TransactionEvent("zz-huge", "other-card", "m", None, 10**12, "USD",
                                             1_546_300_800_000_000, "pos")])
    alone = compute_features(base, SPEC)
    beside = compute_features(pa.concat_tables([base, huge.cast(base.schema)]), SPEC).slice(0, base.num_rows)
    for name in ("card_std_amount_30d", "card_amount_zscore_30d", "card_avg_amount_30d"):
        assert alone.column(name).equals(beside.column(name)), name
