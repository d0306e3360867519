"""Exact mid-epoch resume for stage train: whether a checkpoint may be resumed, and what Lightning
2.6's checkpoints lack.

The resume decision (a fingerprint of what a checkpoint depends on), a resumable train loader, a
callback carrying RNG states and the loader's place in its epoch, a step-interval last.ckpt, and
atomic checkpoint writes. Used by lmforge/training/lit.py and stages/train.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader

from lmforge.common import write_json
from lmforge.params import Params

# Train knobs that may change between an interrupted run and its resumption: the budget (raise
# max_epochs to train on), hardware, logging and how often to checkpoint. Every other knob makes
# a checkpoint stale.
RESUME_FREE = {"max_epochs", "max_steps", "accelerator", "devices", "strategy", "num_nodes",
               "num_workers", "log_every_n_steps", "progress_every_n_steps", "eval_batch_size",
               "checkpoint_every_n_steps", "torch_compile", "gradient_checkpointing"}
STATE_FILE = "train_state.json"  # beside last.ckpt: what made it, and whether that run finished
ROOT = Path(__file__).resolve().parents[2]  # the repo root: code paths are named relative to it


def code_digest(paths: tuple[str, ...]) -> str:
    """SHA-256 of the Python sources under ``paths`` (files or folders, relative to the repo root),
    names and bytes, sorted; compiled caches are not code."""
    h = hashlib.sha256()
    for name in paths:
        path = ROOT / name
        for f in sorted([path] if path.is_file() else path.rglob("*.py")):
            h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


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
        print(f"train: resuming from {last} ({why})", flush=True)
    elif folder.exists() and any(folder.iterdir()):
        print(f"train: clearing {folder} ({why or 'no last.ckpt'})", flush=True)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(state_path, {"fingerprint": fp, "finished": False, "budget": budget})
    return last if resume else None


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
