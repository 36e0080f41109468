"""finfeat's Data Docs site: GX's own site builder with views that work offline and finfeat's verdict.

GX Core 1.24 renders Data Docs with Jinja templates that load Bootstrap, jQuery, bootstrap-table,
Font Awesome and Vega from CDNs (none of which the package ships); offline, a page is an unstyled
list and the index page's tables, drawn by bootstrap-table, are empty. The site config written
by :func:`finfeat.validation.docs.build_data_docs` names the classes below (GX instantiates them
from ``module_name``/``class_name``, its documented way to override renderers and views):

* :class:`OfflinePageView`, :class:`OfflineIndexPageView`: GX's page views with finfeat's
  templates (``docs_site/``) searched first. They replace the page skeleton (no CDN ``<link>``
  or ``<script>``; one inlined stylesheet, ``data_docs_custom_styles.css``), the navbar (a text
  link home instead of a remote logo), the tables bootstrap-table drew (plain HTML rows), tabs
  (shown one after the other), collapsed blocks (``<details>``), charts (a note: Vega is not
  bundled) and the page filter (a few lines of plain JavaScript). Every page is one file.
* :class:`VerdictValidationResultsPageRenderer`: a validation page's header shows finfeat's
  verdict (passed / passed with warnings / failed) and the data asset finfeat validated, read
  from ``meta["finfeat"]`` of the stored result; GX's own "success" means that every
  expectation was met, ``warn`` ones included.
* :class:`VerdictSiteIndexBuilder`, :class:`VerdictSiteIndexPageRenderer`: the index lists that
  verdict and asset for each run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from great_expectations.render.components import RenderedStringTemplateContent
from great_expectations.render.renderer.page_renderer import ValidationResultsPageRenderer
from great_expectations.render.renderer.site_builder import DefaultSiteIndexBuilder
from great_expectations.render.renderer.site_index_page_renderer import SiteIndexPageRenderer
from great_expectations.render.view.view import DefaultJinjaIndexPageView, DefaultJinjaPageView
from jinja2 import ChoiceLoader, FileSystemLoader

TEMPLATES = Path(__file__).with_name("docs_site")
#: Key of finfeat's annotation in a stored validation result's ``meta``.
META_KEY = "finfeat"
VERDICTS = ("passed", "passed with warnings", "failed")
_ICON = {"passed": ("fa-check-circle", "text-success"), "passed with warnings": ("fa-exclamation-triangle",
                                                                                  "text-warning"),
         "failed": ("fa-times", "text-danger")}
_MODULE = __name__


def site_config() -> dict[str, Any]:
    """The ``data_docs_sites`` entry of finfeat's file-backed GX context (one local site)."""
    view = {"module_name": _MODULE, "class_name": "OfflinePageView"}
    return {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                          "base_directory": "uncommitted/data_docs/local_site/"},
        "site_index_builder": {
            "module_name": _MODULE, "class_name": "VerdictSiteIndexBuilder",
            "renderer": {"module_name": _MODULE, "class_name": "VerdictSiteIndexPageRenderer"},
            "view": {"module_name": _MODULE, "class_name": "OfflineIndexPageView"},
        },
        "site_section_builders": {
            "expectations": {"view": view},
            "validations": {"renderer": {"module_name": _MODULE,
                                         "class_name": "VerdictValidationResultsPageRenderer"}, "view": view},
            "profiling": {"view": view},
        },
    }


def _finfeat_loader(view: Any) -> None:
    view.env.loader = ChoiceLoader([FileSystemLoader(str(TEMPLATES)), view.env.loader])


class OfflinePageView(DefaultJinjaPageView):
    """GX's page view, rendered with finfeat's offline templates first."""

    def __init__(self, custom_styles_directory: str | None = None, custom_views_directory: str | None = None
                 ) -> None:
        super().__init__(custom_styles_directory, custom_views_directory)
        _finfeat_loader(self)


class OfflineIndexPageView(DefaultJinjaIndexPageView):
    """GX's index page view, rendered with finfeat's offline templates first."""

    def __init__(self, custom_styles_directory: str | None = None, custom_views_directory: str | None = None
                 ) -> None:
        super().__init__(custom_styles_directory, custom_views_directory)
        _finfeat_loader(self)


def _info(validation_results: Any) -> dict[str, Any]:
    info = (validation_results.meta or {}).get(META_KEY)
    return info if isinstance(info, dict) else {}


class VerdictValidationResultsPageRenderer(ValidationResultsPageRenderer):
    """GX's validation page with finfeat's verdict and data asset in its overview."""

    @classmethod
    def _render_validation_header(cls, validation_results: Any) -> Any:
        header = super()._render_validation_header(validation_results)
        info = _info(validation_results)
        params = header.subheader.string_template["params"]
        params["data_asset_name"] = info.get("asset") or validation_results.asset_name
        verdict = info.get("verdict")
        if verdict in _ICON:
            icon, colour = _ICON[verdict]
            params["status_title"] = "finfeat verdict:"
            params["success"] = verdict
            params["html_success_icon"] = f'<i class="fas {icon} {colour}" aria-hidden="true"></i>'
        broken: dict[str, list[str]] = {}
        for evr in validation_results.results:
            if not evr.success:
                meta = evr.expectation_config.meta or {}
                broken.setdefault(str(meta.get("finfeat_policy", "no policy")), []).append(
                    str(meta.get("finfeat_name") or evr.expectation_config.type))
        if broken:    # GX's rows below show met / not met; this says which policy each broken one has
            template = header.subheader.string_template
            template["template"] += "\n ${broken_title} ${broken}"
            params["broken_title"] = "Not met, by finfeat policy:"
            params["broken"] = "; ".join(f"{policy} {', '.join(names)}" for policy, names in sorted(broken.items()))
            template["styling"]["params"]["broken_title"] = {"classes": ["h6"]}
        return header

    @classmethod
    def _render_validation_info(cls, validation_results: Any) -> Any:
        table = super()._render_validation_info(validation_results)
        info = _info(validation_results)
        rows = [["finfeat verdict", info.get("verdict")], ["finfeat run", info.get("run_id")],
                ["Data", info.get("asset")]]
        table.table.extend([r for r in rows if r[1]])
        return table


class VerdictSiteIndexBuilder(DefaultSiteIndexBuilder):
    """GX's index builder; each validation row carries finfeat's verdict and data asset."""

    def _add_validations_to_index_links(self, index_links_dict: Any, validation_and_profiling_result_site_keys: Any
                                        ) -> None:
        super()._add_validations_to_index_links(index_links_dict, validation_and_profiling_result_site_keys)
        for link in index_links_dict.get("validations_links", []):
            try:
                result = self.data_context.get_validation_result(
                    batch_identifier=link["batch_identifier"], expectation_suite_name=link["expectation_suite_name"],
                    run_id=link["run_id"], validation_results_store_name=self.source_stores.get("validations"))
            except Exception:  # a result the builder itself just read: keep GX's row as it is
                continue
            info = _info(result) if hasattr(result, "meta") else {}
            if info.get("verdict") in _ICON:
                link["validation_success"] = info["verdict"]
            if info.get("asset"):
                link["asset_name"] = info["asset"]


class VerdictSiteIndexPageRenderer(SiteIndexPageRenderer):
    """GX's index page; the status cell names finfeat's verdict where a run has one."""

    @classmethod
    def _render_validation_success_cell(cls, validation_success: Any) -> Any:
        if validation_success not in _ICON:
            return super()._render_validation_success_cell(validation_success)
        icon, colour = _ICON[validation_success]
        return RenderedStringTemplateContent(
            content_block_type="string_template",
            string_template={
                "template": "$icon $verdict",
                "params": {"icon": "", "verdict": validation_success},
                "styling": {"params": {"icon": {"tag": "i", "classes": ["fas", icon, colour]}},
                            "classes": ["ge-index-page-table-validation-links-item", "finfeat-verdict"]},
            },
        )
