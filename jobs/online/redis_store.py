"""The production online store: Redis (>= 7.0), one atomic Lua script call per write batch.

Key layout (``<ns>`` defaults to ``ff:v1``)::

    <ns>:meta                    STRING  the retention (reach and fields per entity kind) the state was written for
    <ns>:<kind>:{<id>}:h         HASH    asof -> newest event time (us); pmax -> newest pruned event time (us);
                                         '#'<txn_id> -> '<located 0|1><event_time_us>|<json of the kept fields>'
    <ns>:<kind>:{<id>}:z         ZSET    txn_id scored by event time (ties order by txn_id, as the engine's sort)
    <ns>:label:{<txn_id>}        STRING  a feed label: '<is_fraud 0|1><label_time_us>|<source>' (label-aware specs)

A lookup reads one HASH per entity (``HGETALL``; card and merchant, or a whole batch of
candidates, pipelined in one round trip). A write batch is one call of :data:`_WRITE_LUA`,
which per entity inserts each event once (``HSETNX`` on its txn id: a re-write is a no-op),
moves ``asof`` forward only (max), prunes by the retention rule (everything newer than
``asof - reach``, plus the newest and the newest located event before that), keeps ``pmax``,
and extends the expiry (``PEXPIREAT``, never shortened). Redis runs a script without
interleaving anything else, so concurrent writers serialize, a lookup sees an entity either
before or after a batch, and a connection lost mid-batch leaves the batch applied entirely or
not at all. (The ``{<id>}`` hash tag keeps an entity's two keys in one Cluster slot; a batch
spans many entities, so Cluster would need one call per slot: not done, single node only.)

Labels are written by :data:`_LABEL_LUA` (a stored label is replaced only by one that supersedes
it: later label time, then the larger source compared byte by byte); the read script appends,
for a label-aware entity kind, the label of each of its events (the label keys are not declared
to the script, which a single Redis node allows; Cluster would need them in the entity's slot).

Times travel as decimal strings: Lua numbers are doubles, exact for integer microseconds
(< 2**53), and ``string.format('%d')`` prints them without the 14-digit ``tostring`` rounding.
"""
from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from finfeat.jobs.online.base import (
    DEFAULT_TTL_S,
    EntityState,
    EntityUpdate,
    Label,
    MissingState,
    OnlineStore,
    OnlineStoreError,
    Retention,
    StoredEvent,
    StoreUnavailable,
    retention_json,
)
from finfeat.transforms.spec import FeatureSpec

DEFAULT_NAMESPACE = "ff:v1"
_MIN_VERSION = (7, 0)

# One call applies a whole batch, atomically (a Lua script runs without interleaving):
# KEYS = h1, z1, h2, z2, ... (state hash and time zset of each entity)
# ARGV[1] = expire_at_ms, then per entity: reach_us, pruned max hint ('' for none), n events,
#           then n triples: txn_id, time_us, packed value
_WRITE_LUA = r"""
local exp = tonumber(ARGV[1])
local a = 2
local inserted = 0
for e = 1, #KEYS, 2 do
  local h, z = KEYS[e], KEYS[e + 1]
  local reach, hint, n = tonumber(ARGV[a]), ARGV[a + 1], tonumber(ARGV[a + 2])
  a = a + 3
  local cur = redis.call('HGET', h, 'asof')
  local asof = cur and tonumber(cur) or nil
  for i = a, a + 3 * n - 1, 3 do
    local txn, t = ARGV[i], ARGV[i + 1]
    if redis.call('HSETNX', h, '#' .. txn, ARGV[i + 2]) == 1 then
      redis.call('ZADD', z, t, txn)
      inserted = inserted + 1
      local tn = tonumber(t)
      if asof == nil or tn > asof then asof = tn end
    end
  end
  a = a + 3 * n
  if asof ~= nil then
    redis.call('HSET', h, 'asof', string.format('%d', asof))
    if hint ~= '' then
      local p = redis.call('HGET', h, 'pmax')
      if (not p) or tonumber(hint) > tonumber(p) then redis.call('HSET', h, 'pmax', hint) end
    end
    local old = redis.call('ZRANGEBYSCORE', z, '-inf', string.format('%d', asof - reach), 'WITHSCORES')
    local m = #old / 2
    if m > 1 then
      local anchor = old[2 * m - 1]
      local located = nil
      for k = m, 1, -1 do
        local v = redis.call('HGET', h, '#' .. old[2 * k - 1])
        if v and string.sub(v, 1, 1) == '1' then
          located = old[2 * k - 1]
          break
        end
      end
      local p = redis.call('HGET', h, 'pmax')
      local pmax = p and tonumber(p) or nil
      local dropped = false
      for k = 1, m do
        local id = old[2 * k - 1]
        if id ~= anchor and id ~= located then
          redis.call('HDEL', h, '#' .. id)
          redis.call('ZREM', z, id)
          local s = tonumber(old[2 * k])
          if pmax == nil or s > pmax then pmax = s end
          dropped = true
        end
      end
      if dropped then redis.call('HSET', h, 'pmax', string.format('%d', pmax)) end
    end
    local now_exp = redis.call('PEXPIRETIME', h)
    if now_exp < 0 or exp > now_exp then
      redis.call('PEXPIREAT', h, ARGV[1])
      redis.call('PEXPIREAT', z, ARGV[1])
    end
  end
end
return inserted
"""


# KEYS = label keys; ARGV[1] = expire_at_ms, then per label: is_fraud (0|1), time_us, source.
_LABEL_LUA = r"""
local function bytes_less(a, b)  -- byte-wise a < b (Lua's '<' on strings follows the locale)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local exp = tonumber(ARGV[1])
local written = 0
for k = 1, #KEYS do
  local f, t, src = ARGV[3 * k - 1], ARGV[3 * k], ARGV[3 * k + 1]
  local cur = redis.call('GET', KEYS[k])
  local replace = true
  if cur then
    local bar = string.find(cur, '|', 2, true)
    local ct, csrc = tonumber(string.sub(cur, 2, bar - 1)), string.sub(cur, bar + 1)
    local nt = tonumber(t)
    replace = nt > ct or (nt == ct and bytes_less(csrc, src))
  end
  if replace then
    redis.call('SET', KEYS[k], f .. t .. '|' .. src, 'KEEPTTL')
    written = written + 1
  end
  local now_exp = redis.call('PEXPIRETIME', KEYS[k])
  if now_exp < 0 or exp > now_exp then redis.call('PEXPIREAT', KEYS[k], ARGV[1]) end
end
return written
"""

# Reads: every entity's HASH flattened into one string (fields and values joined by NUL) so the
# client parses one bulk string per entity instead of two RESP items per stored event. ARGV[i]:
# '' or, for a label-aware entity kind, the label key prefix: then each event's live label follows
# as the field '@<txn_id>'.
_READ_LUA = r"""#!lua flags=no-writes
local out = {}
for i = 1, #KEYS do
  local h = redis.call('HGETALL', KEYS[i])
  local prefix = ARGV[i]
  if prefix ~= nil and prefix ~= '' then
    local n = #h
    for j = 1, n, 2 do
      local f = h[j]
      if string.sub(f, 1, 1) == '#' then
        local txn = string.sub(f, 2)
        local v = redis.call('GET', prefix .. '{' .. txn .. '}')
        if v then
          h[#h + 1] = '@' .. txn
          h[#h + 1] = v
        end
      end
    end
  end
  out[i] = table.concat(h, '\0')
end
return out
"""
_READ_CHUNK = 1_000


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisOnlineStore(OnlineStore):
    """Online state in Redis; thread-safe (one connection pool); one instance per process."""

    backend = "redis"

    def __init__(self, url: str, spec: FeatureSpec | dict[str, Retention], *, ttl_s: float = DEFAULT_TTL_S,
                 namespace: str = DEFAULT_NAMESPACE, socket_timeout_s: float = 2.0,
                 connect_timeout_s: float = 1.0) -> None:
        super().__init__(spec, ttl_s=ttl_s)
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"{url!r} is not a Redis URL (redis://HOST:PORT/DB)")
        self.url, self.namespace = url, namespace
        # One immediate retry on a dropped connection (a pooled socket the server closed); none on a
        # timeout: a server that does not answer is reported at once, never waited out three times.
        self._client = redis.Redis.from_url(
            url, socket_timeout=socket_timeout_s, socket_connect_timeout=connect_timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)), retry_on_timeout=False,
            health_check_interval=0, protocol=2)
        self._script = self._client.register_script(_WRITE_LUA)
        self._label_script = self._client.register_script(_LABEL_LUA)
        self._read_script = self._client.register_script(_READ_LUA)
        self._meta_ok = False

    @property
    def location(self) -> str:
        return f"{_redacted(self.url)} (namespace {self.namespace})"

    def close(self) -> None:
        self._client.close()

    def _keys(self, kind: str, key: str) -> tuple[str, str]:
        base = f"{self.namespace}:{kind}:{{{key}}}"
        return f"{base}:h", f"{base}:z"

    def _label_key(self, txn_id: str) -> str:
        return f"{self.namespace}:label:{{{txn_id}}}"

    def _unavailable(self, exc: Exception) -> StoreUnavailable:
        return StoreUnavailable(self.location, f"{type(exc).__name__}: {exc}")

    def _ensure_meta(self, *, write: bool) -> None:
        if self._meta_ok:
            return
        info = self._client.info("server")
        version = tuple(int(x) for x in str(info.get("redis_version", "0.0")).split(".")[:2])
        if version < _MIN_VERSION:
            raise OnlineStoreError(f"{self.location}: Redis {info.get('redis_version')} is too old; "
                                   f"the online store needs {'.'.join(map(str, _MIN_VERSION))} or later")
        meta_key = f"{self.namespace}:meta"
        if write:
            self._client.set(meta_key, retention_json(self.retention), nx=True)
        stored = self._client.get(meta_key)
        self._check_meta(stored.decode() if stored is not None else None)
        self._meta_ok = stored is not None

    def ping(self) -> None:
        try:
            self._client.ping()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise self._unavailable(exc) from exc

    # -- writes -----------------------------------------------------------------------------

    def _apply(self, updates: Sequence[EntityUpdate], *, expire_at_us: int, now_us: int) -> None:
        keys: list[str] = []
        args: list[str] = [str(-(-expire_at_us // 1000))]
        for u in updates:
            keys += self._keys(u.entity, u.key)
            args += [str(self.retention[u.entity].reach_us), "" if u.pruned_max_us is None else str(u.pruned_max_us),
                     str(len(u.events))]
            for e in u.events:
                args += [e.txn_id, str(e.time_us), f"{int(e.located)}{e.time_us}|{e.payload()}"]
        try:
            self._ensure_meta(write=True)
            self._script(keys=keys, args=args)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise self._unavailable(exc) from exc
        except redis.ResponseError as exc:
            raise OnlineStoreError(f"{self.location}: write failed: {exc}") from exc

    def _apply_labels(self, labels: Sequence[Label], *, expire_at_us: int, now_us: int) -> None:
        # an expired label key is gone in Redis: the next label starts it afresh, as in SQLite
        args: list[str] = [str(-(-expire_at_us // 1000))]
        for lab in labels:
            args += [str(int(lab.is_fraud)), str(lab.time_us), lab.source]
        try:
            self._ensure_meta(write=True)
            self._label_script(keys=[self._label_key(lab.txn_id) for lab in labels], args=args)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise self._unavailable(exc) from exc
        except redis.ResponseError as exc:
            raise OnlineStoreError(f"{self.location}: label write failed: {exc}") from exc

    # -- reads ------------------------------------------------------------------------------

    def _read(self, keys: list[tuple[str, str]], *, now_us: int) -> list[EntityState | MissingState]:
        raw: list[bytes] = []
        prefix = f"{self.namespace}:label:"
        try:
            self._ensure_meta(write=False)
            for start in range(0, len(keys), _READ_CHUNK):
                chunk = keys[start:start + _READ_CHUNK]
                raw += self._read_script(keys=[self._keys(kind, key)[0] for kind, key in chunk],
                                         args=[prefix if self.retention[kind].labels else "" for kind, _ in chunk])
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise self._unavailable(exc) from exc
        except redis.ResponseError as exc:
            raise OnlineStoreError(f"{self.location}: read failed: {exc}") from exc
        return [self._decode(kind, key, blob) for (kind, key), blob in zip(keys, raw)]

    @staticmethod
    def _decode(kind: str, key: str, blob: bytes) -> EntityState | MissingState:
        if not blob:
            return MissingState(kind, key)
        parts = blob.decode().split("\0")
        asof = pmax = None
        items = []
        labels: dict[str, Label] = {}
        for f, v in zip(parts[::2], parts[1::2]):
            if f[:1] == "#":
                bar = v.index("|", 1)
                items.append((f[1:], int(v[1:bar]), v[0] == "1", v[bar + 1:]))
            elif f[:1] == "@":
                bar = v.index("|", 1)
                labels[f[1:]] = Label(f[1:], v[0] == "1", int(v[1:bar]), v[bar + 1:])
            elif f == "asof":
                asof = int(v)
            elif f == "pmax":
                pmax = int(v)
        if asof is None:
            return MissingState(kind, key)
        events = StoredEvent.many_from_payloads(items)
        events.sort(key=lambda e: (e.time_us, e.txn_id.encode()))
        return EntityState(kind, key, asof, pmax, tuple(events), labels)

    def snapshot(self, *, now_us: int | None = None) -> dict[tuple[str, str], EntityState]:
        prefix = f"{self.namespace}:"
        keys: list[tuple[str, str]] = []
        try:
            for raw in self._client.scan_iter(match=f"{self.namespace}:*:h", count=1000):
                name = raw.decode()[len(prefix):]
                kind, _, rest = name.partition(":")
                if kind in self.retention and rest.startswith("{") and rest.endswith("}:h"):
                    keys.append((kind, rest[1:-3]))
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise self._unavailable(exc) from exc
        states = self._read(keys, now_us=0) if keys else []
        return {(s.entity, s.key): s for s in states if isinstance(s, EntityState)}

    def drop_namespace(self) -> int:
        """Delete every key of this store's namespace (tests, re-materialization); returns how many."""
        n = 0
        try:
            batch: list[bytes] = []
            for raw in self._client.scan_iter(match=f"{self.namespace}:*", count=1000):
                batch.append(raw)
                if len(batch) >= 1000:
                    n += self._client.unlink(*batch)
                    batch = []
            if batch:
                n += self._client.unlink(*batch)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise self._unavailable(exc) from exc
        self._meta_ok = False
        return n
