"""The stream's message decoder: a poll of well-formed messages is read at once by Arrow's JSON
reader; the parser must make of it exactly what it makes of the message-by-message path's table
(the same events, the same dead letters; a number in a dead letter's payload may be spelled
another way, ``-66`` for ``-66.0``), and any message the fast path could misread must send its
poll to the exact path."""
from __future__ import annotations

import json
import math

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finfeat.jobs.kafka.messages import encode_events
from finfeat.schemas.events import EVENT_SCHEMA, MESSAGE_SCHEMA
from finfeat.schemas.mapping import Mapping
from finfeat.transforms import stream_steps as steps
from finfeat.transforms.parse import CardTokenizer, parse_batch


def _exact(messages, monkeypatch) -> tuple:  # noqa: ANN001
    """The message-by-message path alone."""
    with monkeypatch.context() as m:
        m.setattr(steps, "_decode_all", lambda _messages: None)
        return steps.decode_messages(messages, source="t/0", run_id="r", recorded_at_us=0)


def _decode(messages) -> tuple:  # noqa: ANN001
    return steps.decode_messages(messages, source="t/0", run_id="r", recorded_at_us=0)


def _same(a: pa.Table | None, b: pa.Table | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and a.equals(b))


def _number_or_text(value: object) -> object:
    """A finite number as a float (so -66 and -66.0 compare equal); anything else as it is
    (text such as "NaN" stays text: a float NaN is not equal to itself)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value
    return number if math.isfinite(number) else value


def _parsed(raw: pa.Table) -> tuple[pa.Table, list[dict]]:
    """What the stream's parser makes of a decoded table: events, and dead letters with the
    numbers in their payloads read as numbers."""
    events, dead = parse_batch(raw.append_column("_source", pa.array(["t/0"] * raw.num_rows)),
                               mapping=Mapping.load("canonical"), tokenizer=CardTokenizer(b"k" * 32),
                               source="t/0", run_id="r", recorded_at_us=0)
    letters = dead.to_pylist()
    for row in letters:
        row["raw_payload"] = {k: _number_or_text(v) for k, v in json.loads(row["raw_payload"]).items()}
    return events, letters


def _same_parse(a: pa.Table, b: pa.Table) -> bool:
    (ea, da), (eb, db) = _parsed(a), _parsed(b)
    return ea.equals(eb) and da == db


def _events(n: int) -> pa.Table:
    import datetime as dt

    t0 = dt.datetime(2024, 3, 1, tzinfo=dt.timezone.utc)
    rows = [{"txn_id": f"t{i}", "card_token": f"tok_{i % 7}", "merchant_id": f"m{i % 5}",
             "merchant_category": "grocery", "amount_minor": 100 * i + 7, "currency": "USD",
             "event_time": t0 + dt.timedelta(seconds=13 * i, microseconds=i), "channel": "pos",
             "card_lat": 40.70 + i / 1000 if i % 3 else None, "card_lon": -74.0 + i / 7,
             "merchant_lat": 1e-4 * i, "merchant_lon": -0.0 if i == 1 else 179.999999,
             "is_fraud": None if i % 4 == 0 else bool(i % 2)} for i in range(n)]
    return pa.Table.from_pylist(rows, schema=EVENT_SCHEMA)


@pytest.fixture(scope="module")
def good() -> list[tuple[int, bytes]]:
    return [(i, v) for i, (_, v) in enumerate(encode_events(_events(60)))]


def test_well_formed_poll_takes_the_fast_path_and_equals_the_exact_path(good, monkeypatch) -> None:  # noqa: ANN001
    assert steps._decode_all(good) is not None
    raw, dead = _decode(good)
    exact_raw, exact_dead = _exact(good, monkeypatch)
    assert dead is None and exact_dead is None
    assert raw.num_rows == len(good)
    assert raw.column_names == exact_raw.column_names
    assert _same_parse(raw, exact_raw)


ODD = [
    b'{"schema":"finfeat.txn.v1","txn_id":"a","amount_minor":1250.0}',  # a float amount
    b'{"schema":"finfeat.txn.v1","txn_id":"a","amount_minor":"1250"}',  # a string amount
    b'{"schema":"finfeat.txn.v1","txn_id":"a"} {"schema":"finfeat.txn.v1","txn_id":"b"}',  # two objects
    b" ", b"", None, b"[1, 2]", b'"text"', b"{not json}",
    b'{"schema":"finfeat.txn.v1","card_lat":NaN}', b'{"schema":"finfeat.txn.v1","card_lat":1e400}',
    b'{"schema":"finfeat.txn.v1","txn_id":"","merchant_lon":6.103515625e-05}',  # spelled 0.0000610... by Arrow
    b'{"schema":"finfeat.txn.v1.old","txn_id":"a"}', b'{"txn_id":"no schema"}',
    b'{"schema":"finfeat.txn.v1","txn_id":"a","txn_id":"b"}',  # a duplicate key
    b'{"schema":"finfeat.txn.v1","is_fraud":1}', b'{"schema":"finfeat.txn.v1","txn_id":7}',
    b'{"schema":"finfeat.txn.v1","txn_id":{"nested":1}}', b'{"schema":"finfeat.txn.v1",\n"txn_id":"z"}',
    b'{"schema":"finfeat.txn.v1","txn_id":"\xff\xfe"}',  # not UTF-8
    b'{"schema":"finfeat.txn.v1","amount_minor":123456789012345678901234}',
]


@pytest.mark.parametrize("odd", ODD, ids=[repr(o)[:40] for o in ODD])
def test_a_poll_with_an_odd_message_is_decoded_exactly(good, odd: bytes | None, monkeypatch) -> None:  # noqa: ANN001
    poll = good[:5] + [(1000, odd)] + [(1001 + o, v) for o, v in good[5:9]]
    assert steps._decode_all(poll) is None
    raw, dead = _decode(poll)
    exact_raw, exact_dead = _exact(poll, monkeypatch)
    assert _same(raw, exact_raw) and _same(dead, exact_dead)
    # every message is accounted for: an event row or a dead letter
    assert (raw.num_rows if raw is not None else 0) + (dead.num_rows if dead is not None else 0) == len(poll)


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_float = st.floats(allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.fixed_dictionaries({
    "txn_id": _text, "card_token": st.none() | _text, "merchant_id": _text, "currency": _text,
    "amount_minor": st.none() | st.integers(-2**63, 2**63 - 1), "event_time": _text,
    "card_lat": st.none() | _float, "merchant_lon": st.none() | _float, "is_fraud": st.none() | st.booleans(),
}, optional={"extra": st.recursive(st.none() | st.integers() | _text, lambda x: st.lists(x, max_size=3))}),
    min_size=1, max_size=8))
def test_any_well_typed_messages_decode_the_same_on_both_paths(records: list[dict]) -> None:
    messages = [(i, json.dumps({"schema": MESSAGE_SCHEMA, **r}).encode()) for i, r in enumerate(records)]
    raw, dead = _decode(messages)
    orig = steps._decode_all
    steps._decode_all = lambda _messages: None
    try:
        exact_raw, exact_dead = _decode(messages)
    finally:
        steps._decode_all = orig
    assert _same(dead, exact_dead)
    assert _same_parse(raw, exact_raw), (raw.to_pylist(), exact_raw.to_pylist())
