"""Exact mid-epoch resume for stage train: what Lightning 2.6's checkpoints lack.

A resumable train loader, a callback carrying RNG states and the loader's place in its epoch, a
step-interval last.ckpt, and atomic checkpoint writes. Used by stages/lit.py and stages/train.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader


class ResumableLoader(DataLoader):
    """A DataLoader that can resume mid-epoch: it counts the batches handed out this epoch, and
    once given that count back (``load_state_dict``) its next iteration first skips that many.

    With the epoch's order fixed by the sampler, a resumed epoch trains on the batches the killed
    run had not reached. Skipped batches are still loaded (an epoch at most; cheap next to
    training on them). The skip is read at the first batch, not at ``iter()``: Lightning creates
    the iterator before it restores a checkpoint.
    """

    _given = 0  # batches handed out by the current iterator
    _skip = 0  # batches the next iteration skips (set by load_state_dict, used once)

    def __iter__(self):
        return self._batches(super().__iter__())

    def _batches(self, batches):
        skip, self._skip, self._given = self._skip, 0, 0
        for batch in batches:
            self._given += 1
            if self._given > skip:
                yield batch

    def state_dict(self) -> dict:
        return {"batches_given": self._given}

    def load_state_dict(self, state: dict) -> None:
        # A whole epoch handed out: the checkpoint was taken at its end and the next starts afresh.
        given = state.get("batches_given", 0)
        self._skip = given if given < len(self) else 0


class ResumeState(L.Callback):
    """What Lightning's checkpoints lack for an exact mid-epoch resume (Lightning 2.6 restores
    neither): the global torch RNG states, which draw the dropout masks, and the train loader's
    place in its epoch (a ``ResumableLoader``).

    The loader's place is given back at train start, before its first batch; the RNG states at the
    first training batch, past anything the restore itself drew. numpy and Python RNGs are left
    out: nothing draws from them while training (the sampler has its own seeded generator).
    """

    def __init__(self) -> None:
        self._loader: ResumableLoader | None = None
        self._pending: dict | None = None

    def state_dict(self) -> dict:
        state = {"rng_cpu": torch.get_rng_state(),
                 "loader": self._loader.state_dict() if self._loader is not None else {}}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["rng_cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        self._pending = state

    def on_train_start(self, trainer, module) -> None:
        self._loader = trainer.train_dataloader
        if self._pending is not None:
            self._loader.load_state_dict(self._pending["loader"])

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self._pending is not None:
            torch.set_rng_state(self._pending["rng_cpu"])
            if "rng_cuda" in self._pending and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(self._pending["rng_cuda"])
            self._pending = None


class StepCheckpoint(ModelCheckpoint):
    """last.ckpt every N optimizer steps, but never at an epoch's last batch: the epoch-end
    checkpoint follows after validation, and one resumed from before validation would skip it
    (Lightning 2.6 counts that epoch's validation as done)."""

    def __init__(self, folder: Path, every_n_steps: int) -> None:
        # No monitor (val metrics would be an epoch stale) and no top-k: only last.ckpt.
        super().__init__(dirpath=folder, save_last=True, save_top_k=0,
                         every_n_train_steps=every_n_steps,
                         enable_version_counter=False)  # overwrite the epoch-end last.ckpt

    def on_train_batch_end(self, trainer, *args) -> None:
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            super().on_train_batch_end(trainer, *args)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch.save checkpoint IO, but each file is written beside its name and renamed
    into place: a run killed while saving keeps the previous last.ckpt whole."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        tmp = Path(path).with_name(f".{Path(path).name}.tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)
