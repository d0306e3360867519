"""Great Expectations for stage validate: an in-memory context, one suite per table run against
pandas frames, each result reduced to the report's entry, and the Data Docs site.

Checks arrive named (``<split>/<check>``); the name travels in each expectation's ``meta`` so the
results, which GX reorders, find their check again.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd


def outcome(result, examples: int) -> dict:
    """One check's entry in the report, from a GX ExpectationValidationResult."""
    res, info = result.result or {}, result.exception_info or {}
    # A failed metric nests its exception under the metric's id; a failed expectation does not.
    errors = [e for e in (info, *info.values()) if isinstance(e, dict)]
    errors = [e["exception_message"] for e in errors if e.get("raised_exception")]
    kwargs = result.expectation_config.kwargs
    column = kwargs.get("column")
    if "partial_unexpected_index_list" in res:  # class-balance rows: show the class, not the number
        rows = res["partial_unexpected_index_list"]
        shown = [f"{d['class']}: {column}={d[column]:.4g}" for d in rows]
    else:
        shown = [None if pd.isna(x) else x for x in res.get("partial_unexpected_list", [])]
    return {
        "success": bool(result.success),
        "unexpected_count": int(res.get("unexpected_count", 0 if result.success else 1)),
        "expectation": result.expectation_config.type,
        "column": column,
        # the bounds, set or pattern checked: min_value=5, mostly=0.95, value_set=[...]
        "expected": {k: v for k, v in kwargs.items() if k not in ("batch_id", "column")},
        "examples": shown[:examples],
        "error": errors[0] if errors else None,
    }


def make_context():
    """An in-memory GX context, without progress bars or the temp-dir docs site GX adds unasked."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        progress_bars={"globally": False, "metric_calculations": False},
        analytics_enabled=False,
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def validate_tables(context, derived: dict, checks: dict, examples: int,
                    index_columns: dict[str, list[str]] | None = None) -> dict[str, dict]:
    """One suite and ValidationDefinition per table; outcomes keyed by check name.

    ``index_columns``: tables whose failed rows are named by these columns (the class of a
    class-balance row) rather than by their value.
    """
    import great_expectations as gx

    sources = context.data_sources.all()
    source = sources["interim"] if "interim" in sources else context.data_sources.add_pandas("interim")
    results = {}
    for table, named in checks.items():
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all rows")
        suite = context.suites.add(gx.ExpectationSuite(name=table))
        for name, exp in named:
            exp.meta = {"check": name}  # GX reorders results; the name finds each one again
            suite.add_expectation(exp)
        definition = gx.ValidationDefinition(name=table, data=batch, suite=suite)
        fmt = {"result_format": "BASIC", "partial_unexpected_count": examples}
        if table in (index_columns or {}):  # SUMMARY carries the named index columns
            fmt |= {"result_format": "SUMMARY", "unexpected_index_column_names": index_columns[table]}
        run = context.validation_definitions.add(definition).run(
            batch_parameters={"dataframe": derived[table]}, result_format=fmt
        )
        results |= {r.expectation_config.meta["check"]: outcome(r, examples) for r in run.results}
        # GX's execution engine keeps every batch's data for the data source's life: drop it, or
        # validating a split batch by batch would end up holding the whole split.
        manager = source.get_execution_engine().batch_manager
        manager.batch_data_cache.clear()
        manager.reset_batch_cache()
    return results


def build_docs(context, docs_dir: Path) -> None:
    """Render Data Docs into docs_dir, wiped first so no page of an earlier run survives."""
    shutil.rmtree(docs_dir, ignore_errors=True)
    # An ephemeral context has no root directory to resolve a relative base_directory against.
    store = {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())}
    site = {"class_name": "SiteBuilder", "show_how_to_buttons": False, "store_backend": store}
    context.add_data_docs_site(site_name="lmforge", site_config=site)
    context.build_data_docs(site_names=["lmforge"])
