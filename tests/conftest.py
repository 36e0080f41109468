"""Shared fixtures: the bundled public data, a tokenizer, canonical events, a runner."""
from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pyarrow as pa
import pytest

from finfeat.jobs.sources import read_file
from finfeat.schemas.mapping import Mapping
from finfeat.schemas.dead_letters import DEAD_LETTER_SCHEMA
from finfeat.transforms.parse import PARSED_SCHEMA, CardTokenizer, parse_batch

REPO = Path(__file__).resolve().parents[1]
SPARKOV = REPO / "data" / "sparkov"
SPARKOV_TRAIN = SPARKOV / "fraudTrain_rows_0-5038_and_10753-24366.csv"
SPARKOV_TEST = SPARKOV / "fraudTest_rows_0-5115.csv"
TOKEN_KEY = b"test-key-0123456789abcdef"
#: Tests name the runner explicitly (the default DirectRunner would first try Prism).
RUNNER = "FnApiRunner"


def ci() -> bool:
    """Whether CI is set (``.ci/run`` sets it): then a missing prerequisite fails a test."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(message: str) -> NoReturn:
    """Skip a test whose prerequisite is missing, or fail it when CI is set (CI runs every test)."""
    if ci():
        pytest.fail(message + " (CI is set, so this fails instead of skipping)")
    pytest.skip(message)


def output_bytes(root: Path) -> bytes:
    """Every byte written under ``root``, Parquet files also decoded (their pages are compressed)."""
    import json

    import pyarrow.parquet as pq

    parts = []
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        parts.append(p.read_bytes())
        if p.suffix == ".parquet":
            rows = pq.read_table(p).to_pylist()
            parts += [json.dumps(rows, default=str, ensure_ascii=False).encode(), json.dumps(rows, default=str).encode()]
    return b"\n".join(parts)


@pytest.fixture(scope="session")
def token_key() -> bytes:
    return TOKEN_KEY


def load_events(path: Path, mapping: Mapping | str) -> tuple[pa.Table, pa.Table]:
    """Canonical events and dead letters of one file, through the production parser."""
    mapping = Mapping.load(mapping) if isinstance(mapping, str) else mapping
    tok = CardTokenizer(TOKEN_KEY)
    events, dead = [PARSED_SCHEMA.empty_table()], [DEAD_LETTER_SCHEMA.empty_table()]
    for raw, unreadable in read_file(path, mapping, tok, run_id="test", recorded_at_us=0):
        ev, dl = parse_batch(raw, mapping=mapping, tokenizer=tok, source=path.name, run_id="test",
                             recorded_at_us=0)
        events.append(ev)
        dead += [dl, unreadable]
    return pa.concat_tables(events), pa.concat_tables(dead)


@pytest.fixture(scope="session")
def sparkov_events() -> pa.Table:
    train, _ = load_events(SPARKOV_TRAIN, "sparkov")
    test, _ = load_events(SPARKOV_TEST, "sparkov")
    return pa.concat_tables([train, test]).drop_columns(["_source", "_source_row"])
