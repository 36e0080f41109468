"""The backfill materializes the online store; a lookup then continues exactly where Delta ends."""
from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import pyarrow as pa

from finfeat.jobs.backfill import BackfillConfig, run_backfill
from finfeat.jobs.delta import read_table
from finfeat.jobs.online import open_store
from finfeat.jobs.online.lookup import Candidate, lookup
from finfeat.schemas.mapping import Mapping
from finfeat.transforms.features import compute_features
from finfeat.transforms.spec import FeatureSpec
from tests.conftest import RUNNER, SPARKOV_TEST, TOKEN_KEY, load_events

SPEC = FeatureSpec.default()


def test_lookup_after_backfill_equals_batch_features_of_the_next_transaction(tmp_path: Path) -> None:
    events, _ = load_events(SPARKOV_TEST, "sparkov")
    events = events.drop_columns(["_source", "_source_row"]).sort_by([("event_time", "ascending")])
    history, nxt = events.slice(0, events.num_rows - 200), events.slice(events.num_rows - 200)
    src = tmp_path / "history.parquet"
    import pyarrow.parquet as pq

    pq.write_table(history, src)
    store_url = f"sqlite:{tmp_path / 'online.db'}"
    report = run_backfill(BackfillConfig(
        inputs=[src], mapping=Mapping.load("canonical"), warehouse=tmp_path / "wh", start=date(2020, 6, 21),
        end=date(2020, 6, 22), token_key=TOKEN_KEY, beam_args=[f"--runner={RUNNER}"], buckets=2,
        online_store=store_url))
    assert report["online_store"]["store"] == store_url
    assert read_table(tmp_path / "wh" / "features").num_rows == history.num_rows
    # the next transactions, scored before they happen: exactly their batch rows
    expected = {r["txn_id"]: r for r in compute_features(events, SPEC).to_pylist()}
    store = open_store(store_url, SPEC, create=False)
    checked = 0
    try:
        for i, row in enumerate(nxt.slice(0, 40).to_pylist()):
            t = row["event_time"]
            at_us = int(t.timestamp()) * 1_000_000 + t.microsecond
            cand = Candidate(card_token=row["card_token"], merchant_id=row["merchant_id"],
                             amount_minor=row["amount_minor"], at_us=at_us, currency=row["currency"],
                             merchant_lat=row["merchant_lat"], merchant_lon=row["merchant_lon"], txn_id=row["txn_id"])
            try:
                got = lookup(store, SPEC, cand, on_missing="empty")
            except Exception as exc:  # a candidate before the state's as-of is refused, never guessed
                assert "before" in str(exc).lower(), exc
                store.write(nxt.slice(i, 1))
                continue
            want = expected[row["txn_id"]]
            assert {k: got.features[k] for k in SPEC.names} == {k: want[k] for k in SPEC.names}, row["txn_id"]
            checked += 1
            store.write(nxt.slice(i, 1))  # then the transaction happens, as the stream would write it
    finally:
        store.close()
    assert checked >= 30
