"""Stage train: fine-tune the sequence classifier, or train the causal LM (from scratch, fully or
with LoRA adapters), with Lightning, tracked in one MLflow run.

    python -m stages.train     # normally via `dvc repro train`; reads `task`, `model`, `prepare`, `train`

Reads ``paths.processed`` (tokenized splits, tokenizer, and labels.json or lm.json). Writes
``paths.model`` (best weights with LoRA merged, tokenizer, labels.json or lm.json),
``paths.run_info`` (the MLflow run evaluate reopens), ``paths.train_metrics`` and the curves
``loss.csv`` / ``val.csv`` in ``paths.train_plots``.
Checkpoints in ``paths.checkpoints`` outlive a run (DVC ``persist``): a run with the same params,
data and code resumes from ``last.ckpt``; anything else clears the folder and starts fresh.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L

from lmforge import tracking
from lmforge.common import read_json, run_main, sha256_of, write_aside, write_json
from lmforge.models import load_tokenizer
from lmforge.params import Params, load_params
from lmforge.tasks import CAUSAL_LM, MODEL_SECTIONS, task
from lmforge.training import fit, resume
from lmforge.training.hardware import require_hardware
from lmforge.training.lit import TextData, speed_up, write_curves

# The code a checkpoint depends on besides params and data: resuming after editing it starts afresh.
TRAINING_CODE = ("stages/train.py", "lmforge/training", "lmforge/classification/model.py",
                 "lmforge/causal_lm/model.py")


def start_module(params: Params, tokenizer, meta: dict) -> L.LightningModule:
    """What train fits: the pretrained classifier with a fresh head for ``meta``'s labels, or the
    causal LM (from scratch or pretrained, with LoRA adapters when ``model.lora`` is set)."""
    if params.task == CAUSAL_LM:
        from lmforge.causal_lm import model as lm

        return lm.CausalLM(lm.trainable_model(params, tokenizer), params.train)
    from lmforge.classification import model as clf

    model = clf.load_pretrained(params.model.source, meta, params.model.trust_remote_code)
    return clf.ClassifierModule(model, params.train)


def write_model(params: Params, module: L.LightningModule, tokenizer, meta: dict, folder: Path) -> None:
    """The model folder: the weights (causal_lm: LoRA merged, generation config), tokenizer, and
    prepare's labels.json or lm.json."""
    model = module.model
    if params.task == CAUSAL_LM:
        from lmforge.causal_lm.model import for_export

        model = for_export(model, meta)
    folder.mkdir()
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    write_json(folder / task(params.task).meta_file, meta)
    for f in folder.iterdir():  # some writers leave private (0600) files; a server may be another user
        f.chmod(0o644)


def manifest_hash(manifest: Path) -> str:
    """The source data's hash from ingest's manifest, for the run's lineage tags."""
    if not manifest.exists():
        return "unknown"
    return json.loads(manifest.read_text()).get("source_sha256", "unknown")


def log_outputs(params: Params, run_id: str, metrics: dict, plots: list[Path], model: Path,
                tokenizer, meta: dict) -> None:
    """Into train's run, from the staged files: the summary, the curves, every split as an MLflow
    dataset, and (tracking.log_model) the model as an MLflow model."""
    import mlflow

    mlflow.flush_async_logging()  # the logger's per-step metrics land before the run is read
    frames = tracking.split_frames(params.paths.processed, meta)
    scores, tags = tracking.run_summary(metrics)
    with tracking.resume_run(params, run_id):
        mlflow.log_metrics(scores)
        mlflow.set_tags(tags)
        for plot in plots:
            mlflow.log_artifact(str(plot), "plots")
        tracking.log_datasets(params, frames, manifest_hash(params.paths.manifest))
        if params.tracking.log_model:
            tracking.log_model(params, model, tracking.input_examples(frames["train"], tokenizer))


def open_run(params: Params, budget: dict) -> tuple[Path | None, dict, str]:
    """Rank 0: resume or start fresh, and open the MLflow run. Returns (ckpt_path, run_info, fp)."""
    from lightning.pytorch.utilities import rank_zero_only

    paths = params.paths
    if rank_zero_only.rank != 0:  # a DDP worker, launched from rank 0's fit(): rank 0 has
        last = paths.checkpoints / "last.ckpt"  # already cleared any stale last.ckpt
        return (last if last.exists() else None), {"run_id": None}, ""
    fp = resume.fingerprint(params, sha256_of(paths.processed), resume.code_digest(TRAINING_CODE))
    ckpt = resume.checkpoint_to_resume(paths.checkpoints, fp, budget)
    run_info = tracking.new_run(params, MODEL_SECTIONS, manifest_hash(paths.manifest))
    return ckpt, run_info, fp


def main(params: Params | None = None) -> dict:
    params = params or load_params()
    paths, cfg = params.paths, params.train
    require_hardware(cfg)  # before any loading, and before an MLflow run is opened
    started = time.perf_counter()
    fit.quiet_libraries()
    meta = read_json(paths.processed / task(params.task).meta_file, "run `dvc repro prepare` first")
    tokenizer = load_tokenizer(str(paths.processed / "tokenizer"))
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # before any new weights are drawn
    module = start_module(params, tokenizer, meta)
    speed_up(module.model, cfg)
    budget = {"max_epochs": cfg.max_epochs, "max_steps": cfg.max_steps}
    ckpt, run_info, fp = open_run(params, budget)
    logger = fit.mlflow_logger(run_info["run_id"], tracking.tracking_uri(params.tracking))
    curves, best, callbacks = fit.make_callbacks(cfg, paths.checkpoints, params.task)
    trainer = fit.build_trainer(params, callbacks, logger)
    data = TextData(paths.processed / "datasets", tokenizer.pad_token_id, cfg)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    if not trainer.is_global_zero:
        return {}
    state = {"fingerprint": fp, "finished": True, "budget": budget}
    write_json(paths.checkpoints / resume.STATE_FILE, state)
    path = best.best_model_path  # empty when no validation ran (max_steps inside the first epoch)
    if cfg.strategy.startswith(("fsdp", "deepspeed")):
        # The fitted module holds this rank's shards only: export a fresh copy loaded with the
        # full weights the checkpoint holds (Lightning's FSDP default state_dict_type is "full").
        module, path = start_module(params, tokenizer, meta), path or best.last_model_path
    if path:
        module.load_state_dict(fit.best_weights(Path(path)))
    metrics = fit.summarize(trainer, curves, best.monitor, best.mode, time.perf_counter() - started,
                            params.task)
    # Written aside and swapped in together: a run that fails (or is killed) up to here leaves the
    # last good model, run.json, metrics and curves as they were, consistent with each other.
    outputs = (paths.model, paths.train_plots, paths.train_metrics, paths.run_info)
    with write_aside(*outputs) as (model_dir, plots_dir, metrics_file, run_file):
        write_model(params, module, tokenizer, meta, model_dir)
        plots = write_curves(curves, plots_dir)
        write_json(metrics_file, metrics)
        write_json(run_file, run_info)
        log_outputs(params, run_info["run_id"], metrics, plots, model_dir, tokenizer, meta)
    print(f"train: {metrics} -> {paths.model}")
    return metrics


if __name__ == "__main__":
    run_main(main)
