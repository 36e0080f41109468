"""What every command and every engine shares: the tokenization key, Beam's left-over flags,
the usage error. Entry points (``jobs/cli.py``, ``jobs/stream.py``, ``jobs/produce.py``, the Flink
submission) import from here, never from each other."""
from __future__ import annotations

import argparse
import os
import sys

DEMO_TOKEN_KEY = "finfeat-demo-key--not-a-secret"
TOKEN_KEY_ENV = "FINFEAT_TOKEN_KEY"
DEFAULT_RUNNER = "FnApiRunner"
#: the backfill cuts a larger input into event-time slices of at most this many events, history included
DEFAULT_MAX_EVENTS_PER_SLICE = 1_000_000


class UsageError(Exception):
    """A bad flag, file or config; the message says how to fix it."""


def beam_args(rest: list[str]) -> list[str]:
    """Check that Beam knows every left-over flag; default the runner to the local one."""
    from apache_beam.options.pipeline_options import PipelineOptions

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    seen: set[type] = set()
    stack = list(PipelineOptions.__subclasses__())
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        stack.extend(cls.__subclasses__())
        try:
            cls._add_argparse_args(parser)
        except argparse.ArgumentError:
            pass  # an option declared by two classes
    _, unknown = parser.parse_known_args(rest)
    if unknown:
        raise UsageError(f"unknown flag(s) {' '.join(unknown)}: not a finfeat flag (see `finfeat <command> --help`) "
                         "and not a Beam pipeline option")
    if not any(a == "--runner" or a.startswith("--runner=") for a in rest):
        rest = [f"--runner={DEFAULT_RUNNER}", *rest]
    return rest


def check_token_key(key: bytes, *, demo_ok: bool) -> bytes:
    """Refuse a tokenization key that protects nothing: the public demo key (unless ``demo_ok``),
    fewer than 16 bytes that are not blanks, or fewer than 8 distinct bytes."""
    if key == DEMO_TOKEN_KEY.encode() and not demo_ok:
        raise UsageError(f"{TOKEN_KEY_ENV} holds the public demo key, which anyone can read in the source: "
                         f"set {TOKEN_KEY_ENV} to a secret of your own (e.g. `openssl rand -hex 32`), or pass "
                         "--demo-key to use the demo key on test data")
    if len(key.strip()) < 16:
        raise UsageError(f"{TOKEN_KEY_ENV} must be a secret of at least 16 bytes, not counting blanks at either "
                         f"end (it has {len(key.strip())}); e.g. `export {TOKEN_KEY_ENV}=$(openssl rand -hex 32)`")
    if len(set(key)) < 8:
        raise UsageError(f"{TOKEN_KEY_ENV} has only {len(set(key))} distinct characters: too easy to guess; use a "
                         f"random secret, e.g. `export {TOKEN_KEY_ENV}=$(openssl rand -hex 32)`")
    return key


def token_key(args: argparse.Namespace, *, demo: bool) -> bytes:
    demo_ok = demo or getattr(args, "demo_key", False)
    key = os.environ.get(TOKEN_KEY_ENV)
    if key:
        return check_token_key(key.encode(), demo_ok=demo_ok)
    if demo_ok:
        print(f"note: card numbers are tokenized with the visible DEMO key {DEMO_TOKEN_KEY!r}; "
              f"set {TOKEN_KEY_ENV} to a secret of at least 16 bytes for real data", file=sys.stderr)
        return DEMO_TOKEN_KEY.encode()
    raise UsageError(f"no tokenization key: set {TOKEN_KEY_ENV} to a secret of at least 16 bytes "
                     "(or pass --demo-key to use the public demo key on test data)")
