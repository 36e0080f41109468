"""The embedded online store: one SQLite file, no server (the default).

Layout (``entity_kind`` is ``card`` / ``merchant``, ``entity_id`` the token or merchant id)::

    meta          (key PRIMARY KEY, value)                 -- 'retention': the spec's reach and fields
    entity_state  (entity_kind, entity_id, asof_us, pruned_max_us, expires_at_us)
                  PRIMARY KEY (entity_kind, entity_id)
    entity_event  (entity_kind, entity_id, txn_id, event_time_us, located, payload)
                  PRIMARY KEY (entity_kind, entity_id, txn_id), INDEX (entity_kind, entity_id, event_time_us, txn_id)
    txn_label     (txn_id PRIMARY KEY, is_fraud, label_time_us, source, expires_at_us)
                  -- feed labels, one per transaction (label-aware specs only)

Monotonic writes: each batch is one ``BEGIN IMMEDIATE`` transaction (writers, threads or
processes, serialize on SQLite's write lock; WAL lets readers go on meanwhile). Per entity it
inserts events with ``INSERT OR IGNORE`` (idempotent by txn id), moves the as-of time with a
conditional upsert ``ON CONFLICT DO UPDATE SET asof_us = max(asof_us, excluded.asof_us)``
(it never goes back), prunes by the retention rule of :mod:`finfeat.jobs.online.base`, and
extends the expiry. A state whose expiry has passed is not served (:class:`KeyExpired`) and is
dropped by the next write to that entity, which starts it afresh, as Redis does. Labels are
upserted the same way (the stored label is replaced only by one that supersedes it, or when it
has expired); a read of a label-aware entity joins its events with their live labels. A read of
several keys is one read transaction (one snapshot); a times-only kind (a merchant's counts)
reads ids and times from the time index alone, into :class:`EventTimes`.
"""
from __future__ import annotations

import os
import sqlite3
import threading
from contextlib import contextmanager
from collections.abc import Iterator, Sequence
from pathlib import Path

from finfeat.jobs.online.base import (
    DEFAULT_TTL_S,
    EntityState,
    EntityUpdate,
    EventTimes,
    Label,
    MissingState,
    OnlineStore,
    OnlineStoreError,
    Retention,
    StoredEvent,
    StoreUnavailable,
    retention_json,
    wall_clock_us,
)
from finfeat.transforms.spec import FeatureSpec

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS entity_state (
    entity_kind   TEXT NOT NULL,
    entity_id     TEXT NOT NULL,
    asof_us       INTEGER NOT NULL,
    pruned_max_us INTEGER,
    expires_at_us INTEGER NOT NULL,
    PRIMARY KEY (entity_kind, entity_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS entity_event (
    entity_kind   TEXT NOT NULL,
    entity_id     TEXT NOT NULL,
    txn_id        TEXT NOT NULL,
    event_time_us INTEGER NOT NULL,
    located       INTEGER NOT NULL,
    payload       TEXT NOT NULL,
    PRIMARY KEY (entity_kind, entity_id, txn_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entity_event_by_time ON entity_event (entity_kind, entity_id, event_time_us, txn_id);
CREATE TABLE IF NOT EXISTS txn_label (
    txn_id        TEXT PRIMARY KEY,
    is_fraud      INTEGER NOT NULL,
    label_time_us INTEGER NOT NULL,
    source        TEXT NOT NULL,
    expires_at_us INTEGER NOT NULL
) WITHOUT ROWID;
"""

# A stored label is replaced when it has expired or the new one supersedes it (later label time,
# then the larger source: text compares as bytes in SQLite's default BINARY collation).
_UPSERT_LABEL = """
INSERT INTO txn_label (txn_id, is_fraud, label_time_us, source, expires_at_us) VALUES (?1, ?2, ?3, ?4, ?5)
ON CONFLICT (txn_id) DO UPDATE SET
    is_fraud = CASE WHEN expires_at_us <= ?6 OR (excluded.label_time_us, excluded.source) > (label_time_us, source)
                    THEN excluded.is_fraud ELSE is_fraud END,
    source = CASE WHEN expires_at_us <= ?6 OR (excluded.label_time_us, excluded.source) > (label_time_us, source)
                  THEN excluded.source ELSE source END,
    label_time_us = CASE WHEN expires_at_us <= ?6 OR (excluded.label_time_us, excluded.source) > (label_time_us, source)
                         THEN excluded.label_time_us ELSE label_time_us END,
    expires_at_us = max(expires_at_us, excluded.expires_at_us)
"""

_UPSERT_STATE = """
INSERT INTO entity_state (entity_kind, entity_id, asof_us, pruned_max_us, expires_at_us)
VALUES (?, ?, ?, NULL, ?)
ON CONFLICT (entity_kind, entity_id) DO UPDATE SET
    asof_us = max(asof_us, excluded.asof_us),
    expires_at_us = max(expires_at_us, excluded.expires_at_us)
RETURNING asof_us, pruned_max_us
"""


class SqliteOnlineStore(OnlineStore):
    """Online state in one SQLite file (WAL mode); safe for threads and processes."""

    backend = "sqlite"

    def __init__(self, path: str | os.PathLike[str], spec: FeatureSpec | dict[str, Retention], *,
                 ttl_s: float = DEFAULT_TTL_S, create: bool = True, busy_timeout_s: float = 30.0) -> None:
        super().__init__(spec, ttl_s=ttl_s)
        self.path = Path(path)
        self._create, self._busy = create, busy_timeout_s
        self._local = threading.local()
        self._meta_ok = False
        self._meta_lock = threading.Lock()
        if not create and not self.path.is_file():
            raise StoreUnavailable(self.location, "no such file (materialize into it first)")
        self._conn()  # fail now, not at the first lookup

    @property
    def location(self) -> str:
        return f"sqlite:{self.path}"

    # -- connections ------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is not None and local.pid == os.getpid():
            return conn
        try:
            if not self._create and not self.path.is_file():
                raise StoreUnavailable(self.location, "no such file")
            conn = sqlite3.connect(self.path, timeout=self._busy, isolation_level=None, check_same_thread=True)
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy * 1000)}")
            if self._create:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise OnlineStoreError(f"{self.location}: cannot switch to WAL mode (got {mode})")
                conn.executescript(_SCHEMA)
            conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as exc:
            raise StoreUnavailable(self.location, f"{type(exc).__name__}: {exc}") from exc
        local.conn, local.pid = conn, os.getpid()
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local = threading.local()

    def _ensure_meta(self, conn: sqlite3.Connection, *, write: bool) -> None:
        if self._meta_ok:
            return
        with self._meta_lock:
            mine = retention_json(self.retention)
            try:
                if write:
                    conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('retention', ?)", (mine,))
                row = conn.execute("SELECT value FROM meta WHERE key = 'retention'").fetchone()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    raise OnlineStoreError(f"{self.location} is not an online store (no finfeat tables)") from exc
                raise
            self._check_meta(row[0] if row else None)
            self._meta_ok = row is not None

    # -- writes -----------------------------------------------------------------------------

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE, the store's metadata checked): committed at the
        end of the block, rolled back on any error; SQLite's errors as :class:`StoreUnavailable`."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._ensure_meta(conn, write=True)
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreUnavailable(self.location, f"{type(exc).__name__}: {exc}") from exc

    def _apply(self, updates: Sequence[EntityUpdate], *, expire_at_us: int, now_us: int) -> None:
        with self._writing() as conn:
            for u in updates:
                self._apply_one(conn, u, expire_at_us=expire_at_us, now_us=now_us)

    def _apply_one(self, conn: sqlite3.Connection, u: EntityUpdate, *, expire_at_us: int, now_us: int) -> None:
        kind, key = u.entity, u.key
        reach = self.retention[kind].reach_us
        row = conn.execute("SELECT expires_at_us FROM entity_state WHERE entity_kind = ? AND entity_id = ?",
                           (kind, key)).fetchone()
        if row is not None and row[0] <= now_us:  # expired: start afresh (Redis has deleted it already)
            conn.execute("DELETE FROM entity_event WHERE entity_kind = ? AND entity_id = ?", (kind, key))
            conn.execute("DELETE FROM entity_state WHERE entity_kind = ? AND entity_id = ?", (kind, key))
        conn.executemany(
            "INSERT OR IGNORE INTO entity_event (entity_kind, entity_id, txn_id, event_time_us, located, payload) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(kind, key, e.txn_id, e.time_us, int(e.located), e.payload()) for e in u.events])
        newest = max(e.time_us for e in u.events)
        asof, pruned_max = conn.execute(_UPSERT_STATE, (kind, key, newest, expire_at_us)).fetchone()
        if u.pruned_max_us is not None and (pruned_max is None or u.pruned_max_us > pruned_max):
            pruned_max = u.pruned_max_us
            conn.execute("UPDATE entity_state SET pruned_max_us = ? WHERE entity_kind = ? AND entity_id = ?",
                         (pruned_max, kind, key))
        horizon = asof - reach
        old = conn.execute(
            "SELECT txn_id, event_time_us, located FROM entity_event "
            "WHERE entity_kind = ? AND entity_id = ? AND event_time_us <= ? ORDER BY event_time_us, txn_id",
            (kind, key, horizon)).fetchall()
        if len(old) <= 1:
            return
        keep = {old[-1][0]}
        for txn_id, _, located in reversed(old):
            if located:
                keep.add(txn_id)
                break
        dropped = [(txn_id, t) for txn_id, t, _ in old if txn_id not in keep]
        if not dropped:
            return
        conn.executemany("DELETE FROM entity_event WHERE entity_kind = ? AND entity_id = ? AND txn_id = ?",
                         [(kind, key, txn_id) for txn_id, _ in dropped])
        newest_dropped = max(t for _, t in dropped)
        if pruned_max is None or newest_dropped > pruned_max:
            conn.execute("UPDATE entity_state SET pruned_max_us = ? WHERE entity_kind = ? AND entity_id = ?",
                         (newest_dropped, kind, key))

    def _apply_labels(self, labels: Sequence[Label], *, expire_at_us: int, now_us: int) -> None:
        with self._writing() as conn:
            conn.executemany(_UPSERT_LABEL, [(lab.txn_id, int(lab.is_fraud), lab.time_us, lab.source,
                                              expire_at_us, now_us) for lab in labels])

    # -- reads ------------------------------------------------------------------------------

    def _read(self, keys: list[tuple[str, str]], *, now_us: int) -> list[EntityState | MissingState]:
        conn = self._conn()
        try:
            self._ensure_meta(conn, write=False)
            # one read transaction: a consistent view of every entity read (writers commit whole batches)
            retention = self.retention
            own = not conn.in_transaction
            if own:
                conn.execute("BEGIN")
            try:
                return [self._read_one(conn, kind, key, now_us, labels=retention[kind].labels,
                                       times_only=retention[kind].times_only) for kind, key in keys]
            finally:
                if own and conn.in_transaction:
                    conn.execute("COMMIT")  # a read: ends the snapshot
        except sqlite3.Error as exc:
            raise StoreUnavailable(self.location, f"{type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _read_one(conn: sqlite3.Connection, kind: str, key: str, now_us: int, *, labels: bool = False,
                  times_only: bool = False) -> EntityState | MissingState:
        if labels:
            return SqliteOnlineStore._read_labelled(conn, kind, key, now_us)
        if times_only:  # ids and times only: the index by time covers them, no table row is read
            row = conn.execute("SELECT asof_us, pruned_max_us, expires_at_us FROM entity_state "
                               "WHERE entity_kind = ? AND entity_id = ?", (kind, key)).fetchone()
            if row is None:
                return MissingState(kind, key)
            asof, pruned_max, expires = row
            if expires <= now_us:
                return MissingState(kind, key, expired_at_us=expires)
            rows = conn.execute("SELECT txn_id, event_time_us FROM entity_event WHERE entity_kind = ? AND entity_id = ? "
                                "ORDER BY event_time_us, txn_id", (kind, key)).fetchall()
            txn_ids, times = zip(*rows) if rows else ((), ())
            return EntityState(kind, key, asof, pruned_max, EventTimes(txn_ids, times))
        rows = conn.execute(
            "SELECT s.asof_us, s.pruned_max_us, s.expires_at_us, e.txn_id, e.event_time_us, e.located, e.payload "
            "FROM entity_state AS s LEFT JOIN entity_event AS e "
            "ON e.entity_kind = s.entity_kind AND e.entity_id = s.entity_id "
            "WHERE s.entity_kind = ? AND s.entity_id = ? ORDER BY e.event_time_us, e.txn_id", (kind, key)).fetchall()
        if not rows:
            return MissingState(kind, key)
        asof, pruned_max, expires = rows[0][:3]
        if expires <= now_us:
            return MissingState(kind, key, expired_at_us=expires)
        events = tuple(StoredEvent.many_from_payloads([(t, us, bool(loc), p) for *_, t, us, loc, p in rows
                                                       if t is not None]))
        return EntityState(kind, key, asof, pruned_max, events)

    @staticmethod
    def _read_labelled(conn: sqlite3.Connection, kind: str, key: str, now_us: int) -> EntityState | MissingState:
        """:meth:`_read_one` of a label-aware entity: its events with their live feed labels."""
        rows = conn.execute(
            "SELECT s.asof_us, s.pruned_max_us, s.expires_at_us, e.txn_id, e.event_time_us, e.located, e.payload, "
            "l.is_fraud, l.label_time_us, l.source "
            "FROM entity_state AS s LEFT JOIN entity_event AS e "
            "ON e.entity_kind = s.entity_kind AND e.entity_id = s.entity_id "
            "LEFT JOIN txn_label AS l ON l.txn_id = e.txn_id AND l.expires_at_us > ? "
            "WHERE s.entity_kind = ? AND s.entity_id = ? ORDER BY e.event_time_us, e.txn_id",
            (now_us, kind, key)).fetchall()
        if not rows:
            return MissingState(kind, key)
        asof, pruned_max, expires = rows[0][:3]
        if expires <= now_us:
            return MissingState(kind, key, expired_at_us=expires)
        events = tuple(StoredEvent.many_from_payloads([(r[3], r[4], bool(r[5]), r[6]) for r in rows
                                                       if r[3] is not None]))
        labels = {r[3]: Label(r[3], bool(r[7]), r[8], r[9]) for r in rows if r[3] is not None and r[7] is not None}
        return EntityState(kind, key, asof, pruned_max, events, labels)

    def snapshot(self, *, now_us: int | None = None) -> dict[tuple[str, str], EntityState]:
        now = wall_clock_us() if now_us is None else now_us
        conn = self._conn()
        try:
            keys = conn.execute("SELECT entity_kind, entity_id FROM entity_state WHERE expires_at_us > ?",
                                (now,)).fetchall()
        except sqlite3.Error as exc:
            raise StoreUnavailable(self.location, f"{type(exc).__name__}: {exc}") from exc
        states = self._read([(k, i) for k, i in keys], now_us=now) if keys else []
        return {(s.entity, s.key): s for s in states if isinstance(s, EntityState)}

    def purge_expired(self, *, now_us: int | None = None) -> int:
        """Delete every expired state and label (Redis does this by itself); returns how many states."""
        now = wall_clock_us() if now_us is None else now_us
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("DELETE FROM entity_event WHERE (entity_kind, entity_id) IN "
                             "(SELECT entity_kind, entity_id FROM entity_state WHERE expires_at_us <= ?)", (now,))
                n = conn.execute("DELETE FROM entity_state WHERE expires_at_us <= ?", (now,)).rowcount
                conn.execute("DELETE FROM txn_label WHERE expires_at_us <= ?", (now,))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreUnavailable(self.location, f"{type(exc).__name__}: {exc}") from exc
        return n
