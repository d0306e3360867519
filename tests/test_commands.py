"""The `lmforge` command's own options: --version, `exp` (the experiments table), the old `gate` name.
`compare` is tests/test_compare.py's, `params` tests/test_examples.py's, `plots` tests/test_plots.py's;
`lmforge exp` against a real `dvc exp show` is in tests/test_experiments.py."""

from __future__ import annotations

from importlib.metadata import version

import pytest

from lmforge import cli, experiments
from lmforge.tasks import TASKS


def run_cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    return done.value.code


def test_version_is_the_installed_package_version(capsys):
    assert run_cli(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"lmforge {version('lmforge')}"


def test_gate_is_the_old_name_of_compare_and_says_so(monkeypatch, capsys):
    import lmforge.compare

    seen = []
    monkeypatch.setattr(lmforge.compare, "run", lambda args: seen.append(args.against) or 0)
    assert run_cli(["compare", "--against", "v1"]) == 0
    assert capsys.readouterr().err == ""
    assert run_cli(["gate", "--against", "v2"]) == 0
    assert "`lmforge gate` is now `lmforge compare`" in capsys.readouterr().err
    assert seen == ["v1", "v2"]


# --- lmforge exp: rows of `dvc exp show --json` ----------------------------------------------------

EVAL = "metrics/eval.json"


def data(task: str = "classification", lr: float = 1e-4, metrics: dict | None = None, **train) -> dict:
    """One row's `data` as `dvc exp show --json` gives it (params and metrics files)."""
    chart = "perplexity" if task == "causal_lm" else "confusion"
    params = {"task": task, "paths": {"model": f"models/{task}"},
              "plots": {chart: {f"plots/eval/{chart}.csv": "y"}},
              "data": {"prompt_column": "prompt" if task == "causal_lm" else None},
              "train": {"learning_rate": lr, "max_epochs": 3, "batch_size": 16, **train}}
    files = {EVAL: {"data": metrics}} if metrics is not None else {}
    return {"params": {"params.yaml": {"data": params}}, "metrics": files}


def experiment(name: str, row: dict | None, state: str | None = None) -> dict:
    return {"name": name, "executor": {"state": state} if state else None,
            "revs": [{"rev": "f" * 40, "name": name, "data": row, "error": None}]}


SCORES = {"accuracy": 0.85, "f1_macro": 0.8, "f1_weighted": 0.84, "loss": 0.5,
          "per_class": {"negative": {"f1": 0.8}}}
SHOW = [
    {"rev": "workspace", "name": None, "data": data(metrics=SCORES), "error": None},
    {"rev": "a" * 40, "name": "main", "data": data(metrics=SCORES), "error": None, "experiments": [
        experiment("lr-high", data(lr=3e-4, weight_decay=0.1, metrics={**SCORES, "accuracy": 0.9})),
        experiment("lr-low", None, state="queued"),
    ]},
]


def test_exp_table_keeps_name_key_params_changed_params_and_headline_metrics():
    lines = experiments.table(experiments.rows_of(SHOW, EVAL)).splitlines()
    assert lines[0].split() == ["experiment", "task", "train.learning_rate", "train.max_epochs",
                                "train.batch_size", "train.weight_decay", "accuracy", "f1_macro",
                                "state"]
    assert lines[1].split() == ["workspace", "classification", "0.0001", "3", "16", "-", "0.85",
                                "0.8"]
    assert lines[3].split() == ["lr-high", "classification", "0.0003", "3", "16", "0.1", "0.9", "0.8"]
    assert lines[3].startswith("  lr-high")  # an experiment sits under its baseline
    assert lines[4].split() == ["lr-low", *["-"] * 7, "queued"]
    # paths differ between tasks, never between experiments worth comparing; per-label and other
    # metrics are what `dvc exp show` adds to every row
    assert "paths." not in lines[0] and "per_class" not in lines[0] and "loss" not in lines[0]


@pytest.mark.parametrize("entry", TASKS.values(), ids=lambda t: t.name)
@pytest.mark.parametrize("pairs", [False, True], ids=["text", "pairs"])
def test_exp_metric_columns_are_each_tasks_headline_from_the_catalogue(entry, pairs):
    """New headline metrics in lmforge/tasks.py become columns with no edit of lmforge exp."""
    row = data(task=entry.name, metrics={m: 1.0 for m in entry.eval_metrics(pairs)})
    row["params"]["params.yaml"]["data"]["data"]["prompt_column"] = "prompt" if pairs else None
    rows = experiments.rows_of([{"rev": "workspace", "data": row, "error": None}], EVAL)
    assert experiments.headline(rows) == list(entry.headline_metrics(pairs))


def test_exp_of_two_tasks_shows_both_headlines_in_catalogue_order():
    show = [{"rev": "workspace", "data": data(metrics=SCORES), "error": None, "experiments": [
        experiment("lm", data(task="causal_lm", metrics={"perplexity": 9.9, "bleu": 3.0}))]}]
    rows = experiments.rows_of(show, EVAL)
    assert experiments.headline(rows) == [*TASKS["classification"].headline_metrics(False),
                                          *TASKS["causal_lm"].headline_metrics(True)]
    head, _, lm = (line.split() for line in experiments.table(rows).splitlines())
    assert lm[0] == "lm" and lm[-3:] == ["9.9", "3", "-"]  # perplexity, bleu, rougeL
    # They differ, but follow the task: where files go and which charts `dvc plots` draws.
    assert [c for c in head if c.startswith(("paths.", "plots."))] == []
    assert "data.prompt_column" in head  # a param that does tell the two apart
    assert "state" not in head  # every run finished
