"""finfeat backfill --catch-up: the plan names exactly the missing and stale days, and running it
leaves the feature table equal to a full recompute."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from finfeat.jobs.cli import main
from tests.catchup_fixtures import SHORT_SPEC, TOKEN_KEY, day, features_sorted, generated_by_halves, plan_days
from tests.conftest import RUNNER


@pytest.fixture()
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINFEAT_TOKEN_KEY", TOKEN_KEY)


def _catch_up(inputs: list[Path], warehouse: Path, spec: Path | None, plan: Path, *, end: str,
              labels: list[Path] = (), dry_run: bool = False) -> int:
    args = ["backfill", "--catch-up", *[a for p in inputs for a in ("--input", str(p))], "--mapping", "generated",
            "--warehouse", str(warehouse), "--end", end, "--plan-json", str(plan), f"--runner={RUNNER}",
            *[a for p in labels for a in ("--labels", str(p))]]
    if spec is not None:
        args += ["--feature-spec", str(spec)]
    return main(args + (["--dry-run"] if dry_run else []))


def test_plan_names_exactly_the_missing_and_stale_days_and_heals_them(tmp_path: Path, env: None) -> None:
    a, b = generated_by_halves(tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text(SHORT_SPEC)
    wh = tmp_path / "wh"

    # 1. an empty warehouse: every day up to the end is missing
    assert _catch_up([a, b], wh, spec, tmp_path / "p1.json", end=day(8).isoformat()) == 0
    assert plan_days(tmp_path / "p1.json") == [day(i) for i in range(1, 9)]

    # 2. a late correction of one event of day 2 (file a rewritten), chargebacks known on day 6 for
    #    transactions of day 5 (a new labels feed), and two more days wanted (9, 10)
    table = pq.read_table(a)
    on_day2 = pc.equal(pc.cast(table.column("event_time"), pa.date32()), pa.scalar(day(2)))
    row = pc.index(on_day2, True).as_py()
    amounts = table.column("amount_minor").to_pylist()
    amounts[row] += 12_345
    pq.write_table(table.set_column(table.schema.get_field_index("amount_minor"), "amount_minor",
                                    pa.array(amounts, pa.int64())), a)
    events_b = pq.read_table(b)
    day5 = pq.read_table(a).filter(pc.equal(pc.cast(pq.read_table(a).column("event_time"), pa.date32()),
                                            pa.scalar(day(5))))
    genuine = day5.filter(pc.invert(day5.column("is_fraud"))).column("txn_id").to_pylist()[:4]
    assert genuine and events_b.num_rows
    labels = tmp_path / "chargebacks.csv"
    known = datetime(day(6).year, day(6).month, day(6).day, 12, tzinfo=timezone.utc).isoformat()
    labels.write_text("txn_id,is_fraud,label_time\n" + "".join(f"{t},1,{known}\n" for t in genuine))

    plan = tmp_path / "p2.json"
    assert _catch_up([a, b], wh, spec, plan, end=day(10).isoformat(), labels=[labels], dry_run=True) == 0
    # changed input on day 2 reaches 2 days (window 1d + delay 1d); the labels are of transactions of
    # day 5 (their rows carry the label) and known on day 6, which reaches 6..8 (fraud rates)
    want = [day(2), day(3), day(4), day(5), day(6), day(7), day(8), day(9), day(10)]
    assert plan_days(plan) == want
    reasons = json.loads(plan.read_text())["plan"]["days"]
    assert reasons[day(2).isoformat()] == [f"input of {day(2)} changed"]
    assert reasons[day(7).isoformat()] == [f"labels of {day(6)} arrived or changed"]
    assert reasons[day(5).isoformat()] == ["labels of its transactions arrived or changed"]
    assert reasons[day(9).isoformat()] == ["never written"]
    assert json.loads(plan.read_text())["plan"]["ranges"] == [[day(2).isoformat(), day(10).isoformat()]]
    assert json.loads(plan.read_text())["runs"] == []  # a dry run runs nothing

    # 3. run it: the table equals a full recompute of days 1..10 from the same inputs and labels
    assert _catch_up([a, b], wh, spec, plan, end=day(10).isoformat(), labels=[labels]) == 0
    assert [r["range"] for r in json.loads(plan.read_text())["runs"]] == [f"{day(2)}..{day(10)}"]
    full = tmp_path / "full"
    assert main(["backfill", "--input", str(a), "--input", str(b), "--mapping", "generated", "--warehouse",
                 str(full), "--feature-spec", str(spec), "--labels", str(labels), "--start", day(1).isoformat(),
                 "--end", day(10).isoformat(), f"--runner={RUNNER}"]) == 0
    got, expected = features_sorted(wh), features_sorted(full)
    assert got.num_rows == expected.num_rows > 0
    assert got.equals(expected.select(got.column_names))

    # 4. idempotent: nothing is left to do
    again = tmp_path / "p3.json"
    assert _catch_up([a, b], wh, spec, again, end=day(10).isoformat(), labels=[labels], dry_run=True) == 0
    assert plan_days(again) == []

    # 5. another spec: every day was computed with another spec hash
    other = tmp_path / "p4.json"
    assert _catch_up([a, b], wh, None, other, end=day(10).isoformat(), labels=[labels], dry_run=True) == 0
    assert plan_days(other) == [day(i) for i in range(1, 11)]
    assert all(r[0].startswith("spec ") for r in json.loads(other.read_text())["plan"]["days"].values())


def test_catch_up_flags_fail_fast(tmp_path: Path, env: None, capsys: pytest.CaptureFixture[str]) -> None:
    a, _ = generated_by_halves(tmp_path, events=200, days=4)
    assert main(["backfill", "--input", str(a), "--mapping", "generated", "--warehouse", str(tmp_path / "wh"),
                 "--dry-run", "--start", day(1).isoformat(), "--end", day(2).isoformat()]) == 2
    assert "--dry-run and --plan-json go with --catch-up" in capsys.readouterr().err
    assert main(["backfill", "--input", str(a), "--mapping", "generated", "--warehouse", str(tmp_path / "wh")]) == 2
    assert "--start and --end are required (or pass --catch-up" in capsys.readouterr().err
    assert main(["backfill", "--catch-up", "--input", str(a), "--mapping", "generated", "--warehouse",
                 str(tmp_path / "wh"), "--start", day(3).isoformat(), "--end", day(2).isoformat()]) == 2
    assert f"--end {day(2)} is before --start {day(3)}" in capsys.readouterr().err


def test_a_late_event_reaches_the_next_event_of_a_dormant_card(tmp_path: Path, env: None) -> None:
    """seconds_since_last and geo velocity look back however far: a late event on day 2 changes the
    features of its card's next event on day 40, beyond the 30-day windows."""
    from finfeat.jobs.generate import generate
    from tests.catchup_fixtures import FIRST_DAY

    whole = tmp_path / "gen.parquet"
    generate(out=whole, events=1500, seed=13, start=FIRST_DAY.isoformat(), days=45, cards=20, merchants=32)
    table = pq.read_table(whole)
    # every generated card transacts at least every few days (so only the dormant card reaches far)
    times = table.column("event_time").cast(pa.int64()).to_numpy()
    for card in set(table.column("card_number").to_pylist()):
        t = sorted(times[pc.equal(table.column("card_number"), card).to_numpy(zero_copy_only=False)])
        assert max((b - a for a, b in zip(t, t[1:])), default=0) < 20 * 86_400_000_000

    def dormant(rows: list[int], when: list[datetime], ids: list[str]) -> pa.Table:
        picked = table.take(pa.array(rows))
        picked = picked.set_column(picked.schema.get_field_index("card_number"), "card_number",
                                   pa.array(["4000000000000002"] * len(rows)))
        picked = picked.set_column(picked.schema.get_field_index("txn_id"), "txn_id", pa.array(ids))
        picked = picked.set_column(picked.schema.get_field_index("event_time"), "event_time",
                                   pa.array(when, table.schema.field("event_time").type))
        return picked.cast(table.schema)

    def at(n: int, hour: int) -> datetime:
        return datetime(day(n).year, day(n).month, day(n).day, hour, tzinfo=timezone.utc)

    inputs = tmp_path / "in"
    inputs.mkdir()
    pq.write_table(pa.concat_tables([table, dormant([0, 1], [at(2, 9), at(40, 9)], ["dorm-1", "dorm-2"])]),
                   inputs / "events.parquet")
    wh = tmp_path / "wh"
    assert _catch_up([inputs], wh, None, tmp_path / "p1.json", end=day(45).isoformat()) == 0
    assert plan_days(tmp_path / "p1.json") == [day(i) for i in range(1, 46)]

    pq.write_table(dormant([2], [at(2, 18)], ["dorm-late"]), inputs / "late.parquet")
    plan = tmp_path / "p2.json"
    assert _catch_up([inputs], wh, None, plan, end=day(45).isoformat(), dry_run=True) == 0
    # the default spec reaches 30 days; the dormant card's next event is on day 40
    assert plan_days(plan) == [day(i) for i in range(2, 33)] + [day(40)]
    assert json.loads(plan.read_text())["plan"]["days"][day(40).isoformat()] == [
        f"input of {day(2)} changed (an entity's next event)"]

    assert _catch_up([inputs], wh, None, plan, end=day(45).isoformat()) == 0
    full = tmp_path / "full"
    assert main(["backfill", "--input", str(inputs), "--mapping", "generated", "--warehouse", str(full),
                 "--start", day(1).isoformat(), "--end", day(45).isoformat(), f"--runner={RUNNER}"]) == 0
    got, expected = features_sorted(wh), features_sorted(full)
    assert got.num_rows == expected.num_rows > 0
    assert got.equals(expected.select(got.column_names))
