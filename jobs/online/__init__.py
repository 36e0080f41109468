"""The online feature store for inference: per-entity recent events, exact lookups.

* :mod:`.base`: the abstract :class:`OnlineStore`, the retention rule, typed results and errors;
* :mod:`.sqlite`: the embedded default (one file, no server); :mod:`.redis_store`: production;
* :mod:`.lookup`: candidate -> feature row through the batch engine (train/serve consistent);
* :mod:`.materialize`: the latest state of every card and merchant from canonical events.

Open a store by URL with :func:`open_store`: ``sqlite:PATH`` or ``redis://HOST:PORT/DB``.
"""
from __future__ import annotations

from finfeat.jobs.online.base import (
    DEFAULT_TTL_S,
    CandidateBeforeState,
    EntityState,
    KeyExpired,
    KeyNotFound,
    MaterializeStats,
    MissingState,
    OnlineStore,
    OnlineStoreError,
    Retention,
    StoreSpecMismatch,
    StoreUnavailable,
    WRITE_RETRY_S,
    retention_for,
    write_retrying,
)
from finfeat.jobs.online.lookup import CANDIDATE_TXN_ID, Candidate, LookupResult, lookup, lookup_many
from finfeat.jobs.online.materialize import materialize
from finfeat.transforms.spec import FeatureSpec

__all__ = [
    "CANDIDATE_TXN_ID", "DEFAULT_TTL_S", "Candidate", "CandidateBeforeState", "EntityState", "KeyExpired",
    "KeyNotFound", "LookupResult", "MaterializeStats", "MissingState", "OnlineStore", "OnlineStoreError",
    "Retention", "StoreSpecMismatch", "StoreUnavailable", "lookup", "lookup_many", "materialize", "open_store",
    "retention_for", "sqlite_path", "WRITE_RETRY_S", "write_retrying",
]


def sqlite_path(url: str) -> str | None:
    """The file of a ``sqlite:PATH`` (or ``sqlite:///abs/path``) store URL; None for other URLs."""
    if not url.startswith("sqlite:"):
        return None
    path = url[len("sqlite:"):]
    if path.startswith("//"):  # sqlite:///abs/path -> /abs/path
        path = path[2:]
    if not path:
        raise ValueError("sqlite: needs a path, e.g. sqlite:online.db")
    return path


def open_store(url: str, spec: FeatureSpec, *, create: bool = True, ttl_s: float = DEFAULT_TTL_S,
               namespace: str | None = None) -> OnlineStore:
    """``sqlite:PATH`` (``create=False``: the file must exist) or ``redis://HOST:PORT/DB``."""
    path = sqlite_path(url)
    if path is not None:
        from finfeat.jobs.online.sqlite import SqliteOnlineStore

        return SqliteOnlineStore(path, spec, ttl_s=ttl_s, create=create)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from finfeat.jobs.online.redis_store import DEFAULT_NAMESPACE, RedisOnlineStore

        return RedisOnlineStore(url, spec, ttl_s=ttl_s, namespace=namespace or DEFAULT_NAMESPACE)
    raise ValueError(f"unknown store {url!r}: use sqlite:PATH or redis://HOST:PORT/DB")
