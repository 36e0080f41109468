"""The composite transforms on Beam's local runner, asserted with assert_that."""
from __future__ import annotations

import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from finfeat.pipelines.features import BuildFeatures, ComputeFeatures
from finfeat.schemas.mapping import Mapping
from finfeat.transforms.spec import FeatureSpec
from tests.conftest import RUNNER, SPARKOV_TEST, TOKEN_KEY
from tests.oracle import compare_features, oracle_features

SPEC = FeatureSpec.default()


def _rows(tables: list[pa.Table]) -> list[dict]:
    return pa.concat_tables(tables).to_pylist() if tables else []


def test_compute_features_on_split_batches_matches_the_oracle(sparkov_events: pa.Table) -> None:
    expected = oracle_features(sparkov_events)
    batches = [sparkov_events.slice(i, 4000) for i in range(0, sparkov_events.num_rows, 4000)]

    def check(tables: list[pa.Table]) -> None:
        ours = pa.concat_tables(tables)
        assert ours.num_rows == sparkov_events.num_rows
        problems = compare_features(ours.select(["txn_id", *SPEC.names]), expected)
        assert problems == [], problems[:5]

    with test_pipeline.TestPipeline(options=PipelineOptions([f"--runner={RUNNER}"])) as p:
        features = (p | beam.Create(batches, reshuffle=False)
                    | ComputeFeatures(spec=SPEC, buckets=3))["features"]
        assert_that(features | beam.combiners.ToList(), lambda lists: check(lists[0]), label="FeaturesMatchOracle")


def test_build_features_outputs_dead_letters_and_stats() -> None:
    mapping = Mapping.load("sparkov")
    import csv
    from finfeat.jobs.sources import read_file
    from finfeat.transforms.parse import CardTokenizer

    tok = CardTokenizer(TOKEN_KEY)
    raw = [(SPARKOV_TEST.name, t, u) for t, u in read_file(SPARKOV_TEST, mapping, tok, run_id="r", recorded_at_us=0)]
    first = raw[0][1]
    broken = first.slice(0, 3).set_column(first.column_names.index("amt"), "amt",
                                           pa.array(["-1.00", "x", "1.001"]))
    dup = first.slice(10, 1)
    raw.append(("extra", pa.concat_tables([broken, dup]), raw[0][2].slice(0, 0)))
    with open(SPARKOV_TEST, newline="") as fh:
        total = sum(1 for _ in csv.reader(fh)) - 1

    with test_pipeline.TestPipeline(options=PipelineOptions([f"--runner={RUNNER}"])) as p:
        out = p | beam.Create(raw, reshuffle=False) | BuildFeatures(
            mapping=mapping, spec=SPEC, token_key=TOKEN_KEY, run_id="r", recorded_at_us=0, buckets=2)
        reasons = out["dead_letters"] | beam.FlatMap(lambda t: t.column("reason").to_pylist())
        assert_that(reasons, equal_to(["negative_amount", "wrong_type", "amount_precision", "duplicate_txn_id"]),
                    label="DeadLetterReasons")
        stats = out["stats"] | beam.CombinePerKey(sum)
        assert_that(stats | beam.Filter(lambda kv: kv[0] in {"rows_read", "events_accepted", "features_out"}),
                    equal_to([("rows_read", total + 4), ("events_accepted", total), ("features_out", total)]),
                    label="Reconciles")


@pytest.mark.parametrize("hashing", ["real", "colliding"])
def test_join_on_txn_id_matches_the_hash_join(monkeypatch: pytest.MonkeyPatch, hashing: str) -> None:
    """The merchant-feature join of the assembly gives what Arrow's join on the strings gives,
    in the left table's order, also when ids share a hash (then the string join decides)."""
    import numpy as np

    from finfeat.pipelines import features as fp

    if hashing == "colliding":
        monkeypatch.setattr(fp, "stable_hash", lambda ids: np.array([len(x) % 3 for x in ids.to_pylist()],
                                                                    dtype=np.uint64))
    rows = pa.table({"txn_id": ["t1", "t22", "t333", "t4", "t55"], "v": [1, 2, 3, 4, 5]})
    right = pa.table({"txn_id": ["t55", "t4", "t1", "t333", "x9"], "m": [50, 40, 10, 30, 90]})
    got = fp._join_on_txn_id(rows, right)
    want = rows.join(right, keys="txn_id", join_type="left outer")
    assert sorted(got.to_pylist(), key=str) == sorted(want.to_pylist(), key=str)
    assert {r["txn_id"]: r["m"] for r in got.to_pylist()} == {"t1": 10, "t22": None, "t333": 30, "t4": 40, "t55": 50}
    if hashing == "real":
        assert got.column("txn_id").to_pylist() == rows.column("txn_id").to_pylist()
