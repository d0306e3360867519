"""Stage align: after train, optimize the model on preferences (DPO family) or with programmable
rewards (GRPO); off by default. docs/alignment.md says when to use which.

    python -m stages.align     # normally via `dvc repro align`; reads `align`, `data`, `model`, `paths`

``align.method: none`` loads nothing: it writes ``paths.aligned/align.json`` alone, an empty
summary and a curves file with no rows, and evaluate, export and package read train's model as
before, so nothing downstream changes. ``dpo`` and ``grpo`` start from train's model
(``paths.model``), which also serves as the frozen reference, and write the aligned model to
``paths.aligned``, its summary to ``paths.align_metrics`` and one row per step to
``paths.align_plots/steps.csv``, all swapped in together; curves and summary also go into the
pipeline's MLflow run under ``align/``. A killed run resumes from ``paths.align_checkpoints``
(lmforge/alignment/loop.py).
"""

from __future__ import annotations

import time
from pathlib import Path

from lmforge.alignment import ALIGN_FILE, NONE
from lmforge.common import rounded, run_main, write_aside, write_json
from lmforge.params import Params, load_params

CURVES = "steps.csv"


def write_model(policy, tokenizer, meta: dict, info: dict, folder: Path) -> None:
    """The aligned model as train writes one (LoRA merged, EOS/pad in its generation config), with
    lm.json and align.json (what evaluate needs to score it)."""
    from lmforge.causal_lm.model import for_export

    folder.mkdir()
    for_export(policy, meta).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    write_json(folder / "lm.json", meta)
    write_json(folder / ALIGN_FILE, info)
    for f in folder.iterdir():  # a server reading the model may be another user
        f.chmod(0o644)


def log_to_run(params: Params, curves: list[dict], summary: dict, files: list[Path],
               model_dir: Path) -> None:
    """Curves (per step), summary and files into the pipeline's run, under align/; and
    (tracking.log_model) the aligned model, which gate then registers instead of train's."""
    import mlflow
    from mlflow.entities import Metric

    from lmforge import tracking
    from lmforge.alignment.data import read_split

    with tracking.resume_run(params) as run:
        now = int(time.time() * 1000)
        points = [Metric(f"align/{k}", float(v), now, row["step"])
                  for row in curves for k, v in row.items() if k != "step"]
        client = mlflow.MlflowClient(tracking.tracking_uri(params.tracking))
        for start in range(0, len(points), 1000):  # MLflow's batch limit
            client.log_batch(run.info.run_id, metrics=points[start : start + 1000])
        mlflow.log_metrics({f"align/{k}": float(v) for k, v in summary.items()
                            if isinstance(v, int | float) and not isinstance(v, bool)})
        mlflow.set_tags(tracking.flat_params(params, ("align",)))  # tags: a re-run may change them
        for f in files:
            mlflow.log_artifact(str(f), "align")
        if params.tracking.log_model:
            prompts = read_split(params.paths.interim, "train", {params.data.prompt_column: "p"})
            tracking.log_model(params, model_dir, prompts["p"].head(3).tolist(), tracking.ALIGNED)


def write_curves(curves: list[dict], path: Path) -> None:
    import pandas as pd

    pd.DataFrame(curves).to_csv(path, index=False)


def align(params: Params) -> tuple:
    """Run the method: (policy, tokenizer, meta, curves, summary, checkpoints)."""
    from lmforge.alignment import dpo, grpo, loop

    cfg, started = params.align, time.perf_counter()
    policy, reference, tokenizer, meta = loop.load_models(params)
    steps = (dpo.DpoSteps if cfg.method == "dpo" else grpo.GrpoSteps)(
        params, policy, reference, tokenizer, meta)
    ckpts = loop.Checkpoints(params.paths.align_checkpoints, loop.fingerprint(params),
                             cfg.checkpoint_every_n_steps)
    curves = loop.run(params, policy, steps.step, ckpts)
    summary = {"aligned": True, "steps": len(curves), **steps.test_metrics(),
               "align_time_s": time.perf_counter() - started}
    return policy, tokenizer, meta, curves, rounded(summary), ckpts


def main(params: Params | None = None) -> dict:
    params = params or load_params()
    paths, cfg = params.paths, params.align
    outputs = (paths.aligned, paths.align_metrics, paths.align_plots)
    if cfg.method == NONE:  # nothing to load or learn: a marker, and the later stages read train's model
        with write_aside(*outputs) as (model_dir, metrics_file, plots_dir):
            model_dir.mkdir()
            plots_dir.mkdir()
            (plots_dir / CURVES).write_text("step,loss\n")  # no rows; git keeps no empty folder
            write_json(model_dir / ALIGN_FILE, {"method": NONE})
            write_json(metrics_file, {"aligned": False})
        print(f"align: method none -> {paths.model} is the model the later stages read")
        return {"aligned": False}
    from lmforge import tracking
    from lmforge.alignment.data import columns

    tracking.run_id(paths.run_info)  # fail before the slow part when train never ran
    policy, tokenizer, meta, curves, summary, ckpts = align(params)
    info = {"method": cfg.method, "columns": columns(params.data, cfg.method == "dpo"),
            cfg.method: getattr(cfg, cfg.method).model_dump(mode="json")}
    with write_aside(*outputs) as (model_dir, metrics_file, plots_dir):
        write_model(policy, tokenizer, meta, info, model_dir)
        plots_dir.mkdir()
        write_curves(curves, plots_dir / CURVES)
        write_json(metrics_file, summary)
        log_to_run(params, curves, summary, [metrics_file, plots_dir / CURVES], model_dir)
    ckpts.finish()
    print(f"align: {summary} -> {paths.aligned}")
    return summary


if __name__ == "__main__":
    run_main(main)
