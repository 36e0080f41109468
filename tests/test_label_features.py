"""Label-aware features (merchant fraud rate with a label delay) against a SQL oracle."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from finfeat.transforms.features import compute_entity_features
from finfeat.transforms.spec import FeatureDef, FeatureSpec, SpecError
from tests.oracle import oracle_fraud_rate

DAY = 86_400_000_000


def _check(events: pa.Table, f: FeatureDef) -> int:
    ours = compute_entity_features(events, [f], "merchant")[f.name].to_pylist()
    ids = events.column("txn_id").to_pylist()
    want = dict(zip(*oracle_fraud_rate(events, window_us=f.window_us, delay_us=f.delay_us).to_pydict().values()))
    mismatches = [(i, a, want[i]) for i, a in zip(ids, ours)
                  if (a is None) != (want[i] is None) or (a is not None and abs(a - want[i]) > 1e-12)]
    assert mismatches == [], mismatches[:5]
    return sum(v is not None and v > 0 for v in ours)


@pytest.mark.parametrize("window", ["1d", "7d", "30d"])
def test_fraud_rate_matches_the_oracle_on_public_data(sparkov_events: pa.Table, window: str) -> None:
    f = FeatureDef(entity="merchant", agg="fraud_rate", window=window, delay="2d")
    assert f.name == f"merchant_fraud_rate_{window}"
    assert _check(sparkov_events, f) > 0, "some merchants must show known fraud"


def test_label_times_from_a_labels_source_are_honoured(sparkov_events: pa.Table) -> None:
    rng = np.random.default_rng(1)
    t = sparkov_events.column("event_time").cast(pa.int64()).to_numpy()
    fraud = sparkov_events.column("is_fraud").fill_null(False).to_numpy(zero_copy_only=False)
    # chargebacks land 0-20 days after the transaction; some rows have no label time at all
    label = t + rng.integers(0, 20 * DAY, size=len(t))
    label_time = pa.array(label, pa.int64(), mask=~fraud | (rng.random(len(t)) < 0.2)).cast(
        pa.timestamp("us", tz="UTC"))
    events = sparkov_events.append_column("label_time", label_time)
    f = FeatureDef(entity="merchant", agg="fraud_rate", window="7d", delay="1d")
    assert _check(events, f) > 0


def test_a_label_known_only_after_t_does_not_count() -> None:
    from finfeat.schemas.events import TransactionEvent, events_to_table

    rows = [TransactionEvent("a", "c1", "m", None, 100, "USD", 0, "pos", is_fraud=True),
            TransactionEvent("b", "c2", "m", None, 100, "USD", 1 * DAY, "pos", is_fraud=False),
            TransactionEvent("c", "c3", "m", None, 100, "USD", 3 * DAY, "pos"),
            TransactionEvent("d", "c4", "m", None, 100, "USD", 9 * DAY, "pos")]
    table = events_to_table(rows)
    label = pa.array([5 * DAY, None, None, None], pa.int64()).cast(pa.timestamp("us", tz="UTC"))
    table = table.append_column("label_time", label)
    f = FeatureDef(entity="merchant", agg="fraud_rate", window="7d", delay="2d")
    got = compute_entity_features(table, [f], "merchant")[f.name].to_pylist()
    # a, b: nothing at least 2 days old -> null; c (day 3): a and b in window, a's label (day 5) not yet known
    # -> 0/2; d (day 9): window (0, 7] days holds b and c only (a at day 0 is out) -> 0/2
    assert got == [None, None, 0.0, 0.0]
    f1 = FeatureDef(entity="merchant", agg="fraud_rate", window="7d", delay="1d")
    table2 = table.set_column(table.column_names.index("label_time"), "label_time",
                              pa.array([2 * DAY, None, None, None], pa.int64()).cast(pa.timestamp("us", tz="UTC")))
    got = compute_entity_features(table2, [f1], "merchant")[f1.name].to_pylist()
    # b (day 1): window (-7, 0] holds a, whose label (day 2) is not known at day 1 -> 0/1;
    # c (day 3): window (-5, 2] days holds a, b; a's label (day 2) < day 3 -> 1/2; d: (1, 8] holds c -> 0/1
    assert got == [None, 0.0, 0.5, 0.0]


def test_delay_must_be_positive_and_only_for_label_features() -> None:
    with pytest.raises(SpecError, match="positive delay"):
        FeatureSpec.from_dict({"features": [{"entity": "merchant", "agg": "fraud_rate", "window": "7d",
                                             "delay": "0d"}]})
    with pytest.raises(SpecError, match="takes no delay"):
        FeatureSpec.from_dict({"features": [{"entity": "card", "agg": "count", "window": "7d", "delay": "1d"}]})
