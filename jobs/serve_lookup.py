"""``finfeat serve-lookup``: the online feature row of one candidate transaction, as JSON.

Exit codes: 0 found; 2 usage or configuration error (a bad flag, a candidate outside the bounds
every event meets: :mod:`finfeat.schemas.requests`, a store written for another feature spec); 3 the card's or the merchant's state is missing or expired (unless
``--allow-missing``); 4 the store is unreachable; 5 the candidate is older than the stored
state can still answer exactly; 6 the row was computed but the card's state is stale: its
newest event is more than --max-age before the candidate (the JSON says "stale": true).
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from typing import Any

EXIT_OK, EXIT_USAGE, EXIT_MISSING, EXIT_UNAVAILABLE, EXIT_NOT_EXACT, EXIT_STALE = 0, 2, 3, 4, 5, 6


def _at(text: str) -> int:
    """ISO-8601 time -> UTC microseconds; a time without an offset is read as UTC; 'now' is now."""
    if text == "now":
        from finfeat.jobs.online.base import wall_clock_us

        return wall_clock_us()
    from finfeat.schemas.requests import iso_to_us

    try:
        return iso_to_us(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _minor(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of minor units (e.g. 1299 for 12.99)"
                                         ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def _iso(us: int | None) -> str | None:
    if us is None:
        return None
    return datetime.fromtimestamp(us // 1_000_000, tz=timezone.utc).replace(
        microsecond=us % 1_000_000).isoformat().replace("+00:00", "Z")


def lookup_json(cand: Any, result: Any, *, max_age_s: float) -> dict[str, Any]:
    """The JSON of one lookup (``finfeat serve-lookup`` prints it, ``finfeat serve`` answers it)."""
    out = {
        "card_token": cand.card_token, "merchant_id": cand.merchant_id, "amount_minor": cand.amount_minor,
        "currency": cand.currency, "at": _iso(cand.at_us), "at_us": cand.at_us,
        "features": result.features,
        "as_of": _iso(result.as_of_us), "as_of_us": result.as_of_us, "age_s": result.age_s,
        "entity_as_of": {e: _iso(v) for e, v in result.entity_as_of_us.items()},
        "missing": result.missing,
    }
    out["stale"] = result.age_s is not None and result.age_s > max_age_s
    out["max_age_s"] = max_age_s
    return out


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve-lookup", help="look a candidate transaction up in the online store (prints JSON)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--store", required=True, help="sqlite:PATH or redis://HOST:PORT/DB")
    p.add_argument("--namespace", help="Redis key namespace (default ff:v1)")
    p.add_argument("--card-token", required=True, help="the card's token (as in the features table)")
    p.add_argument("--merchant-id", required=True)
    p.add_argument("--amount-minor", type=_minor, required=True, help="amount in integer minor units")
    p.add_argument("--currency", default="", help="ISO-4217 code (carried along; features use minor units)")
    p.add_argument("--at", type=_at, required=True,
                   help="the candidate's time, ISO-8601 (no offset = UTC), or 'now'")
    p.add_argument("--lat", type=float, help="merchant latitude (for geo velocity)")
    p.add_argument("--lon", type=float, help="merchant longitude (for geo velocity)")
    p.add_argument("--txn-id", help="the candidate's txn id (decides ties at the same instant; default "
                                    "sorts after every stored id)")
    p.add_argument("--feature-spec", help="feature spec YAML (default: the built-in v1 set)")
    p.add_argument("--max-age", type=float, metavar="SECONDS",
                   help="the state is stale (exit 6) when the card's newest event is more than this before the "
                        "candidate (default: the spec's longest window, 30 days for v1)")
    p.add_argument("--allow-missing", action="store_true",
                   help="compute a missing card or merchant as having no history (listed under 'missing') "
                        "instead of exiting 3")
    return p


def run(args: argparse.Namespace) -> int:
    from finfeat.jobs.online import (
        CANDIDATE_TXN_ID,
        Candidate,
        CandidateBeforeState,
        KeyNotFound,
        OnlineStoreError,
        StoreSpecMismatch,
        StoreUnavailable,
        lookup,
        open_store,
    )
    from finfeat.transforms.spec import FeatureSpec, SpecError

    def fail(code: int, kind: str, exc: Exception, **extra: object) -> int:
        print(json.dumps({"error": kind, "message": str(exc), **extra}), file=sys.stdout)
        print(f"finfeat serve-lookup: {exc}", file=sys.stderr)
        return code

    if (args.lat is None) != (args.lon is None):
        print("finfeat serve-lookup: error: give both --lat and --lon, or neither", file=sys.stderr)
        return EXIT_USAGE
    from finfeat.schemas.requests import RequestError, parse_request

    try:  # the bounds every event meets (the same validation as `finfeat score`)
        req = parse_request({"card_token": args.card_token, "merchant_id": args.merchant_id,
                             "amount_minor": args.amount_minor, "at_us": args.at, "currency": args.currency,
                             "merchant_lat": args.lat, "merchant_lon": args.lon, "txn_id": args.txn_id})
    except RequestError as exc:
        print(f"finfeat serve-lookup: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        spec = FeatureSpec.from_yaml(args.feature_spec) if args.feature_spec else FeatureSpec.default()
        store = open_store(args.store, spec, create=False, namespace=args.namespace)
    except (SpecError, ValueError) as exc:
        print(f"finfeat serve-lookup: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StoreUnavailable as exc:
        return fail(EXIT_UNAVAILABLE, "store_unavailable", exc)
    cand = Candidate(card_token=req.card_token, merchant_id=req.merchant_id, amount_minor=req.amount_minor,
                     at_us=req.at_us, currency=req.currency, merchant_lat=req.merchant_lat,
                     merchant_lon=req.merchant_lon, txn_id=req.txn_id if req.txn_id is not None else CANDIDATE_TXN_ID)
    try:
        with store:
            result = lookup(store, spec, cand, on_missing="empty" if args.allow_missing else "raise")
    except KeyNotFound as exc:
        return fail(EXIT_MISSING, exc.reason, exc, entity=exc.entity, key=exc.key)
    except StoreUnavailable as exc:
        return fail(EXIT_UNAVAILABLE, "store_unavailable", exc)
    except CandidateBeforeState as exc:
        return fail(EXIT_NOT_EXACT, "candidate_before_state", exc, entity=exc.entity, key=exc.key)
    except StoreSpecMismatch as exc:
        print(f"finfeat serve-lookup: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OnlineStoreError as exc:
        return fail(EXIT_UNAVAILABLE, "store_error", exc)
    max_age = args.max_age if args.max_age is not None else spec.max_window_us / 1e6
    out = lookup_json(cand, result, max_age_s=max_age)
    from finfeat.jobs.score import dumps

    print(dumps(out, indent=2))
    if out["stale"]:
        print(f"finfeat serve-lookup: warning: the card's state is stale: its newest event is {result.age_s:,.0f} s "
              f"before the candidate, more than --max-age {max_age:,.0f} s (is the store still being written?)",
              file=sys.stderr)
        return EXIT_STALE
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m finfeat.jobs.serve_lookup ...``)."""
    parser = argparse.ArgumentParser(prog="finfeat", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    return run(parser.parse_args(["serve-lookup", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
