"""Benchmark: causal-LM training throughput of our Lightning module (tokens/s, and MFU on a GPU).

    python -m benchmarks.bench_throughput                    # CPU or the visible GPU, params' defaults
    BENCH_SET='model.scratch.hidden=768 model.scratch.layers=12 model.scratch.heads=12' \
      BENCH_BATCH=16 BENCH_BLOCK=1024 python -m benchmarks.bench_throughput   # GPT-2 small shape

Builds the from-scratch model of ``model.scratch`` (BENCH_SET overrides any ``section.key=value``)
and fits lmforge.causal_lm.model.CausalLM with the Trainer settings stage train uses (precision
``auto``: bf16-mixed on a bf16 GPU; ``train.torch_compile`` honoured) on random token blocks of
BENCH_BATCH x BENCH_BLOCK tokens. After BENCH_WARMUP steps it times BENCH_STEPS optimizer steps and
prints tokens/s and, on a GPU, model FLOPs utilisation: 6 x parameters + 12 x layers x hidden x
block FLOPs per token (PaLM, appendix B) against the GPU's dense bf16 peak (BENCH_PEAK_TFLOPS, or a
table of common GPUs).
"""

from __future__ import annotations

import os
import platform
import time

import lightning as L
import torch

from lmforge.causal_lm import model as lm
from lmforge.params import load_params, parse_params
from lmforge.training import hardware, lit

ENV = os.environ.get
BATCH, BLOCK = int(ENV("BENCH_BATCH", 32)), int(ENV("BENCH_BLOCK", 128))
STEPS, WARMUP = int(ENV("BENCH_STEPS", 20)), int(ENV("BENCH_WARMUP", 3))
PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10G": 125}


class Vocab:
    """What scratch_config reads from a tokenizer: its size and special ids."""

    def __init__(self, size: int) -> None:
        self.size, self.eos_token_id, self.bos_token_id, self.pad_token_id = size, 0, None, 1

    def __len__(self) -> int:
        return self.size


class Timer(L.Callback):
    def __init__(self) -> None:
        self.tokens, self.start, self.seconds = 0, 0.0, 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == WARMUP:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > WARMUP:
            self.tokens += batch["input_ids"].numel()
        if trainer.global_step == WARMUP + STEPS:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.start


def params_with_overrides():
    raw = load_params().model_dump(mode="json", by_alias=True)
    raw["task"] = "causal_lm"
    raw["model"]["source"], raw["model"]["lora"] = "scratch", None
    raw["train"]["early_stopping"] = None
    raw["gate"] = {"floors": {"perplexity": {"max": 1e9}}, "tolerances": {}}
    for item in ENV("BENCH_SET", "").split():
        key, value = item.split("=", 1)
        *path, last = key.split(".")
        node = raw
        for part in path:
            node = node[part]
        node[last] = type(node[last])(value) if node[last] is not None else value
    return parse_params(raw, "BENCH_SET")


def main() -> None:
    params = params_with_overrides()
    scratch = params.model.scratch
    model = lm.start_model(params, Vocab(scratch.vocab_size))
    lit.speed_up(model, params.train)
    n_params = sum(p.numel() for p in model.parameters())
    blocks = torch.randint(2, scratch.vocab_size, (BATCH * (WARMUP + STEPS + 1), BLOCK))
    rows = [{"input_ids": b.tolist(), "labels": b.tolist()} for b in blocks]
    loader = torch.utils.data.DataLoader(rows, batch_size=BATCH,
                                         collate_fn=lambda r: lit.pad_batch(r, pad_id=1))
    cuda = torch.cuda.is_available()
    timer = Timer()
    trainer = L.Trainer(
        max_steps=WARMUP + STEPS, logger=False, enable_checkpointing=False, callbacks=[timer],
        precision=hardware.resolve_precision("auto", "auto", cuda, cuda and torch.cuda.is_bf16_supported()),
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(lm.CausalLM(model, params.train), train_dataloaders=loader)
    tokens_s = timer.tokens / timer.seconds
    flops_per_token = 6 * n_params + 12 * scratch.layers * scratch.hidden * BLOCK
    device = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    print(f"{device}: {scratch.architecture} {n_params / 1e6:.1f}M parameters, batch {BATCH} x {BLOCK} "
          f"tokens, precision {trainer.precision}, compile {params.train.torch_compile}")
    print(f"train: {tokens_s:,.0f} tokens/s over {STEPS} steps ({timer.seconds:.1f} s)")
    peak = float(ENV("BENCH_PEAK_TFLOPS", 0)) or next(
        (v for k, v in PEAK_TFLOPS.items() if cuda and k in torch.cuda.get_device_name()), 0)
    if peak:
        print(f"MFU: {tokens_s * flops_per_token / (peak * 1e12):.1%} of {peak:g} TFLOPS (bf16 dense)")
    else:
        print(f"MFU: n/a (no GPU peak known; {tokens_s * flops_per_token / 1e9:.1f} GFLOP/s achieved)")


if __name__ == "__main__":
    main()
