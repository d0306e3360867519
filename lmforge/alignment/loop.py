"""Stage align's optimizer loop: the policy and its frozen reference, AdamW, and checkpoints that
let a killed run resume exactly.

Step s draws its rows and its samples from ``align.seed + s`` alone (never from what ran before),
and dropout is off (the policy and the reference score the same tokens alike), so a run resumed
from the checkpoint of step k ends byte-identical to one that was never killed. The checkpoint
(``paths.align_checkpoints/last.pt``, written beside its name and renamed into place) holds the
trainable weights, the optimizer state and the curves so far; ``state.json`` beside it holds the
fingerprint of what the run depends on. Nothing here opens MLflow runs or writes stage outputs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from lmforge.common import sha256_of, write_json
from lmforge.params import Params
from lmforge.training.resume import code_digest

ALIGN_CODE = ("stages/align.py", "lmforge/alignment", "rewards")  # a change here starts afresh
RESUME_FREE = {"log_every_n_steps", "checkpoint_every_n_steps", "eval_batch_size"}
LAST, STATE = "last.pt", "state.json"


def load_models(params: Params):
    """(policy, reference, tokenizer, lm.json): train's model to optimize, with fresh LoRA
    adapters when ``model.lora`` is set (then the reference is None: the policy with its adapters
    disabled, no second copy in memory), else a frozen copy of it as the reference."""
    from lmforge.causal_lm.evaluate import load_trained
    from lmforge.causal_lm.model import with_lora

    policy, tokenizer, meta = load_trained(params.paths.model)  # eval mode: no dropout
    if params.model.lora is not None:
        torch.manual_seed(params.align.seed)  # the adapters' random init
        return with_lora(policy, params.model.lora).eval(), None, tokenizer, meta
    reference = copy.deepcopy(policy).requires_grad_(False)
    return policy, reference, tokenizer, meta


@contextmanager
def as_reference(policy, reference) -> Iterator[object]:
    """The reference to run: ``reference``, or the LoRA policy with its adapters switched off."""
    if reference is not None:
        yield reference
        return
    with policy.disable_adapter():
        yield policy


def fingerprint(params: Params) -> str:
    """What a checkpoint depends on: the align knobs but RESUME_FREE, LoRA, train's model, the
    data and the code."""
    blob = {"align": params.align.model_dump(mode="json", exclude=RESUME_FREE),
            "lora": params.model.lora.model_dump(mode="json") if params.model.lora else None,
            "data": params.data.model_dump(mode="json"),
            "model": sha256_of(params.paths.model), "interim": sha256_of(params.paths.interim),
            "code": code_digest(ALIGN_CODE)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


class Checkpoints:
    """``last.pt`` every N steps and ``state.json``; a matching unfinished run is resumed."""

    def __init__(self, folder: Path, fp: str, every: int | None) -> None:
        self.folder, self.fp, self.every = folder, fp, every

    def resume(self) -> dict | None:
        """The checkpoint to continue from, or None after clearing a stale or finished folder."""
        state_file, last = self.folder / STATE, self.folder / LAST
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        if last.exists() and state.get("fingerprint") == self.fp and not state.get("finished"):
            ckpt = torch.load(last, weights_only=True)
            print(f"align: resuming from {last} (step {ckpt['step']})")
            return ckpt
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        write_json(state_file, {"fingerprint": self.fp, "finished": False})
        return None

    def maybe_save(self, step: int, model, optimizer, curves: list[dict], last_step: bool) -> None:
        if self.every is None or step % self.every or last_step:
            return
        tmp = self.folder / f".{LAST}.tmp"
        torch.save({"step": step, "weights": trainable_state(model),
                    "optimizer": optimizer.state_dict(), "curves": curves}, tmp)
        os.replace(tmp, self.folder / LAST)

    def finish(self) -> None:
        write_json(self.folder / STATE, {"fingerprint": self.fp, "finished": True})


Update = Callable[[torch.Tensor], None]


def run(params: Params, policy, step_fn: Callable[[int, Update], dict], ckpts: Checkpoints) -> list[dict]:
    """Optimizer steps 1..align.max_steps; ``step_fn(step, update)`` computes a loss and calls
    ``update(loss)`` (GRPO: once per updates_per_batch) and returns the step's metrics. Returns the
    curves: one row per step."""
    cfg = params.align
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    start, curves = 0, []
    ckpt = ckpts.resume()
    if ckpt is not None:
        policy.load_state_dict(ckpt["weights"], strict=False)
        optimizer.load_state_dict(ckpt["optimizer"])
        start, curves = ckpt["step"], ckpt["curves"]

    def update(loss: torch.Tensor) -> None:
        loss.backward()
        if cfg.gradient_clip_val is not None:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.gradient_clip_val)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for step in range(start + 1, cfg.max_steps + 1):
        lr = cfg.learning_rate * min(1.0, step / cfg.warmup_steps) if cfg.warmup_steps else cfg.learning_rate
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(cfg.seed + step)  # this step's samples, whatever ran before
        curves.append({"step": step, **step_fn(step, update)})
        if step % cfg.log_every_n_steps == 0 or step == cfg.max_steps:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in curves[-1].items() if k != "step")
            print(f"align: step {step}/{cfg.max_steps}: {shown}", flush=True)
        ckpts.maybe_save(step, policy, optimizer, curves, step == cfg.max_steps)
    return curves
