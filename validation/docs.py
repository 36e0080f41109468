"""Reports of a validation: GX Data Docs (static HTML) plus a one-page finfeat summary.

GX Data Docs are built by a *file-backed* GX context: :func:`build_data_docs` creates (or reuses)
one under ``<docs>/gx``, runs the suite there through a Checkpoint, records finfeat's verdict, the
data validated and the finfeat run in the stored result (``meta["finfeat"]``) and builds the
site. The site is plain static files (``<docs>/gx/uncommitted/data_docs/local_site/index.html``),
no server; it keeps the history of earlier runs in the same folder. Its pages are self-contained
(no stylesheet, script or image from another host) and show finfeat's verdict, see
:mod:`finfeat.validation._docs_site`. That run uses ``result_format: SUMMARY`` (a sample of
offending values for people to read), so it is a second GX validation beside the one that
decides the outcome.

:func:`write_summary` writes ``<docs>/index.html`` (verdict, expectation results, quarantine
counts and the PSI table in one page, linking to the Data Docs site) and ``<docs>/report.json``.
"""
from __future__ import annotations

import html
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from finfeat.validation import _gx
from finfeat.validation.drift import DriftResult
from finfeat.validation.suite import Suite
from finfeat.validation.validate import ValidationOutcome

DOCS_SITE = Path("gx") / "uncommitted" / "data_docs" / "local_site" / "index.html"
SITE_NAME = "local_site"

#: finfeat's verdict on a run: ``failed`` when a check failed (the exit code is 1), ``passed with
#: warnings`` when only ``warn`` expectations broke, rows would be quarantined within the allowed
#: share, or a PSI reached the warn threshold, else ``passed``.
Verdict = Literal["passed", "passed with warnings", "failed"]
#: How the CLI and the summary page write a verdict.
VERDICT_LABEL: dict[str, str] = {"passed": "PASSED", "passed with warnings": "PASSED with warnings",
                                 "failed": "FAILED"}


def verdict_of(*, failures: list[str], outcome: ValidationOutcome, drift: list[DriftResult]) -> Verdict:
    """finfeat's verdict (see :data:`Verdict`) on a validation and its drift report."""
    if failures:
        return "failed"
    if outcome.warnings or outcome.quarantined.num_rows or any(d.status != "ok" for d in drift):
        return "passed with warnings"
    return "passed"


def build_data_docs(table: pa.Table, suite: Suite, docs_dir: str | Path, *, verdict: Verdict, asset: str,
                    run_name: str, run_id: str | None = None) -> Path:
    """Validate ``table`` in a file-backed GX context under ``docs_dir`` and build its Data Docs.

    ``verdict`` is finfeat's (the pages show it instead of GX's all-expectations-met flag),
    ``asset`` names the data validated (suite, table, version, selection), ``run_name`` is GX's
    run name (the finfeat run that wrote the data, say), ``run_id`` the finfeat run shown beside
    it. Returns the path of the site's ``index.html``.
    """
    gx = _gx.gx()
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import ExpectationSuiteIdentifier

    from finfeat.validation import _docs_site

    docs_dir = Path(docs_dir).resolve()
    docs_dir.mkdir(parents=True, exist_ok=True)
    context = _gx.quiet_context(gx.get_context(mode="file", project_root_dir=str(docs_dir)))
    site = _docs_site.site_config()
    sites = context.list_data_docs_sites()
    rebuild_all = sites.get(SITE_NAME) != site      # a site built before (GX's CDN pages): rebuild every page
    if SITE_NAME in sites:
        if rebuild_all:
            context.update_data_docs_site(SITE_NAME, site)
    else:
        context.add_data_docs_site(SITE_NAME, site)
    try:
        source = context.data_sources.get("finfeat")
    except (KeyError, ValueError, LookupError):
        source = context.data_sources.add_pandas("finfeat")
    try:
        asset_obj = source.get_asset(suite.name)
    except (KeyError, LookupError):
        asset_obj = source.add_dataframe_asset(suite.name)
    try:
        batch_definition = asset_obj.get_batch_definition("whole")
    except (KeyError, LookupError):
        batch_definition = asset_obj.add_batch_definition_whole_dataframe("whole")
    gx_suite = context.suites.add_or_update(
        gx.ExpectationSuite(name=suite.name, expectations=[r.to_gx() for r in suite.rules]))
    definition = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=f"finfeat_{suite.name}", data=batch_definition, suite=gx_suite))
    checkpoint = context.checkpoints.add_or_update(gx.Checkpoint(
        name=f"finfeat_{suite.name}", validation_definitions=[definition], actions=[],
        result_format={"result_format": "SUMMARY", "partial_unexpected_count": 20}))
    frame = _gx.to_frame(table, suite.columns)
    run = checkpoint.run(batch_parameters={"dataframe": frame},
                         run_id=RunIdentifier(run_name=run_name, run_time=datetime.now(timezone.utc)))
    keys = []
    for key, result in run.run_results.items():
        # finfeat's annotation, stored with the result so that later rebuilds of the site keep it
        result.meta[_docs_site.META_KEY] = {"verdict": verdict, "asset": asset, "run_id": run_id}
        context.validation_results_store.set(key, result)
        keys.append(key)
    context.build_data_docs(site_names=[SITE_NAME], resource_identifiers=None if rebuild_all else
                            [*keys, ExpectationSuiteIdentifier(name=suite.name)])
    index = docs_dir / DOCS_SITE
    if not index.is_file():
        raise RuntimeError(f"GX did not write its Data Docs to {index}")
    return index


def report_dict(*, target: dict[str, Any], outcome: ValidationOutcome, drift: list[DriftResult],
                exit_code: int, failures: list[str], data_docs: Path | None) -> dict[str, Any]:
    return {
        "target": target, "exit_code": exit_code, "failures": failures,
        "verdict": verdict_of(failures=failures, outcome=outcome, drift=drift),
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
    status = VERDICT_LABEL[report["verdict"]]
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
    if target.get("reference"):
        drift_section = (f"<h2>Drift: PSI against {e(str(target['reference']))}</h2>\n<table><tr><th>feature</th>"
                         f"<th>PSI</th><th>status</th><th>bins</th></tr>{''.join(drift_rows)}</table>")
    else:
        drift_section = ("<h2>Drift: no reference</h2>\n<p>No reference was given, so no population stability "
                         "index was computed. Give <code>--reference-version N</code> and/or "
                         "<code>--reference-start D --reference-end D</code> to compare with earlier data.</p>")
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
{drift_section}
</body></html>
"""
    index = docs_dir / "index.html"
    index.write_text(page)
    return index
