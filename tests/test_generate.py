"""Tests of the synthetic transaction generator (real files under ``tmp_path``)."""
from __future__ import annotations

import json
import math
import re
import tracemalloc
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from finfeat.jobs.generate import (
    CATEGORIES,
    FRAUD_PATTERNS,
    GENERATED_SCHEMA,
    GenerateSummary,
    generate,
    luhn_valid,
)

COLUMNS = [
    "txn_id", "card_number", "merchant_id", "merchant_category", "amount_minor", "currency",
    "event_time", "channel", "card_lat", "card_lon", "merchant_lat", "merchant_lon", "is_fraud",
    "fraud_pattern",
]
N = 50_000


@pytest.fixture(scope="module")
def run50k(tmp_path_factory: pytest.TempPathFactory) -> tuple[GenerateSummary, pa.Table]:
    out = tmp_path_factory.mktemp("gen") / "tx.parquet"
    summary = generate(out=out, events=N, seed=11, chunk_size=20_000)
    return summary, pq.read_table(out)


@pytest.fixture(scope="module")
def jsonl50k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "tx.jsonl"
    generate(out=out, events=N, seed=11, chunk_size=20_000)
    return out


def _haversine_km(lat1, lon1, lat2, lon2):  # type: ignore[no-untyped-def]
    p1, p2 = np.radians(lat1), np.radians(lat2)
    a = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(np.radians(lon2 - lon1) / 2) ** 2
    return 2 * 6371.0 * np.arcsin(np.sqrt(a))


# ------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("ext", ["parquet", "jsonl"])
def test_same_seed_same_bytes_and_other_seed_differs(tmp_path: Path, ext: str) -> None:
    kwargs = dict(events=12_345, days=10, chunk_size=4_000)
    a = generate(out=tmp_path / f"a.{ext}", seed=3, **kwargs)
    generate(out=tmp_path / f"b.{ext}", seed=3, **kwargs)
    generate(out=tmp_path / f"c.{ext}", seed=4, **kwargs)
    bytes_a = (tmp_path / f"a.{ext}").read_bytes()
    assert bytes_a == (tmp_path / f"b.{ext}").read_bytes()
    assert bytes_a != (tmp_path / f"c.{ext}").read_bytes()
    assert a.path == str(tmp_path / f"a.{ext}")
    assert not list(tmp_path.glob("*.partial"))


def test_jsonl_holds_the_same_rows_as_parquet(run50k: tuple[GenerateSummary, pa.Table], jsonl50k: Path) -> None:
    _, table = run50k
    lines = jsonl50k.read_text().splitlines()
    assert len(lines) == N
    rows = table.to_pylist()
    for i in (0, 1, 777, N // 2, N - 1, *range(100, 50_000, 4_999)):
        rec = json.loads(lines[i])
        assert list(rec) == COLUMNS
        expected = dict(rows[i])
        ts = expected.pop("event_time")
        assert rec.pop("event_time") == ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        assert rec == expected
    # fraud rows serialize their label too
    fraud_idx = np.flatnonzero(table.column("is_fraud").to_numpy(zero_copy_only=False))
    rec = json.loads(lines[int(fraud_idx[0])])
    assert rec["is_fraud"] is True and rec["fraud_pattern"] in FRAUD_PATTERNS


def test_jsonl_format(jsonl50k: Path) -> None:
    iso = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
    prev = ""
    nulls = 0
    with jsonl50k.open() as fh:
        for i, line in enumerate(fh):
            if i % 7:
                continue
            rec = json.loads(line)
            assert iso.match(rec["event_time"])
            assert type(rec["amount_minor"]) is int and rec["amount_minor"] > 0
            assert rec["event_time"] >= prev  # fixed-width UTC text sorts like time
            prev = rec["event_time"]
            nulls += rec["merchant_lat"] is None
    assert nulls > 0


# ------------------------------------------------------------------------ shape and types


@pytest.mark.parametrize("events", [0, 1, 7, 999, 20_001])
def test_exact_row_count(tmp_path: Path, events: int) -> None:
    out = tmp_path / "x.parquet"
    s = generate(out=out, events=events, chunk_size=5_000, fraud_rate=0.02)
    assert s.events == events
    assert pq.read_metadata(out).num_rows == events
    assert pq.read_schema(out).equals(GENERATED_SCHEMA)
    j = tmp_path / "x.jsonl"
    generate(out=j, events=events, chunk_size=5_000, fraud_rate=0.02)
    assert len(j.read_bytes().splitlines()) == events


def test_schema_and_types(run50k: tuple[GenerateSummary, pa.Table]) -> None:
    _, t = run50k
    assert t.column_names == COLUMNS
    assert t.schema.equals(GENERATED_SCHEMA)
    types = {f.name: f.type for f in t.schema}
    assert types["event_time"] == pa.timestamp("us", tz="UTC")
    assert types["amount_minor"] == pa.int64()
    assert types["is_fraud"] == pa.bool_()
    for name in ("card_lat", "card_lon", "merchant_lat", "merchant_lon"):
        assert types[name] == pa.float64()
    for name in ("txn_id", "card_number", "merchant_id", "merchant_category", "currency", "channel",
                 "fraud_pattern"):
        assert types[name] == pa.string()
    for name in COLUMNS:
        if name not in ("merchant_lat", "merchant_lon", "fraud_pattern"):
            assert t.column(name).null_count == 0, name


def test_values(run50k: tuple[GenerateSummary, pa.Table]) -> None:
    _, t = run50k
    df = t.to_pandas()
    assert (df.amount_minor > 0).all()
    assert set(df.merchant_category) <= set(CATEGORIES)
    assert len(set(df.merchant_category)) >= 14
    assert set(df.channel) == {"pos", "online", "atm"}
    net = df.merchant_category.str.endswith("_net")
    assert (df.channel[net] == "online").all() and (df.channel[~net] != "online").all()
    assert (df.amount_minor[df.channel == "atm"] % 2000 == 0).all()
    assert df.merchant_id.str.fullmatch(r"m\d{6}").all()
    assert set(df.currency) == {"USD", "EUR", "GBP"}
    assert (df.currency == "USD").mean() > 0.95
    # foreign currency only at (European) in-person merchants
    foreign = df[df.currency != "USD"]
    assert (foreign.channel != "online").all() and (foreign.merchant_lon > -15).all()
    # locations are stable: one home per card, one place per merchant
    assert (df.groupby("card_number")[["card_lat", "card_lon"]].nunique() == 1).all().all()
    located = df.dropna(subset=["merchant_lat"])
    assert (located.groupby("merchant_id")[["merchant_lat", "merchant_lon"]].nunique() == 1).all().all()
    # only online merchants may hide their location (about half do: see the test below)
    assert df.merchant_lat[df.channel != "online"].notna().all()
    online_merchants = df[df.channel == "online"].groupby("merchant_id").merchant_lat.first()
    assert 0 < online_merchants.isna().mean() < 1
    assert df.merchant_lat.isna().equals(df.merchant_lon.isna())
    # default population sizes
    assert df.card_number.nunique() <= max(100, N // 50)
    assert df.merchant_id.nunique() <= max(50, N // 1000)


def test_about_half_of_online_merchants_hide_their_location(tmp_path: Path) -> None:
    out = tmp_path / "m.parquet"
    generate(out=out, events=20_000, merchants=1_000, seed=2)
    df = pq.read_table(out, columns=["merchant_id", "channel", "merchant_lat"]).to_pandas()
    online_merchants = df[df.channel == "online"].groupby("merchant_id").merchant_lat.first()
    assert len(online_merchants) > 100
    assert 0.35 < online_merchants.isna().mean() < 0.65


def test_unique_txn_ids(run50k: tuple[GenerateSummary, pa.Table]) -> None:
    _, t = run50k
    ids = t.column("txn_id")
    assert pc.count_distinct(ids).as_py() == t.num_rows
    assert pc.all(pc.match_substring_regex(ids, r"^t[0-9a-f]{20}$")).as_py()


def test_luhn_valid_pans(run50k: tuple[GenerateSummary, pa.Table]) -> None:
    _, t = run50k
    pans = set(t.column("card_number").to_pylist())
    assert len(pans) > 500
    for pan in pans:
        assert len(pan) == 16 and pan.isdigit(), pan
        assert pan[0] == "4" or pan[:2] in {"51", "52", "53", "54", "55"}, pan
        assert luhn_valid(pan), pan
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")


# ------------------------------------------------------------------------ labels and patterns


def test_summary_matches_file(run50k: tuple[GenerateSummary, pa.Table]) -> None:
    s, t = run50k
    df = t.to_pandas()
    assert s.events == N
    assert s.frauds == int(df.is_fraud.sum())
    assert s.by_pattern == {p: int((df.fraud_pattern == p).sum()) for p in FRAUD_PATTERNS}
    assert s.start == datetime(2024, 1, 1, tzinfo=timezone.utc)
    assert s.end == datetime(2024, 3, 1, tzinfo=timezone.utc)
    times = df.event_time
    assert times.min() >= s.start and times.max() < s.end
    with pytest.raises(AttributeError):
        s.events = 1  # type: ignore[misc]


@pytest.mark.parametrize("rate", [0.01, 0.05])
def test_fraud_share(tmp_path: Path, rate: float) -> None:
    out = tmp_path / "f.parquet"
    s = generate(out=out, events=40_000, fraud_rate=rate, seed=5)
    fraud = pq.read_table(out, columns=["is_fraud"]).column("is_fraud").to_numpy(zero_copy_only=False)
    assert 0.8 * rate <= fraud.mean() <= 1.2 * rate
    assert s.frauds == int(fraud.sum())


def test_no_fraud(tmp_path: Path) -> None:
    s = generate(out=tmp_path / "n.parquet", events=5_000, fraud_rate=0.0)
    assert s.frauds == 0 and set(s.by_pattern.values()) == {0}


def test_every_pattern_present_and_labels_consistent(run50k: tuple[GenerateSummary, pa.Table]) -> None:
    _, t = run50k
    df = t.to_pandas()
    assert set(df.fraud_pattern.dropna()) == set(FRAUD_PATTERNS)
    assert (df.is_fraud == df.fraud_pattern.notna()).all()
    counts = df.fraud_pattern.value_counts()
    assert (counts >= 20).all()


def test_card_testing_bursts(run50k: tuple[GenerateSummary, pa.Table]) -> None:
    df = run50k[1].to_pandas()
    ct = df[df.fraud_pattern == "card_testing"]
    tiny = ct[ct.amount_minor <= 300]
    assert len(tiny) > 0.8 * len(ct)
    assert (tiny.amount_minor >= 50).all()
    assert (ct.channel == "online").all()
    per_card = tiny.groupby("card_number").agg(n=("txn_id", "size"), m=("merchant_id", "nunique"),
                                               first=("event_time", "min"), last=("event_time", "max"))
    full = per_card.iloc[:-1] if len(per_card) > 1 else per_card  # the last burst may be cut by the budget
    assert (per_card.n <= 40).all() and (full.n >= 1).all()
    assert (per_card.m <= 3).all()
    assert ((per_card["last"] - per_card["first"]).dt.total_seconds() < 3600).all()
    assert (ct.amount_minor > 10_000).any()  # some bursts end with a large purchase


def test_account_takeover_far_from_home(run50k: tuple[GenerateSummary, pa.Table]) -> None:
    df = run50k[1].to_pandas()
    ato = df[df.fraud_pattern == "account_takeover"]
    dist = _haversine_km(ato.card_lat, ato.card_lon, ato.merchant_lat, ato.merchant_lon)
    assert (dist > 500).all()
    span = ato.groupby("card_number").event_time.agg(lambda s: (s.max() - s.min()).total_seconds())
    assert (span <= 6 * 3600).all()
    genuine = df[~df.is_fraud]
    for card, rows in list(ato.groupby("card_number"))[:20]:
        known = set(genuine.merchant_id[genuine.card_number == card])
        assert not known & set(rows.merchant_id)  # new merchants
    assert ato.amount_minor.median() > 3 * genuine.amount_minor.median()


def test_amount_spike_is_large_for_the_card(run50k: tuple[GenerateSummary, pa.Table]) -> None:
    df = run50k[1].to_pandas()
    spikes = df[df.fraud_pattern == "amount_spike"]
    usual = df[~df.is_fraud].groupby("card_number").amount_minor.median()
    ratio = spikes.amount_minor.to_numpy() / usual.reindex(spikes.card_number).to_numpy()
    ratio = ratio[~np.isnan(ratio)]
    assert len(ratio) > 10 and np.median(ratio) > 5


def test_merchant_compromise_cards_visited_a_common_merchant(run50k: tuple[GenerateSummary, pa.Table]) -> None:
    df = run50k[1].to_pandas()
    mc = df[df.fraud_pattern == "merchant_compromise"]
    first_fraud = mc.groupby("card_number").event_time.min()
    genuine = df[~df.is_fraud & df.card_number.isin(first_fraud.index)]
    before = genuine[genuine.event_time < first_fraud.reindex(genuine.card_number).to_numpy()]
    before = before[before.channel != "online"]  # compromises happen at in-person merchants
    seen: Counter[str] = Counter()
    for merchants in before.groupby("card_number").merchant_id.agg(set):
        seen.update(merchants)
    compromised = {m for m, n in seen.items() if n >= 0.2 * len(first_fraud)}
    assert compromised
    covered = before[before.merchant_id.isin(compromised)].card_number.nunique()
    assert covered >= 0.9 * len(first_fraud)
    # the fraud happens elsewhere: online or in another city
    dist = _haversine_km(mc.card_lat, mc.card_lon, mc.merchant_lat, mc.merchant_lon)
    assert ((mc.channel == "online") | (dist > 50)).all()


# ------------------------------------------------------------------------ time


def test_time_order_and_ties(run50k: tuple[GenerateSummary, pa.Table]) -> None:
    _, t = run50k
    us = t.column("event_time").cast(pa.int64()).to_numpy()
    assert (np.diff(us) >= 0).all()
    assert (us % 1_000_000 == 0).all()
    assert (np.diff(us) == 0).sum() > 100


def test_microsecond_resolution(tmp_path: Path) -> None:
    out = tmp_path / "u.parquet"
    generate(out=out, events=5_000, time_resolution="us", start="2024-06-03T12:00:00+02:00", days=3)
    us = pq.read_table(out).column("event_time").cast(pa.int64()).to_numpy()
    assert (np.diff(us) >= 0).all()
    assert (us % 1_000_000 != 0).mean() > 0.99
    start = int(datetime(2024, 6, 3, 10, tzinfo=timezone.utc).timestamp()) * 1_000_000
    assert us.min() >= start and us.max() < start + 3 * 86_400_000_000


def test_diurnal_and_weekly_profile(run50k: tuple[GenerateSummary, pa.Table]) -> None:
    df = run50k[1].to_pandas()
    genuine = df[~df.is_fraud].event_time
    by_hour = genuine.dt.hour.value_counts()
    assert by_hour.loc[[2, 3, 4]].sum() * 3 < by_hour.loc[[12, 18, 19]].sum()
    by_day = genuine.dt.dayofweek.value_counts()
    assert by_day[5] > by_day[6]  # busy Saturday, quiet Sunday


# ------------------------------------------------------------------------ streaming and errors


def test_streams_chunk_by_chunk(tmp_path: Path) -> None:
    events, chunk = 300_000, 50_000
    tracemalloc.start()
    try:
        generate(out=tmp_path / "s.parquet", events=events, chunk_size=chunk, days=30)
        _, chunked_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        generate(out=tmp_path / "w.parquet", events=events, chunk_size=events, days=30)
        _, whole_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    meta = pq.read_metadata(tmp_path / "s.parquet")
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert sum(sizes) == events
    assert meta.num_row_groups >= math.ceil(events / chunk)
    assert max(sizes) <= chunk
    assert pq.read_metadata(tmp_path / "w.parquet").num_row_groups == 1
    assert chunked_peak < 0.6 * whole_peak, (chunked_peak, whole_peak)


@pytest.mark.parametrize("name", ["x.csv", "x.json", "x.parquet.gz", "noext"])
def test_bad_extension(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match=r"\.parquet.*\.jsonl"):
        generate(out=tmp_path / name, events=10)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("kwargs", [
    {"events": -1}, {"events": 10, "days": 0}, {"events": 10, "fraud_rate": 0.9},
    {"events": 10, "time_resolution": "ms"}, {"events": 10, "merchants": 5}, {"events": 10, "chunk_size": 0},
])
def test_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        generate(out=tmp_path / "x.parquet", **kwargs)


def test_progress_bar_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    generate(out=tmp_path / "p.jsonl", events=2_000, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "2.00k/2.00k" in captured.err or "2000/2000" in captured.err
