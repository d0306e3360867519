"""Benchmark: overhead of stage train's Lightning training step against a plain PyTorch loop.

    python -m benchmarks.bench_train_loop                          # 50 timed steps, 3 rounds
    BENCH_STEPS=5 BENCH_ROUNDS=1 python -m benchmarks.bench_train_loop   # a quick check
    BENCH_MLFLOW=0 python -m benchmarks.bench_train_loop           # without the MLflow logger

Both sides fine-tune params' default model (MiniLM) from the same initial weights on the same
batches: batch 32 of data/sample/reviews.csv cut to 64 tokens, padded per batch by TextData's
collator, with the same AdamW groups, schedule and clipping, on the device ``train`` would use.
Lightning side: our ClassifierModule, TextData, callbacks and Trainer exactly as stage train builds
them (lmforge.training.fit), logging to MLflow (a throwaway sqlite store) as in production. Each
round times BENCH_STEPS steps after BENCH_WARMUP warmup steps, Lightning then plain (A B A B ...), so
machine drift hits both alike. Target: Lightning >= 0.95x plain.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from lmforge.classification import model as clf_model
from lmforge.classification.data import label_mapping
from lmforge.models import load_tokenizer, resolve_model_source
from lmforge.params import Params, parse_params
from lmforge.training import fit, hardware, lit

REPO = Path(__file__).resolve().parents[1]
STEPS = int(os.environ.get("BENCH_STEPS", 50))
WARMUP = int(os.environ.get("BENCH_WARMUP", 5))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", 3))
MLFLOW = os.environ.get("BENCH_MLFLOW", "1") == "1"


def make_data(folder: Path, params: Params) -> tuple[dict, int]:
    """The sample tokenized to 64 tokens, repeated so that one epoch outlasts the timed steps."""
    import datasets
    import pandas as pd


    datasets.disable_progress_bars()
    df = pd.read_csv(REPO / "data/sample/reviews.csv")
    mapping = label_mapping(sorted(df["label"].unique()))
    tokenizer = load_tokenizer(resolve_model_source(params.model.source))
    enc = tokenizer(df["text"].tolist(), truncation=True, max_length=64)
    ds = datasets.Dataset.from_dict({"text": df["text"].tolist(),
                                     "labels": [mapping["label2id"][x] for x in df["label"]],
                                     **enc})
    reps = -(-(WARMUP + STEPS + 1) * params.train.batch_size // len(ds))
    train_ds = datasets.concatenate_datasets([ds] * reps)
    datasets.DatasetDict({"train": train_ds, "validation": ds.select(range(64))}).save_to_disk(
        str(folder))
    return mapping, tokenizer.pad_token_id


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Window(L.Callback):
    """Wall time and padded tokens from the end of warmup step W to the end of step W + N."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.t0, self.seconds, self.tokens = device, 0.0, 0.0, 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if WARMUP <= batch_idx < WARMUP + STEPS:
            self.tokens += batch["input_ids"].numel()
        if batch_idx == WARMUP - 1:
            sync(self.device)
            self.t0 = time.perf_counter()
        elif batch_idx == WARMUP + STEPS - 1:
            sync(self.device)
            self.seconds = time.perf_counter() - self.t0


def lightning_round(params: Params, mapping: dict, pad_id: int, device) -> tuple[float, int]:
    from lightning.pytorch.loggers import MLFlowLogger

    from lmforge.tracking import start_run, tracking_uri

    L.seed_everything(params.train.seed, verbose=False)
    module = clf_model.ClassifierModule(clf_model.load_pretrained(params.model.source, mapping), params.train)
    logger = False
    if MLFLOW:
        run_id = start_run(params, ("model", "train"), "bench")
        logger = MLFlowLogger(run_id=run_id, tracking_uri=tracking_uri(params.tracking),
                              synchronous=False)
    window = Window(device)
    from lightning.pytorch.callbacks import LearningRateMonitor

    _, _, callbacks = fit.make_callbacks(params.train, params.paths.checkpoints)
    if not logger:  # it refuses to run without one
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer = fit.build_trainer(params, [window, *callbacks], logger)
    data = lit.TextData(params.paths.processed, pad_id, params.train)
    trainer.fit(module, datamodule=data)
    return window.seconds, window.tokens


def plain_round(params: Params, mapping: dict, pad_id: int, device) -> tuple[float, int]:
    cfg = params.train
    L.seed_everything(cfg.seed, verbose=False)
    model = clf_model.load_pretrained(params.model.source, mapping).to(device).train()
    data = lit.TextData(params.paths.processed, pad_id, cfg)
    data.setup("fit")
    opt = torch.optim.AdamW(lit.param_groups(model, cfg.weight_decay), lr=cfg.learning_rate)
    sched = lit.make_scheduler(opt, cfg, cfg.max_steps)  # Lightning's estimate under max_steps
    bf16 = hardware.resolve_precision(cfg.precision, cfg.accelerator, device.type == "cuda",
                                   device.type == "cuda" and torch.cuda.is_bf16_supported())
    t0 = seconds = 0.0
    tokens = 0
    for i, batch in enumerate(data.train_dataloader()):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16 == "bf16-mixed"):
            loss = model(**batch).loss
        loss.backward()
        if cfg.gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.gradient_clip_val)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if WARMUP <= i < WARMUP + STEPS:
            tokens += batch["input_ids"].numel()
        if i == WARMUP - 1:
            sync(device)
            t0 = time.perf_counter()
        elif i == WARMUP + STEPS - 1:
            sync(device)
            seconds = time.perf_counter() - t0
            break
    return seconds, tokens


def main() -> None:
    fit.quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        params = parse_params({
            "paths": {"processed": str(root / "datasets"), "checkpoints": str(root / "ckpt"),
                      "run_info": str(root / "run.json")},
            "train": {"batch_size": 32, "max_epochs": 1, "max_steps": WARMUP + STEPS},
            "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "bench"},
        })
        mapping, pad_id = make_data(params.paths.processed, params)
        cuda = torch.cuda.is_available() and params.train.accelerator in ("auto", "gpu", "cuda")
        device = torch.device("cuda" if cuda else "cpu")
        results: dict[str, list[float]] = {"lightning": [], "plain": []}
        for r in range(ROUNDS):
            for name, run in (("lightning", lightning_round), ("plain", plain_round)):
                seconds, tokens = run(params, mapping, pad_id, device)
                results[name].append(STEPS * params.train.batch_size / seconds)
                print(f"round {r + 1} {name:<9} {results[name][-1]:8.1f} samples/s "
                      f"({tokens} padded tokens in {STEPS} steps, {seconds:.2f} s)", flush=True)
    lit, plain = (statistics.median(results[k]) for k in ("lightning", "plain"))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, device {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, mlflow logger {MLFLOW}")
    print(f"median of {ROUNDS} rounds, {STEPS} steps each after {WARMUP} warmup steps:")
    print(f"  lightning {lit:8.1f} samples/s\n  plain     {plain:8.1f} samples/s")
    print(f"  ratio     {lit / plain:8.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main()
