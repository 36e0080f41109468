"""The same events through the bounded path and through TestStream give equal feature rows."""
from __future__ import annotations

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing import test_pipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that
from apache_beam.utils.timestamp import Timestamp

from finfeat.pipelines.features import ComputeFeatures
from finfeat.schemas.events import EVENT_SCHEMA
from finfeat.transforms.spec import FeatureSpec
from tests.oracle import compare_features, oracle_features

SPEC = FeatureSpec.default()
BOUND_US = 600 * 1_000_000  # bound on out-of-orderness: 10 minutes


@pytest.fixture(scope="module")
def events(sparkov_events: pa.Table) -> pa.Table:
    # two busy days of the public test file: plenty of repeat cards and merchants
    ev = sparkov_events.filter(pc.greater_equal(sparkov_events.column("event_time"),
                                                pa.scalar(1592697600_000000, pa.timestamp("us", tz="UTC"))))
    return ev.sort_by([("event_time", "ascending"), ("txn_id", "ascending")]).slice(0, 1200).select(EVENT_SCHEMA.names)


def _arrival_order(events: pa.Table, *, shuffled: bool) -> list[int]:
    if not shuffled:
        return list(range(events.num_rows))
    # delay each event by up to the bound, then deliver in delayed order: disorder within the bound
    t = events.column("event_time").cast(pa.int64()).to_numpy()
    delay = np.random.default_rng(5).integers(0, BOUND_US, size=len(t))
    return list(np.lexsort((np.arange(len(t)), t + delay)))


def _stream(events: pa.Table, order: list[int]) -> TestStream:
    t = events.column("event_time").cast(pa.int64()).to_numpy()
    stream = TestStream()
    max_seen = None
    for start in range(0, len(order), 25):
        chunk = order[start:start + 25]
        stream.add_elements([events.take(pa.array(chunk))])
        max_seen = max([max_seen or 0, *(int(t[i]) for i in chunk)])
        stream.advance_watermark_to(Timestamp(micros=max_seen - BOUND_US))
    # Beam's BundleBasedDirectRunner fires no event-time timer on a jump straight to +infinity,
    # so the stream ends with a finite step past the last event first (a real source's end does).
    return stream.advance_watermark_to(Timestamp(micros=int(t.max()) + 1_000_000)).advance_watermark_to_infinity()


@pytest.mark.parametrize("shuffled", [False, True], ids=["in_order", "shuffled_within_bound"])
def test_stream_equals_batch(events: pa.Table, shuffled: bool) -> None:
    batch = oracle_features(events)
    from finfeat.transforms.features import compute_features

    assert compare_features(compute_features(events, SPEC), batch) == []
    order = _arrival_order(events, shuffled=shuffled)
    assert shuffled == (order != sorted(order))

    def check(tables: list[pa.Table]) -> None:
        streamed = pa.concat_tables(tables)
        assert streamed.num_rows == events.num_rows
        problems = compare_features(streamed.select(["txn_id", *SPEC.names]), batch)
        assert problems == [], problems[:5]

    options = PipelineOptions(["--runner=BundleBasedDirectRunner"])
    options.view_as(StandardOptions).streaming = True
    with test_pipeline.TestPipeline(options=options) as p:
        out = p | _stream(events, order) | ComputeFeatures(spec=SPEC)
        assert_that(out["features"], check, label="EqualsBatch")
        assert_that(out["late"], lambda late: None if not late else pytest.fail(f"late: {late[:3]}"),
                    label="NothingLate")


def test_event_behind_the_emitted_horizon_is_late(events: pa.Table) -> None:
    first, second = events.slice(0, 1), events.slice(1, 1)
    card = first.column("card_token")[0].as_py()
    late = second.set_column(EVENT_SCHEMA.names.index("card_token"), "card_token", pa.array([card]))
    t0 = first.column("event_time").cast(pa.int64())[0].as_py()
    late = late.set_column(EVENT_SCHEMA.names.index("event_time"), "event_time",
                           pa.array([t0 - 3_600_000_000], pa.int64()).cast(EVENT_SCHEMA.field("event_time").type))
    stream = (TestStream().add_elements([first]).advance_watermark_to(Timestamp(micros=t0 + 10_000_000))
              .add_elements([late]).advance_watermark_to(Timestamp(micros=t0 + 20_000_000))
              .advance_watermark_to_infinity())
    options = PipelineOptions(["--runner=BundleBasedDirectRunner"])
    options.view_as(StandardOptions).streaming = True
    with test_pipeline.TestPipeline(options=options) as p:
        out = p | stream | ComputeFeatures(spec=SPEC)
        late_id = late.column("txn_id")[0].as_py()
        assert_that(out["late"] | beam.Map(lambda r: r["txn_id"]), lambda got: _eq(got, [late_id]), label="Late")
        assert_that(out["features"] | beam.Map(lambda t: t.column("txn_id")[0].as_py()),
                    lambda got: _eq(got, [first.column("txn_id")[0].as_py()]), label="OnlyOnTime")


def _eq(got: list, want: list) -> None:
    assert sorted(got) == sorted(want)
