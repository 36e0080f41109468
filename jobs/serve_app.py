"""The HTTP feature service behind ``finfeat serve``: an ASGI app (Starlette) around one open
online store and, optionally, one model.

Routes:

* ``POST /features``: a candidate transaction (JSON object) or a JSON array of them -> its
  feature row(s) with as-of time and age, exactly what ``finfeat serve-lookup`` prints (the same
  :func:`finfeat.jobs.online.lookup_many` on the same store);
* ``POST /score``: the same request(s) -> features and the model's score, exactly what
  ``finfeat score --json ... --store ...`` prints (the same :func:`finfeat.jobs.score.score_request`);
* ``GET /healthz`` (the process answers), ``GET /readyz`` (the store answers a read);
* ``GET /metrics``: Prometheus text (requests by route and status, a latency histogram, store
  errors by kind).

Errors are JSON ``{"error": KIND, "message": ..., ...}`` with a status code: 400 a bad request
(``field`` names the bad field), 401 a missing or wrong bearer token, 404 a card or merchant
without state (``entity``, ``key``) or an unknown route, 409 a candidate older than the state
can answer exactly, 503 the store is unreachable. A batch answers 200 with one result per
request, in order; a request that failed gets its error object in its place.

The store and the model are opened once per process, when the app is created. Store calls run
in a worker thread, so a slow store never blocks ``/healthz``.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

_LOG = logging.getLogger(__name__)

#: The environment variable that carries :class:`ServeSettings` (JSON) to uvicorn's worker processes.
SETTINGS_ENV = "FINFEAT_SERVE_SETTINGS"
#: Latency histogram buckets, seconds: a lookup takes about a millisecond.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_READY_KEY = "__finfeat_readyz__"


class ServeError(Exception):
    """The service cannot start (bad store, model or settings); the message says how to fix it."""


@dataclass(frozen=True)
class ServeSettings:
    """What one service process opens. The token itself is never here, only the name of the
    environment variable that holds it."""

    store: str
    namespace: str | None = None
    feature_spec: str | None = None
    model: str | None = None
    token_env: str | None = None
    allow_missing: bool = False
    max_batch: int = 1000
    max_age_s: float | None = None   # default: the spec's longest window
    audit: str | None = None         # the audit folder: every /score decision is recorded there first
    reason_method: str = "shap"      # finfeat.jobs.score.REASON_METHODS

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> ServeSettings:
        raw = os.environ.get(SETTINGS_ENV)
        if not raw:
            raise ServeError(f"{SETTINGS_ENV} is not set: start the service with `finfeat serve`")
        return cls(**json.loads(raw))


# ----------------------------------------------------------------------------------- requests


def _parse_at(text: str) -> int:
    from finfeat.jobs.training import parse_time, to_us

    try:
        return to_us(parse_time(text))
    except Exception:  # noqa: BLE001 - argparse's type error; reported as a bad value of `at`
        raise ValueError(f"{text!r} is not an ISO-8601 time, e.g. 2020-06-22T18:30:00Z") from None


class CandidateRequest(BaseModel):
    """One candidate transaction: money in integer minor units, time ISO-8601 (``at``, no offset
    = UTC) or UTC microseconds (``at_us``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    card_token: str = Field(min_length=1)
    merchant_id: str = Field(min_length=1)
    amount_minor: StrictInt = Field(ge=0)
    at: str | None = None
    at_us: StrictInt | None = None
    txn_id: str | None = Field(default=None, min_length=1)
    currency: str = ""
    merchant_lat: float | None = Field(default=None, ge=-90, le=90)
    merchant_lon: float | None = Field(default=None, ge=-180, le=180)

    @model_validator(mode="after")
    def _check(self) -> CandidateRequest:
        if (self.at is None) == (self.at_us is None):
            raise ValueError("give exactly one of at (ISO-8601) and at_us (UTC microseconds)")
        if (self.merchant_lat is None) != (self.merchant_lon is None):
            raise ValueError("give both merchant_lat and merchant_lon, or neither")
        for name in ("merchant_lat", "merchant_lon"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number")
        return self

    @field_validator("at")
    @classmethod
    def _time(cls, value: str | None) -> str | None:
        if value is not None:
            _parse_at(value)
        return value

    def time_us(self) -> int:
        return self.at_us if self.at_us is not None else _parse_at(self.at or "")

    def candidate(self) -> Any:
        from finfeat.jobs.online import CANDIDATE_TXN_ID, Candidate

        return Candidate(card_token=self.card_token, merchant_id=self.merchant_id, amount_minor=self.amount_minor,
                         at_us=self.time_us(), currency=self.currency, merchant_lat=self.merchant_lat,
                         merchant_lon=self.merchant_lon, txn_id=self.txn_id or CANDIDATE_TXN_ID)


class BadRequest(Exception):
    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def parse_candidate(raw: object) -> CandidateRequest:
    """A JSON value -> a validated request; :class:`BadRequest` names the first bad field."""
    if not isinstance(raw, dict):
        raise BadRequest("a request is a JSON object")
    try:
        return CandidateRequest.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err.get("loc", ())) or None
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        raise BadRequest(f"{field}: {msg}" if field else msg, field) from None


# ----------------------------------------------------------------------------------- results


def error_of(exc: Exception) -> tuple[int, dict[str, Any]] | None:
    """Status and JSON body of a failed request (None: not an expected error, a bug)."""
    from finfeat.jobs.online import (
        CandidateBeforeState,
        KeyNotFound,
        OnlineStoreError,
        StoreSpecMismatch,
        StoreUnavailable,
    )
    from finfeat.jobs.score import ScoringError

    from finfeat.jobs.audit import AuditUnavailable

    if isinstance(exc, AuditUnavailable):
        return 503, {"error": "audit_unavailable", "message": str(exc)}
    if isinstance(exc, BadRequest):
        return 400, {"error": "bad_request", "message": str(exc), "field": exc.field}
    if isinstance(exc, ScoringError):
        return 400, {"error": "bad_request", "message": str(exc), "field": None}
    if isinstance(exc, KeyNotFound):
        return 404, {"error": exc.reason, "message": str(exc), "entity": exc.entity, "key": exc.key}
    if isinstance(exc, CandidateBeforeState):
        return 409, {"error": "candidate_before_state", "message": str(exc), "entity": exc.entity, "key": exc.key}
    if isinstance(exc, StoreUnavailable):
        return 503, {"error": "store_unavailable", "message": str(exc)}
    if isinstance(exc, StoreSpecMismatch):
        return 503, {"error": "store_spec_mismatch", "message": str(exc)}
    if isinstance(exc, OnlineStoreError):
        return 503, {"error": "store_error", "message": str(exc)}
    return None


# ----------------------------------------------------------------------------------- the service


class FeatureService:
    """One open store (and model), the request handlers' logic without HTTP."""

    def __init__(self, settings: ServeSettings) -> None:
        from finfeat.jobs.online import OnlineStoreError, open_store
        from finfeat.transforms.spec import FeatureSpec

        self.settings = settings
        self.spec = FeatureSpec.from_yaml(settings.feature_spec) if settings.feature_spec else FeatureSpec.default()
        self.scorer = None
        if settings.model:
            from finfeat.jobs.score import Scorer, ScoringError

            try:
                self.scorer = Scorer.load(settings.model, reason_method=settings.reason_method)
            except ScoringError as exc:
                raise ServeError(str(exc)) from None
            if self.scorer.spec_hash and self.scorer.spec_hash != self.spec.spec_hash:
                raise ServeError(f"the model was trained on feature spec {self.scorer.spec_hash}, the store "
                                 f"serves {self.spec.spec_hash}: pass the matching --feature-spec")
            self.scorer.prepare_reasons()  # the tree SHAP tables, before the first request rather than during it
        try:
            self.store = open_store(settings.store, self.spec, create=False, namespace=settings.namespace)
        except (OnlineStoreError, ValueError) as exc:
            raise ServeError(str(exc)) from None
        self.audit = None
        if settings.audit:
            from finfeat.jobs.audit import AuditTrail, AuditUnavailable

            try:
                self.audit = AuditTrail.open(settings.audit)
            except (OSError, AuditUnavailable) as exc:
                self.store.close()
                raise ServeError(f"--audit {settings.audit}: {exc}") from None
        self.on_missing = "empty" if settings.allow_missing else "raise"
        self.max_age_s = settings.max_age_s if settings.max_age_s is not None else self.spec.max_window_us / 1e6

    def close(self) -> None:
        self.store.close()
        if self.audit is not None:
            self.audit.close()

    def ready(self) -> None:
        """Raise the store's error unless it answers a read (and holds this spec's state)."""
        entity = self.spec.entities[0] if self.spec.entities else "card"
        self.store.read_states([(entity, _READY_KEY)])

    def features(self, requests: list[CandidateRequest]) -> list[dict[str, Any] | Exception]:
        from finfeat.jobs.online import lookup, lookup_many

        cands = [r.candidate() for r in requests]
        try:
            results: list[Any] = lookup_many(self.store, self.spec, cands, on_missing=self.on_missing)
        except Exception as exc:  # noqa: BLE001 - a batch with a failing candidate: each one on its own
            if len(cands) == 1 or error_of(exc) is None or error_of(exc)[0] == 503:
                raise
            results = []
            for c in cands:
                try:
                    results.append(lookup(self.store, self.spec, c, on_missing=self.on_missing))
                except Exception as one:  # noqa: BLE001 - reported in the item's place
                    if error_of(one) is None:
                        raise
                    results.append(one)
        from finfeat.jobs.serve_lookup import lookup_json

        return [r if isinstance(r, Exception) else lookup_json(c, r, max_age_s=self.max_age_s)
                for c, r in zip(cands, results)]

    def score(self, raw: dict[str, Any], *, request_id: str | None = None, caller: str | None = None
              ) -> dict[str, Any]:
        from finfeat.jobs.score import score_request

        assert self.scorer is not None
        return score_request(self.scorer, raw, store=self.store, allow_missing=self.settings.allow_missing,
                             spec=self.spec, audit=self.audit, request_id=request_id, caller=caller)


# ----------------------------------------------------------------------------------- the app


def create_app(settings: ServeSettings, *, token: str | None = None) -> Any:
    """The ASGI app; opens the store (and model) now. ``token``: the bearer token every route
    but ``/healthz`` and ``/readyz`` requires (None: no authentication)."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    service = FeatureService(settings)
    registry = CollectorRegistry()
    requests_total = Counter("finfeat_http_requests", "HTTP requests by route and status code",
                             ["route", "status"], registry=registry)
    latency = Histogram("finfeat_http_request_duration_seconds", "Time to answer a request, by route",
                        ["route"], buckets=LATENCY_BUCKETS, registry=registry)
    store_errors = Counter("finfeat_store_errors", "Online store errors by kind (unavailable, spec mismatch, ...)",
                           ["kind"], registry=registry)
    expected = None if token is None else f"Bearer {token}".encode()
    # who asks, as the audit trail records it: the token's fingerprint, never the token
    caller = "anonymous" if token is None else "token:" + hashlib.sha256(token.encode()).hexdigest()[:12]

    def authorized(request: Request) -> bool:
        if expected is None:
            return True
        return hmac.compare_digest(request.headers.get("authorization", "").encode(), expected)

    def fail(status: int, body: dict[str, Any]) -> JSONResponse:
        if status == 503:
            store_errors.labels(kind=body["error"]).inc()
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse(body, status_code=status, headers=headers)

    def route(path: str, *, auth: bool = True) -> Callable[[Callable[[Request], Awaitable[Response]]],
                                                             Callable[[Request], Awaitable[Response]]]:
        def wrap(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
            async def endpoint(request: Request) -> Response:
                t0 = time.perf_counter()
                if auth and not authorized(request):
                    response: Response = fail(401, {"error": "unauthorized",
                                                    "message": "missing or wrong bearer token (Authorization: Bearer ...)"})
                else:
                    try:
                        response = await handler(request)
                    except Exception as exc:  # noqa: BLE001 - typed errors become JSON, anything else a 500
                        got = error_of(exc)
                        if got is None:
                            _LOG.exception("%s failed", path)
                            got = (500, {"error": "internal", "message": f"{type(exc).__name__}: {exc}"})
                        response = fail(*got)
                requests_total.labels(route=path, status=str(response.status_code)).inc()
                latency.labels(route=path).observe(time.perf_counter() - t0)
                return response
            return endpoint
        return wrap

    async def body_of(request: Request) -> tuple[list[CandidateRequest], list[Any], bool]:
        try:
            raw = json.loads(await request.body())
        except ValueError as exc:
            raise BadRequest(f"the body is not JSON: {exc}") from None
        batch = isinstance(raw, list)
        items = raw if batch else [raw]
        if batch and not items:
            raise BadRequest("an empty batch", "body")
        if len(items) > settings.max_batch:
            raise BadRequest(f"a batch of {len(items)} requests; at most {settings.max_batch} per call", "body")
        parsed = []
        for i, item in enumerate(items):
            try:
                parsed.append(parse_candidate(item))
            except BadRequest as exc:
                if not batch:
                    raise
                raise BadRequest(f"[{i}] {exc}", f"{i}.{exc.field}" if exc.field else str(i)) from None
        return parsed, items, batch

    def answer(results: list[Any], batch: bool) -> JSONResponse:
        if not batch:
            if isinstance(results[0], Exception):
                raise results[0]
            return JSONResponse(results[0])
        out = []
        for r in results:
            if isinstance(r, Exception):
                status, body = error_of(r) or (500, {"error": "internal", "message": str(r)})
                out.append({**body, "status": status})
            else:
                out.append(r)
        return JSONResponse(out)

    @route("/features")
    async def features(request: Request) -> Response:
        parsed, _, batch = await body_of(request)
        return answer(await run_in_threadpool(service.features, parsed), batch)

    @route("/score")
    async def score(request: Request) -> Response:
        if service.scorer is None:
            return JSONResponse({"error": "no_model", "message": "this service has no model: start it with --model DIR"},
                                status_code=404)
        _, raw, batch = await body_of(request)
        rid = request.headers.get("x-request-id") or None
        client = request.client.host if request.client else "?"

        def run() -> list[Any]:
            out: list[Any] = []
            for i, item in enumerate(raw):
                try:
                    out.append(service.score(item, request_id=f"{rid}.{i}" if rid and batch else rid,
                                             caller=f"{caller}@{client}"))
                except Exception as exc:  # noqa: BLE001 - typed errors go in the item's place
                    if error_of(exc) is None or (not batch) or error_of(exc)[0] == 503:
                        raise
                    out.append(exc)
            return out

        return answer(await run_in_threadpool(run), batch)

    @route("/healthz", auth=False)
    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @route("/readyz", auth=False)
    async def readyz(request: Request) -> Response:
        await run_in_threadpool(service.ready)
        return JSONResponse({"status": "ready", "store": service.store.location, "spec_hash": service.spec.spec_hash,
                             "model_id": service.scorer.model_id if service.scorer else None})

    @route("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def not_found(request: Request, exc: HTTPException) -> Response:
        kind = {404: "no_route", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        requests_total.labels(route="other", status=str(exc.status_code)).inc()
        return JSONResponse({"error": kind, "message": f"{request.method} {request.url.path}: {exc.detail}"},
                            status_code=exc.status_code)

    routes = [Route("/features", features, methods=["POST"]), Route("/score", score, methods=["POST"]),
              Route("/healthz", healthz, methods=["GET"]), Route("/readyz", readyz, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"])]
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            service.close()

    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found}, lifespan=lifespan)
    app.state.service = service
    return app


def app_from_env() -> Any:
    """uvicorn's app factory (``--workers`` > 1 starts one per process): settings from
    :data:`SETTINGS_ENV`, the token from the environment variable they name."""
    settings = ServeSettings.from_env()
    token = None
    if settings.token_env:
        token = os.environ.get(settings.token_env)
        if not token:
            raise ServeError(f"--token-env {settings.token_env}: that environment variable is unset or empty")
    return create_app(settings, token=token)

