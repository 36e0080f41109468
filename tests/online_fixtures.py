"""Fixtures and helpers for the online-store tests: a real redis-server on 127.0.0.1, stores
of both backends, the public test events, a short-window spec that makes retention prune."""
from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from finfeat.jobs.online import local_redis
from finfeat.jobs.online.base import OnlineStore
from finfeat.jobs.online.local_redis import RedisServer, RedisServerMissing, free_port, redis_server_binary  # noqa: F401
from finfeat.jobs.online.redis_store import RedisOnlineStore
from finfeat.jobs.online.sqlite import SqliteOnlineStore
from finfeat.schemas.events import EVENT_SCHEMA
from finfeat.transforms.spec import FeatureSpec
from tests.conftest import SPARKOV_TEST, load_events, unavailable

#: Windows of minutes to hours: over the 31 hours of the public test file, states prune, and the
#: anchors (newest event, newest located event beyond the reach) are exercised.
SHORT_SPEC = FeatureSpec.from_dict({"version": 1, "features": [
    {"entity": "card", "agg": "count", "window": "30m"},
    {"entity": "card", "agg": "sum", "field": "amount", "window": "2h"},
    {"entity": "card", "agg": "avg", "field": "amount", "window": "3h"},
    {"entity": "card", "agg": "max", "field": "amount", "window": "1h"},
    {"entity": "card", "agg": "std", "field": "amount", "window": "3h"},
    {"entity": "card", "agg": "zscore", "field": "amount", "window": "3h"},
    {"entity": "card", "agg": "distinct", "field": "merchant", "window": "2h"},
    {"entity": "card", "agg": "is_new", "field": "merchant", "window": "3h"},
    {"entity": "card", "agg": "seconds_since_last"},
    {"entity": "card", "agg": "geo_velocity"},
    {"entity": "merchant", "agg": "count", "window": "20m"},
    {"entity": "merchant", "agg": "count", "window": "1h"},
    {"entity": "event", "agg": "hour_of_day"},
    {"entity": "event", "agg": "is_weekend"},
]})


def require_redis_server() -> str:
    """Path of redis-server; skips without it, except under CI where it must be installed."""
    try:
        return redis_server_binary()
    except RedisServerMissing:
        unavailable("redis-server is not on PATH (install it: apt-get install -y redis-server)")


@contextmanager
def running_redis(workdir: Path) -> Iterator[RedisServer]:
    """A throwaway redis-server on 127.0.0.1 (skips the test without one, fails under CI)."""
    require_redis_server()
    with local_redis.running_redis(workdir) as server:
        yield server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


StoreFactory = Callable[..., OnlineStore]


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """``make_store(spec, **kw)``: a fresh, empty store of the parametrized backend.

    Redis stores share the session's server, each in its own namespace (dropped afterwards).
    ``make_store.backend`` names the backend; ``make_store.reopen(store)`` opens a second
    handle on the same state (another connection / pool).
    """
    made: list[OnlineStore] = []
    backend = request.param
    server = request.getfixturevalue("redis_server") if backend == "redis" else None

    def factory(spec: FeatureSpec, *, name: str | None = None, **kw: object) -> OnlineStore:
        name = name or uuid.uuid4().hex[:12]
        if backend == "sqlite":
            store: OnlineStore = SqliteOnlineStore(tmp_path / f"{name}.db", spec, **kw)
        else:
            store = RedisOnlineStore(server.url, spec, namespace=f"fftest:{name}", **kw)
        made.append(store)
        return store

    def reopen(store: OnlineStore, spec: FeatureSpec | None = None, **kw: object) -> OnlineStore:
        spec = spec if spec is not None else store.retention
        if isinstance(store, SqliteOnlineStore):
            other: OnlineStore = SqliteOnlineStore(store.path, spec, **kw)
        else:
            other = RedisOnlineStore(store.url, spec, namespace=store.namespace, **kw)
        made.append(other)
        return other

    factory.backend = backend  # type: ignore[attr-defined]
    factory.reopen = reopen  # type: ignore[attr-defined]
    yield factory
    for store in made:
        if isinstance(store, RedisOnlineStore):
            try:
                store.drop_namespace()
            except Exception:
                pass
        store.close()


@pytest.fixture(scope="session")
def sparkov_test_events() -> pa.Table:
    """The 5,116 canonical events of the public Sparkov test file, sorted by (time, txn_id)."""
    events, _ = load_events(SPARKOV_TEST, "sparkov")
    events = events.drop_columns(["_source", "_source_row"]).select(EVENT_SCHEMA.names)
    return events.sort_by([("event_time", "ascending"), ("txn_id", "ascending")])


def with_unlocated(events: pa.Table, share: float = 0.4, seed: int = 3) -> pa.Table:
    """The events with the merchant coordinates of a seeded share of them removed."""
    mask = pa.array(np.random.default_rng(seed).random(events.num_rows) < share)
    out = events
    for name in ("merchant_lat", "merchant_lon"):
        col = pc.if_else(mask, pa.scalar(None, pa.float64()), events.column(name))
        out = out.set_column(out.schema.get_field_index(name), name, col)
    return out
