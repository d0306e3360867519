"""The Lightning side of stage train that both tasks share: data module, samplers, padding,
optimizer and schedule, and the training curves. The tasks' LightningModules live in their folders
(lmforge/classification/model.py, lmforge/causal_lm/model.py); exact resume is in resume.py.

Nothing here reads params files or starts MLflow runs; stages/train.py does.
"""

from __future__ import annotations

import csv
import math
import time
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from lmforge.common import IGNORE
from lmforge.params import Train
from lmforge.training.resume import ResumableLoader


def length_grouped_order(lengths: list[int], batch_size: int, seed: int, mega: int = 50) -> list:
    """Shuffle, sort by length inside mega-batches of ``mega`` batches, then shuffle the batches.

    Consecutive ``batch_size`` chunks of the result hold similar lengths (little padding). The batch
    order is shuffled too: in order, a set smaller than one mega-batch would run longest to shortest
    every epoch, and on data whose kinds differ in length (two tasks) the model would see one kind,
    then the other, and forget the first. The longest batch goes first, so an out-of-memory shows
    at the first step (as transformers' LengthGroupedSampler does).
    """
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(lengths))
    size = batch_size * mega
    order: list[int] = []
    for start in range(0, len(perm), size):
        order += sorted(perm[start : start + size].tolist(), key=lambda i: -lengths[i])
    # Full batches only: the DataLoader cuts the indices into batch_size chunks in turn, so a short
    # batch must stay last or every chunk after it would straddle two batches.
    full = len(order) - len(order) % batch_size
    batches = [order[i : i + batch_size] for i in range(0, full, batch_size)]
    if not batches:
        return order
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    rest = [batches[b] for b in rng.permutation(len(batches)).tolist() if b != longest]
    return [i for batch in [batches[longest], *rest] for i in batch] + order[full:]


class EpochSampler(Sampler[int]):
    """Indices in an order fixed by ``seed + epoch`` alone (Lightning calls ``set_epoch``).

    No global RNG is drawn, so a resumed run replays an epoch's order exactly. ``group``: length-
    grouped batches (``length_grouped_order``); else a plain permutation.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group: bool = True) -> None:
        self.lengths, self.batch_size, self.seed, self.group = lengths, batch_size, seed, group
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        seed = self.seed + self.epoch
        if self.group:
            return iter(length_grouped_order(self.lengths, self.batch_size, seed))
        return iter(np.random.default_rng(seed).permutation(len(self.lengths)).tolist())

    def __len__(self) -> int:
        return len(self.lengths)


def pad_batch(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad each row's token lists to the longest row of this batch.

    Class labels stay a vector; per-token labels (causal_lm) pad with IGNORE (no loss). A missing
    attention_mask is built: 1 on the row's tokens, 0 on padding.
    """
    width = max(len(r["input_ids"]) for r in rows)

    def pad(key: str, fill: int) -> torch.Tensor:
        return torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in rows])  # (B, T)

    per_token = isinstance(rows[0]["labels"], list)
    batch = {"labels": pad("labels", IGNORE) if per_token else torch.tensor([r["labels"] for r in rows])}
    for key in rows[0].keys() - {"labels", "text"}:
        batch[key] = pad(key, pad_id if key == "input_ids" else 0)  # attention_mask etc. pad with 0
    if "attention_mask" not in batch:
        lengths = torch.tensor([len(r["input_ids"]) for r in rows])
        batch["attention_mask"] = (torch.arange(width) < lengths[:, None]).long()  # (B, T)
    return batch


def token_lengths(ds) -> list[int]:
    """Tokens per row, read from the Arrow column (no Python lists of every row's ids)."""
    import pyarrow.compute as pc

    return pc.list_value_length(ds.with_format("arrow")["input_ids"]).to_pylist()


class TextData(L.LightningDataModule):
    """The tokenized splits of prepare, batched with per-batch padding."""

    def __init__(self, folder: Path, pad_id: int, cfg: Train) -> None:
        super().__init__()
        self.folder, self.pad_id, self.cfg = folder, pad_id, cfg

    def setup(self, stage: str | None = None) -> None:
        from datasets import load_from_disk

        splits = load_from_disk(str(self.folder))
        # Raw strings (classification's text, causal_lm pairs' prompt/response) are for evaluate.
        strings = [name for name, f in splits["train"].features.items()
                   if getattr(f, "dtype", None) in ("string", "large_string")]
        self.splits = splits.remove_columns(strings)

    def _loader(self, split: str, batch_size: int, sampler, cls=DataLoader) -> DataLoader:
        n = self.cfg.num_workers
        collate = partial(pad_batch, pad_id=self.pad_id)  # picklable for worker processes
        # An own generator: creating an iterator draws a seed from it, and drawing from the global
        # RNG instead would shift every dropout mask after it (and differ after a resume).
        generator = torch.Generator().manual_seed(self.cfg.seed)
        return cls(self.splits[split], batch_size=batch_size, sampler=sampler,
                   collate_fn=collate, num_workers=n, persistent_workers=n > 0,
                   pin_memory=self.cfg.accelerator != "cpu" and torch.cuda.is_available(),
                   generator=generator)

    def train_dataloader(self) -> DataLoader:
        cfg = self.cfg
        sampler = EpochSampler(token_lengths(self.splits["train"]), cfg.batch_size, cfg.seed,
                               group=cfg.group_by_length)
        return self._loader("train", cfg.batch_size, sampler, ResumableLoader)

    def val_dataloader(self) -> DataLoader:
        # Sorted by length: the order does not change the metrics, and padding shrinks.
        order = np.argsort(token_lengths(self.splits["validation"]), kind="stable").tolist()
        world = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        sampler = val_sampler(order, world, rank, self.cfg.eval_batch_size)
        return self._loader("validation", self.cfg.eval_batch_size, sampler)


def val_sampler(order: list[int], world: int, rank: int, batch_size: int):
    """The validation rows process ``rank`` of ``world`` scores: each row counted exactly once.

    Lightning would wrap ``order`` in a DistributedSampler that pads the split to a multiple of
    ``world``, and the repeated rows would count twice in the synced metrics. Lightning leaves a
    DistributedSampler we give it alone: here its unpadded one (the one it uses for predict),
    which leaves some processes a row short. When that would cost a process a whole batch, every
    process scores the whole split instead: a sharded forward (FSDP, DeepSpeed stage 3) needs as
    many batches on every process, and the synced metrics (ratios of sums) come out the same.
    """
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSamplerWrapper

    if world == 1:
        return order
    fewest, most = len(order) // world, math.ceil(len(order) / world)
    if fewest and math.ceil(fewest / batch_size) == math.ceil(most / batch_size):
        return UnrepeatedDistributedSamplerWrapper(order, num_replicas=world, rank=rank,
                                                   shuffle=False)
    return DistributedSamplerWrapper(order, num_replicas=1, rank=0, shuffle=False)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases and LayerNorm weights (the 1-D tensors) are not shrunk."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def make_scheduler(optimizer, cfg: Train, total_steps: int):
    """Warmup over ``warmup_ratio`` of the optimizer steps, then the configured decay."""
    import transformers

    warmup = round(cfg.warmup_ratio * total_steps)
    if cfg.schedule == "constant":
        return transformers.get_constant_schedule_with_warmup(optimizer, warmup)
    make = {"linear": transformers.get_linear_schedule_with_warmup,
            "cosine": transformers.get_cosine_schedule_with_warmup}[cfg.schedule]
    return make(optimizer, warmup, total_steps)


def speed_up(model: torch.nn.Module, cfg: Train) -> None:
    """Apply the train knobs that change how fast, never what, the model computes."""
    if cfg.gradient_checkpointing:  # non-reentrant: the variant that works under DDP and LoRA
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.torch_compile:
        model.compile()  # in place: state_dict keys, checkpoints and save_pretrained unchanged


def adamw_config(model: torch.nn.Module, cfg: Train, total_steps: int) -> dict:
    """configure_optimizers' answer: AdamW on the trainable weights, the schedule stepped per step.

    Fused (one kernel for all the updates) when the weights are on a GPU; the CPU has no fused AdamW.
    """
    groups = param_groups(model, cfg.weight_decay)
    on_gpu = any(p.is_cuda for group in groups for p in group["params"])
    opt = torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=on_gpu)
    sched = make_scheduler(opt, cfg, total_steps)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Curves(L.Callback):
    """Loss per optimizer step and ``metrics`` (the task's val metrics) per epoch; checkpoints carry
    them across resumes. Also counts this run's training samples, tokens and seconds."""

    def __init__(self, metrics: tuple[str, ...]) -> None:
        self.metrics = metrics
        self.loss_rows: list[list] = []  # [step, train_loss]; the loss stays a tensor until written
        self.val_rows: list[list[float]] = []  # [epoch, *metrics]
        self.start_step, self.samples, self.seconds, self._pending, self._t0 = 0, 0, 0.0, [], 0.0
        self._tokens: int | torch.Tensor = 0  # a device tensor while training: no sync per step

    @property
    def tokens(self) -> int:
        """Non-padding tokens trained on in this run (the attention masks' sum)."""
        return int(self._tokens)

    def on_train_start(self, trainer, module) -> None:
        self.start_step = trainer.global_step  # > 0 when resumed

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.seconds += time.perf_counter() - self._t0
        self.samples += len(batch["labels"])
        self._tokens = self._tokens + batch["attention_mask"].sum()
        # Divided by accumulate_grad_batches already: summed over a step it is the step's mean.
        # Kept on the device: a float() here would stall the GPU every step.
        self._pending.append(outputs["loss"])
        if trainer.global_step > (self.loss_rows[-1][0] + 1 if self.loss_rows else self.start_step):
            # An optimizer step was taken; numbered from 0, as Lightning numbers it in MLflow.
            self.loss_rows.append([trainer.global_step - 1, sum(self._pending)])
            self._pending = []

    def on_validation_end(self, trainer, module) -> None:
        if not trainer.sanity_checking:
            m = trainer.callback_metrics
            self.val_rows.append([trainer.current_epoch, *(float(m[k]) for k in self.metrics)])

    def state_dict(self) -> dict:
        self.loss_rows = [[step, float(loss)] for step, loss in self.loss_rows]
        return {"loss_rows": self.loss_rows, "val_rows": self.val_rows}

    def load_state_dict(self, state: dict) -> None:
        self.loss_rows, self.val_rows = state["loss_rows"], state["val_rows"]


class Progress(L.Callback):
    """A flushed line on stdout every ``every`` optimizer steps and at each epoch's end: what a log
    file (DVC, CI, a queue worker) shows while train runs. A terminal gets Lightning's progress bar
    instead (fit.make_callbacks adds this callback only when stdout is not one). Rank 0 only."""

    def __init__(self, every: int | None, monitors: tuple[str, ...]) -> None:
        self.every, self.monitors = every, monitors
        self._t0, self._printed, self._steps = 0.0, -1, ""

    def on_train_start(self, trainer, module) -> None:
        self._t0, self._printed = time.perf_counter(), trainer.global_step  # > 0 when resumed
        total = trainer.estimated_stepping_batches  # inf without a budget
        self._steps = f"/{int(total)}" if math.isfinite(total) else ""
        self._say(trainer, "training")

    def _say(self, trainer, what: str) -> None:
        if trainer.is_global_zero:
            epochs = f"/{trainer.max_epochs}" if (trainer.max_epochs or 0) > 0 else ""
            print(f"train: epoch {trainer.current_epoch + 1}{epochs}, step {trainer.global_step}"
                  f"{self._steps}, {what}, {time.perf_counter() - self._t0:.0f} s", flush=True)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # rises once per optimizer step, not per (accumulated) batch
        if self.every and step % self.every == 0 and step != self._printed:
            self._printed = step
            loss = trainer.callback_metrics.get("train_loss")
            self._say(trainer, "loss -" if loss is None else f"loss {float(loss):.4f}")

    def on_train_epoch_end(self, trainer, module) -> None:
        # Validation ran just before (at the epoch's end), unless max_steps stopped it mid-epoch.
        m = trainer.callback_metrics
        scores = ", ".join(f"{k} {float(m[k]):.4f}" for k in self.monitors if k in m)
        self._say(trainer, f"epoch done{', ' + scores if scores else ''}")


# The curves are our own CSV files rather than DVCLive's Lightning logger (DVCLiveLogger), which
# does not fit train's outputs: its live view (`dvc exp show` during a run) comes from rewriting
# declared metrics and plots files in place at every step, while train writes its outputs aside
# and swaps them in together (a failed or killed run leaves the last good ones); and after a
# resume from last.ckpt it would log the replayed steps again, where Curves travel inside the
# checkpoint and come out byte-identical to an uninterrupted run. Live progress is the Progress
# lines above and the MLflow run's charts, which fill while training.
def write_curves(curves: Curves, folder: Path) -> list[Path]:
    """The DVC plots: loss.csv (step, train_loss) and val.csv (epoch and the task's val metrics)."""
    folder.mkdir(parents=True, exist_ok=True)
    tables = {"loss.csv": (["step", "train_loss"], curves.state_dict()["loss_rows"]),
              "val.csv": (["epoch", *curves.metrics], curves.val_rows)}
    for name, (header, rows) in tables.items():
        with (folder / name).open("w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
    return [folder / name for name in tables]
