"""``finfeat serve``: the online store (and a model) behind an HTTP endpoint.

POST /features and POST /score take a candidate transaction as JSON (or a JSON array of them)
and answer exactly what ``finfeat serve-lookup`` and ``finfeat score --json --store`` print;
GET /healthz, /readyz and /metrics (Prometheus) serve operations. The store and the model are
opened once per worker process. The server is uvicorn; it binds 127.0.0.1 unless --host says
otherwise. With --token-env NAME every route but /healthz and /readyz needs the header
"Authorization: Bearer <the value of $NAME>".
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys

EXIT_OK, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 2, 4
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
INSTALL_HINT = "the serving endpoint needs the [serve] extra: pip install 'finfeat[serve]' (or make setup-full)"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="serve online features (and scores) over HTTP", description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--store", required=True, help="the online store: sqlite:PATH or redis://HOST:PORT/DB")
    p.add_argument("--namespace", help="Redis key namespace (default: the store's, ff:v1)")
    p.add_argument("--feature-spec", help="feature spec YAML of the store (default: the built-in v1 set)")
    p.add_argument("--model", help="model folder written by `finfeat train`; enables POST /score")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to bind; anything but loopback needs --token-env")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (0: any free port)")
    p.add_argument("--token-env", metavar="NAME",
                   help="name of the environment variable holding the bearer token (the token never goes on "
                        "the command line)")
    p.add_argument("--allow-missing", action="store_true",
                   help="compute a card or merchant without state as having no history instead of answering 404")
    p.add_argument("--max-age", type=float, metavar="SECONDS",
                   help="a row whose card state is older than this is marked \"stale\": true (default: the spec's "
                        "longest window)")
    p.add_argument("--workers", type=int, default=1, help="worker processes, each with its own store connection")
    p.add_argument("--max-batch", type=int, default=1000, help="most candidates in one request")
    p.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    return p


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from finfeat.jobs.serve_app import SETTINGS_ENV, ServeError, ServeSettings, app_from_env
        from finfeat.jobs.serve_protocol import NoDelayH11Protocol
    except ImportError as exc:
        print(f"finfeat serve: error: {INSTALL_HINT} ({exc})", file=sys.stderr)
        return EXIT_USAGE
    if args.workers < 1 or args.max_batch < 1:
        print("finfeat serve: error: --workers and --max-batch must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    if args.token_env and not os.environ.get(args.token_env):
        print(f"finfeat serve: error: --token-env {args.token_env}: set that environment variable to the token "
              f"first (export {args.token_env}=...)", file=sys.stderr)
        return EXIT_USAGE
    if not args.token_env and not _loopback(args.host):
        print(f"finfeat serve: error: --host {args.host} is reachable from other machines: give --token-env NAME "
              "so that requests need a bearer token", file=sys.stderr)
        return EXIT_USAGE
    settings = ServeSettings(store=args.store, namespace=args.namespace, feature_spec=args.feature_spec,
                             model=args.model, token_env=args.token_env, allow_missing=args.allow_missing,
                             max_batch=args.max_batch, max_age_s=args.max_age)
    os.environ[SETTINGS_ENV] = settings.to_env()
    try:
        app_from_env().state.service.close()  # open store and model once here: a bad one fails before binding
    except ServeError as exc:
        print(f"finfeat serve: error: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE if "unavailable" in str(exc) else EXIT_USAGE
    except ValueError as exc:  # a broken feature spec
        print(f"finfeat serve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"finfeat serve: {args.store} on http://{args.host}:{args.port} "
          f"({'POST /features, POST /score' if args.model else 'POST /features'}, GET /healthz /readyz /metrics; "
          f"{'bearer token from $' + args.token_env if args.token_env else 'no authentication'}; "
          f"{args.workers} worker(s))", file=sys.stderr)
    uvicorn.run("finfeat.jobs.serve_app:app_from_env", factory=True, host=args.host, port=args.port,
                workers=args.workers, access_log=args.access_log, log_level="info", server_header=False,
                http=NoDelayH11Protocol)
    return EXIT_OK
