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

import hashlib
import json
import logging
import shutil
import sys
import time
import warnings
import zipfile
from pathlib import Path

import lightning as L
import torch

from stages import lm
from stages.common import (
    load_tokenizer,
    read_json,
    remote_code,
    resolve_model_source,
    run_main,
    sha256_of,
    write_json,
)
from stages.lit import Classifier, Curves, TextData, speed_up, write_curves
from stages.params import TASK_MONITORS, Params, Train, load_params, require_hardware
from stages.resume import AtomicCheckpointIO, ResumeState, StepCheckpoint

# Train knobs that may change between an interrupted run and its resumption: the budget (raise
# max_epochs to train on), hardware, logging and how often to checkpoint. Every other knob makes
# a checkpoint stale.
RESUME_FREE = {"max_epochs", "max_steps", "accelerator", "devices", "strategy", "num_nodes",
               "num_workers", "log_every_n_steps", "eval_batch_size", "checkpoint_every_n_steps",
               "torch_compile", "gradient_checkpointing"}
STATE_FILE = "train_state.json"  # beside last.ckpt: what made it, and whether that run finished
# What prepare writes beside the splits for each task, and train copies beside the model.
META_FILE = {"classification": "labels.json", "causal_lm": "lm.json"}


def resolve_precision(precision: str, accelerator: str, cuda: bool, bf16: bool) -> str:
    """``auto``: bf16-mixed on a GPU with fast bf16, else fp32 (CPU autocast gains nothing)."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if cuda and bf16 and accelerator in ("auto", "gpu", "cuda") else "32-true"


def fingerprint(params: Params, data_digest: str, code_digest: str) -> str:
    """What a checkpoint depends on: task, model, tokenizing, train knobs but RESUME_FREE, data, code."""
    blob = {"task": params.task, "model": params.model.model_dump(mode="json"),
            "prepare": params.prepare.model_dump(mode="json"),
            "train": params.train.model_dump(mode="json", exclude=RESUME_FREE),
            "data": data_digest, "code": code_digest}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def should_resume(state: dict | None, fp: str, budget: dict) -> tuple[bool, str]:
    """Resume an unfinished run with this fingerprint, or a finished one given more epochs.

    A finished run resumes only when max_epochs rose and max_steps stayed: a run that max_steps
    stopped mid-epoch left a last.ckpt that Lightning counts as a whole epoch.
    """
    if state is None:
        return False, "no state file beside last.ckpt"
    if state.get("fingerprint") != fp:
        return False, "params, data or code changed since it was written"
    if not state.get("finished"):
        return True, "the run that wrote it did not finish"
    old = state.get("budget", {})
    same_cap = budget["max_steps"] == old.get("max_steps")
    if budget["max_epochs"] > old.get("max_epochs", budget["max_epochs"]) and same_cap:
        return True, f"max_epochs raised from {old['max_epochs']} to {budget['max_epochs']}"
    return False, "its run finished and max_epochs was not raised; training again from scratch"


def checkpoint_to_resume(folder: Path, fp: str, budget: dict) -> Path | None:
    """last.ckpt when it may be resumed; else clear the folder (no stale best-*.ckpt may win)."""
    last = folder / "last.ckpt"
    state_path = folder / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.exists() else None
    resume, why = should_resume(state, fp, budget) if last.exists() else (False, "")
    if resume and not zipfile.is_zipfile(last):  # torch.save writes a zip; a cut-off one lacks its end
        resume, why = False, "it is truncated (a run killed while writing it, before atomic saves)"
    if resume:
        print(f"train: resuming from {last} ({why})")
    elif folder.exists() and any(folder.iterdir()):
        print(f"train: clearing {folder} ({why or 'no last.ckpt'})")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(state_path, {"fingerprint": fp, "finished": False, "budget": budget})
    return last if resume else None


def load_model(source: str, mapping: dict, trust_remote_code: bool = False):
    """The pretrained model with a fresh head for our labels (another head size is replaced).

    Weights come from safetensors only; code shipped with the model runs only when
    ``model.trust_remote_code`` is on (with a warning).
    """
    from transformers import AutoModelForSequenceClassification

    id2label = {int(i): name for i, name in mapping["id2label"].items()}
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            resolve_model_source(source), num_labels=len(id2label), id2label=id2label,
            label2id=mapping["label2id"], ignore_mismatched_sizes=True, use_safetensors=True,
            trust_remote_code=remote_code(trust_remote_code),
            dtype=torch.float32)  # mixed precision casts; never train in a half-precision copy
    except (OSError, ValueError) as err:
        raise lm.cannot_load(source, "a classification model", err) from None


def start_module(params: Params, tokenizer, meta: dict) -> L.LightningModule:
    """What train fits: the pretrained classifier with a fresh head for ``meta``'s labels, or the
    causal LM (from scratch or pretrained, with LoRA adapters when ``model.lora`` is set)."""
    if params.task == "causal_lm":
        return lm.CausalLM(lm.trainable_model(params, tokenizer), params.train)
    model = load_model(params.model.source, meta, params.model.trust_remote_code)
    return Classifier(model, params.train)


def build_trainer(params: Params, callbacks: list, logger) -> L.Trainer:
    """The Trainer from params: budget, accumulation, clipping and hardware pass through."""
    cfg = params.train
    cuda = torch.cuda.is_available()
    if cuda:
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmuls left on the GPU
    return L.Trainer(
        accelerator=cfg.accelerator, devices=cfg.devices, strategy=cfg.strategy,
        num_nodes=cfg.num_nodes,
        precision=resolve_precision(cfg.precision, cfg.accelerator, cuda,
                                    cuda and torch.cuda.is_bf16_supported()),
        max_epochs=cfg.max_epochs, max_steps=cfg.max_steps,
        accumulate_grad_batches=cfg.accumulate_grad_batches,
        gradient_clip_val=cfg.gradient_clip_val, log_every_n_steps=cfg.log_every_n_steps,
        callbacks=callbacks, logger=logger, default_root_dir=params.paths.checkpoints,
        plugins=[AtomicCheckpointIO()],  # a kill while saving never truncates last.ckpt
        enable_progress_bar=sys.stdout.isatty(),  # DVC logs are no place for progress bars
        enable_model_summary=False,  # a table per run; the parameter count is in the model config
        benchmark=False)  # cudnn autotuning picks kernels nondeterministically


def make_callbacks(cfg: Train, folder: Path, task: str = "classification"
                   ) -> tuple[Curves, L.Callback, list]:
    """Curves, the best-checkpoint keeper (plus last.ckpt for resume), and the rest."""
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint

    es = cfg.early_stopping
    default = ("val_loss", "min") if task == "causal_lm" else ("val_accuracy", "max")
    monitor, mode = (es.monitor, es.mode) if es else default
    # No version counter: StepCheckpoint writes last.ckpt too, and with one each would divert the
    # other's saves to last-v1.ckpt, which no resume reads.
    best = ModelCheckpoint(dirpath=folder, filename="best-{epoch}-{step}", monitor=monitor,
                           mode=mode, save_top_k=1, save_last=True, enable_version_counter=False)
    others = [LearningRateMonitor(logging_interval="step"), ResumeState()]
    if cfg.checkpoint_every_n_steps:  # between epoch ends; `best` alone picks the exported model
        others.append(StepCheckpoint(folder, cfg.checkpoint_every_n_steps))
    if es:
        # strict=False: when max_steps ends training inside the first epoch no validation ran,
        # and the monitor (a Literal in params, so no typo) is legitimately missing.
        others.append(EarlyStopping(monitor=es.monitor, mode=es.mode, patience=es.patience,
                                    strict=False))
    curves = Curves(TASK_MONITORS[task])
    return curves, best, [curves, best, *others]


def save_model(model, tokenizer, files: dict[str, dict], dest: Path) -> None:
    """Write the model, tokenizer and ``files`` (name: JSON) beside ``dest``, then swap folders:
    a crash never leaves a half-written model."""
    tmp, old = dest.with_name(f".{dest.name}.tmp"), dest.with_name(f".{dest.name}.old")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    for name, obj in files.items():
        write_json(tmp / name, obj)
    for f in tmp.iterdir():  # some writers leave private (0600) files; a server may be another user
        f.chmod(0o644)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def manifest_hash(manifest: Path) -> str:
    """The source data's hash from ingest's manifest, for the run's lineage tags."""
    if not manifest.exists():
        return "unknown"
    return json.loads(manifest.read_text()).get("source_sha256", "unknown")


def best_weights(ckpt: Path) -> dict:
    """A checkpoint's full state dict; DeepSpeed writes a folder of ZeRO shards, merged here."""
    if ckpt.is_dir():
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        return convert_zero_checkpoint_to_fp32_state_dict(ckpt, ckpt / "full.pt")["state_dict"]
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def export(params: Params, module: L.LightningModule, tokenizer, meta: dict) -> None:
    """paths.model: the weights (causal_lm: LoRA merged, generation config), tokenizer, and
    prepare's labels.json or lm.json."""
    causal = params.task == "causal_lm"
    model = lm.for_export(module.model, meta) if causal else module.model
    save_model(model, tokenizer, {META_FILE[params.task]: meta}, params.paths.model)


def summarize(trainer: L.Trainer, curves: Curves, monitor: str, mode: str, wall_s: float,
              task: str) -> dict:
    """metrics/train.json: validation at the best epoch (the saved model) and how training ran."""
    names = curves.metrics
    col = names.index(monitor) + 1
    pick = min if mode == "min" else max  # the first best, as ModelCheckpoint keeps it
    best = (pick(curves.val_rows, key=lambda row: row[col]) if curves.val_rows
            else [None] * (len(names) + 1))
    seconds = curves.seconds or float("inf")
    # Rank 0 times its own batches; every rank processes as many.
    speed = {"train_samples_per_s": round(curves.samples * trainer.world_size / seconds, 2)}
    if task == "causal_lm":
        speed["train_tokens_per_s"] = round(curves.tokens * trainer.world_size / seconds, 1)
    return {
        "monitor": monitor,
        "best_epoch": best[0],
        **{f"best_{k}": v if v is None else round(v, 6)
           for k, v in zip(names, best[1:], strict=True)},
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "resumed_from_step": curves.start_step,
        **speed,
        "wall_s": round(wall_s, 1),
    }


def log_outputs(params: Params, run_id: str, metrics: dict, plots: list[Path]) -> None:
    import mlflow

    from stages.tracking import tracking_uri

    mlflow.flush_async_logging()  # the logger's per-step metrics land before the run is read
    client = mlflow.MlflowClient(tracking_uri(params.tracking))
    for key, value in metrics.items():
        if isinstance(value, int | float):
            client.log_metric(run_id, key, value)
    for plot in plots:
        client.log_artifact(run_id, str(plot), "plots")
    if params.tracking.log_model:
        client.log_artifacts(run_id, str(params.paths.model), "model")


def quiet_libraries() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "classifier newly initialized" is the point of fine-tuning
    hf_logging.disable_progress_bar()  # weight loading/writing bars flood DVC's output
    # GPU/TPU availability, model summary and litmodels tips are info logs; warnings still show.
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")  # num_workers is a param
    warnings.filterwarnings("ignore", ".*treespec, LeafSpec.*")  # Lightning's, on every fit
    warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*")  # peft calls the old name
    warnings.filterwarnings("ignore", ".*fan_in_fan_out.*")  # peft adapts GPT-2's Conv1D right
    # checkpoint_to_resume already decided what the folder's contents may stay.
    warnings.filterwarnings("ignore", ".*Checkpoint directory .* exists and is not empty.*")


def open_run(params: Params, budget: dict) -> tuple[Path | None, str | None, str]:
    """Rank 0: resume or start fresh, and open the MLflow run. Returns (ckpt_path, run_id, fp)."""
    from lightning.pytorch.utilities import rank_zero_only

    from stages.lineage import MODEL_SECTIONS
    from stages.tracking import start_run

    paths = params.paths
    if rank_zero_only.rank != 0:  # a DDP worker, launched from rank 0's fit(): rank 0 has
        last = paths.checkpoints / "last.ckpt"  # already cleared any stale last.ckpt
        return (last if last.exists() else None), None, ""
    code = "".join(sha256_of(Path(__file__).with_name(m))
                   for m in ("train.py", "lit.py", "lm.py", "resume.py"))
    fp = fingerprint(params, sha256_of(paths.processed), code)
    ckpt = checkpoint_to_resume(paths.checkpoints, fp, budget)
    run_id = start_run(params, MODEL_SECTIONS, manifest_hash(paths.manifest))
    return ckpt, run_id, fp


def main(params: Params | None = None) -> dict:
    from lightning.pytorch.loggers import MLFlowLogger

    from stages.tracking import tracking_uri

    params = params or load_params()
    paths, cfg = params.paths, params.train
    require_hardware(cfg)  # before any loading, and before an MLflow run is opened
    started = time.perf_counter()
    quiet_libraries()
    meta = read_json(paths.processed / META_FILE[params.task], "run `dvc repro prepare` first")
    tokenizer = load_tokenizer(str(paths.processed / "tokenizer"))
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # before any new weights are drawn
    module = start_module(params, tokenizer, meta)
    speed_up(module.model, cfg)
    budget = {"max_epochs": cfg.max_epochs, "max_steps": cfg.max_steps}
    ckpt, run_id, fp = open_run(params, budget)
    # Off rank 0 the logger is inert (Lightning's rank-zero guards): no run, no writes.
    logger = MLFlowLogger(run_id=run_id, tracking_uri=tracking_uri(params.tracking),
                          synchronous=False)  # per-step metrics must not stall training
    curves, best, callbacks = make_callbacks(cfg, paths.checkpoints, params.task)
    trainer = build_trainer(params, callbacks, logger)
    data = TextData(paths.processed / "datasets", tokenizer.pad_token_id, cfg)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    if not trainer.is_global_zero:
        return {}
    state = {"fingerprint": fp, "finished": True, "budget": budget}
    write_json(paths.checkpoints / STATE_FILE, state)
    path = best.best_model_path  # empty when no validation ran (max_steps inside the first epoch)
    if cfg.strategy.startswith(("fsdp", "deepspeed")):
        # The fitted module holds this rank's shards only: export a fresh copy loaded with the
        # full weights the checkpoint holds (Lightning's FSDP default state_dict_type is "full").
        module, path = start_module(params, tokenizer, meta), path or best.last_model_path
    if path:
        module.load_state_dict(best_weights(Path(path)))
    export(params, module, tokenizer, meta)
    metrics = summarize(trainer, curves, best.monitor, best.mode, time.perf_counter() - started,
                        params.task)
    write_json(paths.train_metrics, metrics)
    log_outputs(params, run_id, metrics, write_curves(curves, paths.train_plots))
    print(f"train: {metrics} -> {paths.model}")
    return metrics


if __name__ == "__main__":
    run_main(main)
