"""The Trainer around both tasks' modules: built from params, with the callbacks that keep the best
model, curves, early stopping and resume state; and what a finished fit reports. Used by
stages/train.py, which owns the I/O and the MLflow run.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import lightning as L
import torch

from lmforge import tasks
from lmforge.params import Params, Train
from lmforge.tasks import CAUSAL_LM, CLASSIFICATION
from lmforge.training.hardware import resolve_precision
from lmforge.training.lit import Curves, Progress
from lmforge.training.resume import AtomicCheckpointIO, ResumeState, StepCheckpoint


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


def make_callbacks(cfg: Train, folder: Path, task: str = CLASSIFICATION
                   ) -> tuple[Curves, L.Callback, list]:
    """Curves, the best-checkpoint keeper (plus last.ckpt for resume), and the rest."""
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint

    es = cfg.early_stopping
    monitor, mode = (es.monitor, es.mode) if es else tasks.task(task).default_monitor
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
    if not sys.stdout.isatty():  # a terminal has the progress bar (build_trainer)
        others.append(Progress(cfg.progress_every_n_steps, tasks.task(task).monitors))
    curves = Curves(tasks.task(task).monitors)
    return curves, best, [curves, best, *others]


def mlflow_name(key: str) -> str:
    """The MLflow name of a metric Lightning logs, prefixed so the UI groups it: train_loss ->
    train/loss, val_accuracy -> val/accuracy, lr-AdamW/pg1 -> train/lr-AdamW/pg1, epoch ->
    train/epoch. The names inside Lightning (monitors, val.csv, train.json) stay as they are."""
    for split in ("train", "val"):
        if key.startswith(f"{split}_"):
            return f"{split}/{key.removeprefix(f'{split}_')}"
    return f"train/{key}" if key == "epoch" or key.startswith("lr-") else key


def mlflow_logger(run_id: str | None, uri: str):
    """Lightning's MLFlowLogger into the run train opened, with mlflow_name's names; asynchronous,
    so per-step metrics never stall training. Inert off rank 0 (Lightning's rank-zero guards)."""
    from lightning.pytorch.loggers import MLFlowLogger
    from lightning.pytorch.utilities import rank_zero_only

    class GroupedMLFlowLogger(MLFlowLogger):
        @rank_zero_only
        def log_metrics(self, metrics, step=None) -> None:
            super().log_metrics({mlflow_name(k): v for k, v in metrics.items()}, step)

    return GroupedMLFlowLogger(run_id=run_id, tracking_uri=uri, synchronous=False)


def best_weights(ckpt: Path) -> dict:
    """A checkpoint's full state dict; DeepSpeed writes a folder of ZeRO shards, merged here."""
    if ckpt.is_dir():
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        return convert_zero_checkpoint_to_fp32_state_dict(ckpt, ckpt / "full.pt")["state_dict"]
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


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
    if task == CAUSAL_LM:
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
