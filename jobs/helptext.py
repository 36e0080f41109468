"""Help texts of the CLI: plain text (no reStructuredText roles or literals from docstrings), the
default of every flag shown, a description for every flag."""
from __future__ import annotations

import argparse
import re
import textwrap
from datetime import date

_ROLE = re.compile(r":(?:mod|class|func|meth|attr|data|exc|obj|ref|doc):`(~?)([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")

#: Descriptions of flags declared without one (a flag's own help text always wins).
FLAG_HELP: dict[tuple[str, str], str] = {
    ("generate", "events"): "number of transactions to write",
    ("generate", "seed"): "random seed: the same seed writes the same file",
    ("generate", "start"): "first day of the transactions, UTC (YYYY-MM-DD)",
    ("generate", "days"): "number of days the transactions span",
    ("generate", "cards"): "number of cards (default: events / 50, at least 100)",
    ("generate", "merchants"): "number of merchants, at least 32 (default: events / 1000, at least 50)",
    ("generate", "fraud_rate"): "share of fraudulent transactions, 0 to 0.5",
    ("generate", "time_resolution"): "event-time precision: s (whole seconds, ties happen) or us",
    ("train", "train_start"): "first event date of the training period, UTC, inclusive",
    ("train", "train_end"): "last event date of the training period, UTC, inclusive",
    ("train", "test_end"): "last event date of the test period, UTC, inclusive",
    ("train", "features_version"): "Delta version of the features table (default latest)",
    ("train", "labels_version"): "Delta version of the labels table (default latest)",
    ("train", "seed"): "random seed of the model",
    ("train", "n_estimators"): "number of boosted trees",
    ("train", "max_depth"): "maximum depth of a tree",
    ("train", "learning_rate"): "shrinkage per boosting round",
    ("train", "threads"): "CPU threads for xgboost",
    ("produce", "topic"): "Kafka topic to publish to",
    ("produce", "seed"): "random seed of the disorder",
    ("stream", "bootstrap"): "Kafka bootstrap servers, HOST:PORT[,HOST:PORT...]",
    ("stream", "topic"): "Kafka topic to read",
    ("stream", "warehouse"): "folder of the Delta tables",
    ("stream", "feature_spec"): "feature spec YAML (default: the built-in v1 set)",
    ("stream", "demo_key"): "tokenize with the public demo key if FINFEAT_TOKEN_KEY is unset (test data only)",
    ("serve-lookup", "merchant_id"): "the candidate's merchant id (as in the features table)",
    ("demo", "warehouse"): "folder of the Delta tables",
}


def plain(text: str | None) -> str | None:
    """Docstring text without reStructuredText roles (:class:`~a.B` -> B) or literals (``x`` -> x)."""
    if not text:
        return text
    text = _ROLE.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), text)
    return _LITERAL.sub(r"\1", text)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and appends each flag's default unless the help
    text already states it (or there is none to state)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        """Line breaks as written; only a line longer than the terminal is wrapped."""
        return "\n".join(textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
                         if len(indent + line) > width else indent + line for line in text.splitlines())

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default in (None, False, argparse.SUPPRESS) or default == []
                or "default" in text.lower() or isinstance(action, argparse._VersionAction)):
            return text
        shown = default.isoformat() if isinstance(default, date) else default
        return text + f" (default: {shown})".replace("%", "%%")


def polish(parser: argparse.ArgumentParser, command: str | None = None) -> None:
    """Plain help texts, described flags and shown defaults, for a parser and its sub-commands."""
    parser.formatter_class = HelpFormatter
    parser.description, parser.epilog = plain(parser.description), plain(parser.epilog)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                choice.help = plain(choice.help)
            for name, sub in action.choices.items():
                polish(sub, name)
            continue
        if command and not action.help and action.option_strings:
            action.help = FLAG_HELP.get((command, action.dest))
        action.help = plain(action.help)
