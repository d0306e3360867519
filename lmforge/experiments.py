"""`lmforge exp`: the experiments table, cut to the columns that tell experiments apart.

    lmforge exp          # the workspace, its commit and that commit's experiments
    lmforge exp -A       # every commit's

Run from the repo root. Plain `dvc exp show` lists every param, every metric (one per validation
check, per label, per export runtime) and every dependency hash. This reads the same data
(`dvc exp show --json`) and keeps: the experiment's name, the params in KEY_PARAMS plus every other
param whose value differs between the rows, and the headline test metrics (``paths.eval_metrics``)
of each row's task, as lmforge/tasks.py declares them, so a new headline metric shows up here
without an edit.
"""

from __future__ import annotations

import json
import subprocess
import sys

from lmforge.common import UserError, is_number
from lmforge.tasks import TASKS

KEY_PARAMS = ("task", "train.learning_rate", "train.max_epochs", "train.batch_size")
# Params that differ between rows without telling experiments apart: where a run's files go and
# which charts `dvc plots` draws (both follow the task).
NOT_COMPARED = ("paths.", "plots.")


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"train": {"learning_rate": 1e-4}} -> {"train.learning_rate": 1e-4}; lists stay values."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def file_data(data: dict, kind: str, path: str) -> dict:
    """The contents of one params or metrics file in a row of `dvc exp show --json` ({} if none)."""
    return ((data or {}).get(kind) or {}).get(path, {}).get("data") or {}


def rows_of(show: list[dict], metrics_file: str) -> list[dict]:
    """One row per baseline and per experiment: name, flattened params, eval metrics, state."""
    rows = []
    for base in show:
        name = base.get("name") or ("workspace" if base["rev"] == "workspace" else base["rev"][:7])
        rows.append(row(name, base.get("data"), base.get("error")))
        for exp in base.get("experiments") or []:
            rev = (exp.get("revs") or [{}])[0]
            state = ((exp.get("executor") or {}).get("state") or "").replace("success", "")
            rows.append(row(exp.get("name") or rev.get("rev", "?")[:7], rev.get("data"),
                            rev.get("error"), state, indent=True))
    for r in rows:
        r["metrics"] = file_data(r.pop("data"), "metrics", metrics_file)
    return rows


def row(name: str, data: dict | None, error: dict | None, state: str = "",
        indent: bool = False) -> dict:
    return {"name": ("  " if indent else "") + name, "data": data,
            "params": flatten(file_data(data, "params", "params.yaml")),
            "state": "error" if error else state}


def headline(rows: list[dict]) -> list[str]:
    """The headline test metrics of the rows' tasks, in catalogue order (pairs: BLEU, ROUGE too)."""
    names: list[str] = []
    for entry in TASKS.values():
        mine = [r for r in rows if r["params"].get("task") == entry.name]
        pairs = any(r["params"].get("data.prompt_column") for r in mine)
        names += [m for m in entry.headline_metrics(pairs) if mine and m not in names]
    return names


def param_columns(rows: list[dict]) -> list[str]:
    """KEY_PARAMS, then every other param whose value differs between the rows."""
    keys = dict.fromkeys(k for r in rows for k in r["params"])
    differ = [k for k in keys if k not in KEY_PARAMS and not k.startswith(NOT_COMPARED)
              and len({json.dumps(r["params"].get(k)) for r in rows}) > 1]
    return [*KEY_PARAMS, *differ]


def fmt(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:.6g}" if is_number(value) else str(value)


def table(rows: list[dict]) -> str:
    """Fixed-width text: experiment, params, headline metrics, and the state of a queued, running
    or failed one (no state column when every row finished); one row per line."""
    params, metrics = param_columns(rows), headline(rows)
    state = ["state"] if any(r["state"] for r in rows) else []
    head = ["experiment", *params, *metrics, *state]
    cells = [head] + [[r["name"], *(fmt(r["params"].get(p)) for p in params),
                       *(fmt(r["metrics"].get(m)) for m in metrics), *([r["state"]] if state else [])]
                      for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in cells)
    return "\n".join(line.rstrip() for line in lines)


def run(args) -> int:
    """Print the table; 0 (a failing `dvc exp show` raises UserError: exit 2)."""
    from lmforge.params import load_params

    metrics_file = load_params().paths.eval_metrics.as_posix()
    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--json", *(["-A"] if args.all_commits else [])]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        said = [line for line in done.stderr.splitlines() if line.strip()] or [f"exit {done.returncode}"]
        raise UserError(f"`dvc exp show` failed: {said[-1]}")
    print(table(rows_of(json.loads(done.stdout), metrics_file)))
    return 0
