"""Small generated inputs for the catch-up, run-history and Airflow tests."""
from __future__ import annotations

import json
from datetime import date, datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from finfeat.jobs.delta import read_table
from finfeat.jobs.generate import generate

#: Short windows keep the days a change reaches few: reach = window + delay = 2 days.
SHORT_SPEC = """\
version: 1
features:
  - {entity: card, agg: count, window: 1d}
  - {entity: card, agg: sum, field: amount, window: 1d}
  - {entity: merchant, agg: count, window: 1d}
  - {entity: merchant, agg: fraud_rate, window: 1d, delay: 1d}
  - {entity: event, agg: hour_of_day}
"""
FIRST_DAY = date(2024, 3, 1)
TOKEN_KEY = "catch-up-test-key-0123456789"


def day(n: int) -> date:
    """Day ``n`` of the generated data, 1-based (day(1) is 2024-03-01)."""
    return date.fromordinal(FIRST_DAY.toordinal() + n - 1)


def generated_by_halves(folder: Path, *, events: int = 2000, days: int = 10) -> tuple[Path, Path]:
    """Seeded events of ``days`` days in two Parquet files: the first half of the days, the rest."""
    whole = folder / "all.parquet"
    generate(out=whole, events=events, seed=11, start=FIRST_DAY.isoformat(), days=days, cards=60, merchants=32,
             fraud_rate=0.03)
    table = pq.read_table(whole)
    whole.unlink()
    split = datetime.combine(day(days // 2 + 1), datetime.min.time(), tzinfo=timezone.utc)
    early = pc.less(table.column("event_time"), pa.scalar(split, table.schema.field("event_time").type))
    a, b = folder / "a.parquet", folder / "b.parquet"
    pq.write_table(table.filter(early), a)
    pq.write_table(table.filter(pc.invert(early)), b)
    return a, b


def features_sorted(warehouse: Path) -> pa.Table:
    table = read_table(warehouse / "features")
    return table.sort_by([("txn_id", "ascending")])


def plan_days(plan_json: Path) -> list[date]:
    return [date.fromisoformat(d) for d in json.loads(plan_json.read_text())["plan"]["days"]]
