"""``finfeat.yaml``: one project file that every command reads; ``finfeat init`` writes one.

Every command looks for ``finfeat.yaml`` in the working directory (or takes ``--config PATH``,
anywhere on the command line). Its values become the defaults of the matching flags, so a flag
given on the command line always wins; Beam flags under ``runner.flags`` come before the
command line's, which therefore win too. Relative paths in the file are relative to the file's
folder. Unknown keys and bad values fail at once with the key that is wrong.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

CONFIG_NAME = "finfeat.yaml"

TEMPLATE = """\
# finfeat project file: every `finfeat` command run in this folder reads it (or: --config PATH).
# Flags on the command line override these values. Relative paths are relative to this file.

warehouse: warehouse            # folder of the Delta tables
mapping: {mapping}              # input mapping: sparkov, generated, canonical or a YAML file
# feature_spec: my_spec.yaml    # default: the built-in v1 feature set
suites:
  features: features            # expectation suite of feature rows: built-in name or YAML file
online_store: {online_store}    # sqlite:PATH or redis://HOST:PORT/DB (backfill/stream write it; serve, serve-lookup read it)
# namespace: ff:v1              # Redis key namespace
runner:
  flags: ["--runner=FnApiRunner"]   # Beam flags for backfill, stream and demo
serve:
  host: 127.0.0.1
  port: 8000
  # token_env: FINFEAT_SERVE_TOKEN  # name of the environment variable holding the bearer token
  # model: models/latest            # model folder of `finfeat train`; enables POST /score
"""


class ConfigError(ValueError):
    """The project file is missing, unreadable or invalid; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Suites(_Strict):
    features: str | None = None


class Runner(_Strict):
    flags: list[str] = Field(default_factory=list)

    @field_validator("flags")
    @classmethod
    def _flags(cls, flags: list[str]) -> list[str]:
        bad = [f for f in flags if not f.startswith("--")]
        if bad:
            raise ValueError(f"each Beam flag starts with --, e.g. --runner=PrismRunner; got {bad}")
        return flags


class Serve(_Strict):
    host: str | None = None
    port: int | None = Field(default=None, ge=0, le=65535)
    token_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    model: str | None = None
    workers: int | None = Field(default=None, ge=1)


class ProjectConfig(_Strict):
    """The keys of ``finfeat.yaml``."""

    warehouse: str | None = None
    mapping: str | None = None
    feature_spec: str | None = None
    suites: Suites = Field(default_factory=Suites)
    online_store: str | None = None
    namespace: str | None = None
    runner: Runner = Field(default_factory=Runner)
    serve: Serve = Field(default_factory=Serve)

    @field_validator("online_store")
    @classmethod
    def _store(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("sqlite:", "redis://", "rediss://", "unix://")):
            raise ValueError(f"{url!r} is not a store URL: use sqlite:PATH or redis://HOST:PORT/DB")
        return url

    def flag_defaults(self, base: Path) -> dict[str, Any]:
        """argparse ``dest`` -> default, for every flag this file sets."""
        def path(p: str | None) -> str | None:
            if p is None or Path(p).is_absolute() or base == Path.cwd():
                return p
            return str(base / p)

        def named_or_path(v: str | None) -> str | None:
            return path(v) if v is not None and v.endswith((".yaml", ".yml")) else v

        store = self.online_store
        if store and store.startswith("sqlite:") and not store.startswith("sqlite:/"):
            store = f"sqlite:{path(store[len('sqlite:'):])}"
        out = {"warehouse": path(self.warehouse), "mapping": named_or_path(self.mapping),
               "feature_spec": path(self.feature_spec), "feature_suite": named_or_path(self.suites.features),
               "online_store": store, "store": store, "namespace": self.namespace,
               "host": self.serve.host, "port": self.serve.port, "token_env": self.serve.token_env,
               "model": path(self.serve.model), "workers": self.serve.workers}
        return {k: v for k, v in out.items() if v is not None}


def describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err.get("loc", ()))
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown key (known: " + ", ".join(_known(err.get("loc", ()))) + ")"
        parts.append(f"{key}: {msg}")
    return "; ".join(parts)


def _known(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = ProjectConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            break
        model = field.annotation
    return list(model.model_fields)


def load(path: str | Path) -> ProjectConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist (`finfeat init` writes one)")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the file must be a mapping of keys (warehouse: ..., mapping: ...)")
    try:
        return ProjectConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{p}: {describe(exc)}") from None


def split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    """``--config PATH`` (anywhere) out of argv: (path or None, the rest)."""
    out: list[str] = []
    path = None
    it = iter(range(len(argv)))
    for i in it:
        a = argv[i]
        if a == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a path, e.g. --config finfeat.yaml")
            path = argv[i + 1]
            next(it, None)
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
        else:
            out.append(a)
    return path, out


def find(explicit: str | None) -> Path | None:
    """The project file to use: ``--config`` or ``./finfeat.yaml`` (None when neither)."""
    if explicit:
        return Path(explicit)
    here = Path.cwd() / CONFIG_NAME
    return here if here.is_file() else None


#: Flags the file does not set: `score --json` without --store scores a feature row, so a store
#: from the file would change what the same command means.
NOT_FROM_FILE = {("score", "store")}


def apply(parser: argparse.ArgumentParser, config: ProjectConfig, base: Path) -> None:
    """Make the file's values the defaults of the matching flags of every sub-command (a flag
    the file sets is no longer required)."""
    defaults = config.flag_defaults(base)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                for a in sub._actions:
                    if a.dest in defaults and a.option_strings and (name, a.dest) not in NOT_FROM_FILE:
                        a.default = defaults[a.dest]
                        a.required = False


# ----------------------------------------------------------------------------------- finfeat init


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("init", help=f"write a {CONFIG_NAME} project file here",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              allow_abbrev=False)
    p.add_argument("--path", default=CONFIG_NAME, help=f"where to write it (default ./{CONFIG_NAME})")
    p.add_argument("--mapping", default="sparkov", help="input mapping to put in it (default sparkov)")
    p.add_argument("--online-store", dest="init_store", default="sqlite:online.db",
                   help="online store URL to put in it (default sqlite:online.db)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    return p


def run(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.exists() and not args.force:
        print(f"finfeat init: error: {path} exists; pass --force to overwrite it", file=sys.stderr)
        return 2
    text = TEMPLATE.format(mapping=args.mapping, online_store=args.init_store)
    ProjectConfig.model_validate(yaml.safe_load(text))  # the template itself is valid
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}: every finfeat command run in {path.parent.resolve() if path.parent != Path('.') else 'this folder'}"
          f" reads it{'' if path.name == CONFIG_NAME else ' with --config ' + str(path)}; flags override it")
    return 0


def config_for(argv: list[str]) -> tuple[ProjectConfig | None, Path | None, list[str]]:
    """(config, its folder, argv without --config) for :func:`finfeat.jobs.cli.main`."""
    explicit, rest = split_config_flag(argv)
    path = find(explicit)
    if path is None:
        return None, None, rest
    if "init" in rest[:2]:
        return None, None, rest  # init never reads the file it writes
    return load(path), path.resolve().parent if explicit else Path.cwd(), rest


__all__ = ["CONFIG_NAME", "ConfigError", "ProjectConfig", "apply", "config_for", "load"]
