"""Reports of a validation: GX Data Docs (static HTML) plus a one-page finfeat summary.

GX Data Docs are built by a *file-backed* GX context: :func:`build_data_docs` creates (or reuses)
one under ``<docs>/gx`` and runs the suite there through a Checkpoint with an
``UpdateDataDocsAction``. The site is plain static files (``<docs>/gx/uncommitted/data_docs/
local_site/index.html``), no server; it keeps the history of earlier runs in the same folder.
That run uses ``result_format: SUMMARY`` (a sample of offending values for people to read), so
it is a second GX validation beside the one that decides the outcome.

:func:`write_summary` writes ``<docs>/index.html`` (expectation results, quarantine counts and
the PSI table in one page, linking to the Data Docs site) and ``<docs>/report.json``.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from finfeat.validation import _gx
from finfeat.validation.drift import DriftResult
from finfeat.validation.suite import Suite
from finfeat.validation.validate import ValidationOutcome

DOCS_SITE = Path("gx") / "uncommitted" / "data_docs" / "local_site" / "index.html"


def build_data_docs(table: pa.Table, suite: Suite, docs_dir: str | Path) -> Path:
    """Validate ``table`` in a file-backed GX context under ``docs_dir`` and build its Data Docs.

    Returns the path of the site's ``index.html``.
    """
    gx = _gx.gx()
    docs_dir = Path(docs_dir).resolve()
    docs_dir.mkdir(parents=True, exist_ok=True)
    context = _gx.quiet_context(gx.get_context(mode="file", project_root_dir=str(docs_dir)))
    try:
        source = context.data_sources.get("finfeat")
    except (KeyError, ValueError, LookupError):
        source = context.data_sources.add_pandas("finfeat")
    try:
        asset = source.get_asset(suite.name)
    except (KeyError, LookupError):
        asset = source.add_dataframe_asset(suite.name)
    try:
        batch_definition = asset.get_batch_definition("whole")
    except (KeyError, LookupError):
        batch_definition = asset.add_batch_definition_whole_dataframe("whole")
    gx_suite = context.suites.add_or_update(
        gx.ExpectationSuite(name=suite.name, expectations=[r.to_gx() for r in suite.rules]))
    definition = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=f"finfeat_{suite.name}", data=batch_definition, suite=gx_suite))
    checkpoint = context.checkpoints.add_or_update(gx.Checkpoint(
        name=f"finfeat_{suite.name}", validation_definitions=[definition],
        actions=[gx.checkpoint.UpdateDataDocsAction(name="update_data_docs")],
        result_format={"result_format": "SUMMARY", "partial_unexpected_count": 20}))
    frame = _gx.to_frame(table, suite.columns)
    checkpoint.run(batch_parameters={"dataframe": frame})
    index = docs_dir / DOCS_SITE
    if not index.is_file():
        raise RuntimeError(f"GX did not write its Data Docs to {index}")
    return index


def report_dict(*, target: dict[str, Any], outcome: ValidationOutcome, drift: list[DriftResult],
                exit_code: int, failures: list[str], data_docs: Path | None) -> dict[str, Any]:
    return {
        "target": target, "exit_code": exit_code, "failures": failures,
        "validation": outcome.summary(),
        "expectations": [{"name": r.name, "policy": r.policy, "type": r.type, "success": r.success,
                          "unexpected_count": r.unexpected_count, "observed": r.observed,
                          "examples": list(r.examples), "error": r.error, "skipped": r.skipped}
                         for r in outcome.results],
        "drift": [vars(d) for d in drift],
        "data_docs": str(data_docs) if data_docs else None,
    }


def write_summary(docs_dir: str | Path, report: dict[str, Any]) -> Path:
    """``<docs>/index.html`` and ``<docs>/report.json`` from :func:`report_dict`."""
    docs_dir = Path(docs_dir)
    docs_dir.mkdir(parents=True, exist_ok=True)
    (docs_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    e = html.escape
    status = "PASSED" if report["exit_code"] == 0 else "FAILED"
    rows = []
    for r in report["expectations"]:
        if r["skipped"]:
            state = "skipped"
        elif r["error"]:
            state = "error"
        elif r["unexpected_count"] or not r["success"]:
            state = {"warn": "warn", "drop": "quarantine", "fail": "FAIL"}[r["policy"]]
        else:
            state = "ok"
        detail = r["error"] or "; ".join(r["examples"]) or (r["observed"] or "")
        count = "" if r["unexpected_count"] is None else f"{r['unexpected_count']:,}"
        rows.append(f"<tr class='{e(state)}'><td>{e(r['name'])}</td><td>{e(r['policy'])}</td><td>{e(state)}</td>"
                    f"<td class='n'>{count}</td><td>{e(r['type'])}</td><td>{e(detail)}</td></tr>")
    drift_rows = [f"<tr class='{e(d['status'])}'><td>{e(d['column'])}</td><td class='n'>{d['psi']:.4f}</td>"
                  f"<td>{e(d['status'])}</td><td class='n'>{d['bins']}</td></tr>" for d in report["drift"]]
    target = report["target"]
    docs_link = ""
    if report["data_docs"]:
        rel = Path(report["data_docs"]).resolve().relative_to(docs_dir.resolve())
        docs_link = f"<p>GX Data Docs: <a href='{e(rel.as_posix())}'>{e(rel.as_posix())}</a></p>"
    failures = "".join(f"<li>{e(f)}</li>" for f in report["failures"]) or "<li>none</li>"
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>finfeat validate: {e(status)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }} table {{ border-collapse: collapse; margin-bottom: 2em; }}
td, th {{ border: 1px solid #ccc; padding: 2px 8px; font-size: 90%; }} td.n {{ text-align: right; }}
tr.FAIL td, tr.fail td, tr.error td {{ background: #fdd; }} tr.warn td {{ background: #ffd; }}
tr.quarantine td {{ background: #fec; }}
</style></head><body>
<h1>finfeat validate: {e(status)}</h1>
<p>table <code>{e(str(target.get('table')))}</code>, version {e(str(target.get('version')))},
selection {e(str(target.get('selection')))}: {report['validation']['rows']:,} rows, suite
<code>{e(report['validation']['suite'])}</code>, exit code {report['exit_code']}</p>
{docs_link}
<h2>Failures</h2><ul>{failures}</ul>
<h2>Expectations</h2>
<table><tr><th>expectation</th><th>policy</th><th>result</th><th>rows</th><th>type</th><th>detail</th></tr>
{''.join(rows)}</table>
<h2>Drift (PSI against {e(str(target.get('reference')))})</h2>
<table><tr><th>feature</th><th>PSI</th><th>status</th><th>bins</th></tr>{''.join(drift_rows) or '<tr><td colspan=4>no reference given</td></tr>'}</table>
</body></html>
"""
    index = docs_dir / "index.html"
    index.write_text(page)
    return index
