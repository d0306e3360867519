"""Stage align's rows, read from ingest's cleaned splits (``paths.interim``, checked by validate):
preference rows for DPO (prompt, chosen = ``data.response_column``, rejected =
``data.rejected_column``) and prompt rows for GRPO (prompt, reference = ``data.response_column``).

Prompts are wrapped in the template train's model was trained with (its lm.json) and tokenized as
prepare does: no special tokens, EOS after each answer, the prompt cut from the left first.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from bento.prompts import format_prompt
from lmforge.causal_lm.data import encode_pair
from lmforge.common import IGNORE, UserError
from lmforge.params import Data
from lmforge.training.lit import pad_batch


def columns(data: Data, preferences: bool) -> dict[str, str]:
    """Source column -> role (prompt, chosen, rejected) of the rows align reads; recorded in
    align.json, so evaluate reads the same columns without the data params."""
    roles = {data.prompt_column: "prompt", data.response_column: "chosen"}
    return roles | ({data.rejected_column: "rejected"} if preferences else {})


def read_split(interim: Path, split: str, roles: dict[str, str]) -> pd.DataFrame:
    """One cleaned split with its columns renamed to their roles (``columns``)."""
    path = interim / f"{split}.parquet"
    if not path.exists():
        raise UserError(f"{path} not found: run `dvc repro ingest` first")
    df = pd.read_parquet(path)
    missing = [c for c in roles if c not in df.columns]
    if missing:
        raise UserError(f"{path} has no column(s) {missing}: the data is stale, run `dvc repro ingest`")
    if len(df) == 0:
        raise UserError(f"{path}: no rows; stage align has nothing to learn from")
    return df[list(roles)].rename(columns=roles).reset_index(drop=True)


def prompt_ids(tokenizer, prompts: list[str], template: str | None) -> list[list[int]]:
    """Token ids of each prompt inside the training template."""
    texts = [format_prompt(p, template) for p in prompts]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def encode_answers(tokenizer, prompts: list[list[int]], answers: list[str], max_length: int,
                   eos_id: int) -> list[dict]:
    """prompt + answer + EOS rows with labels on the answer only, cut as prepare cuts pairs."""
    ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
    rows = []
    for p, a in zip(prompts, ids, strict=True):
        encoded = encode_pair(p, a, eos_id, max_length)
        if encoded is None:  # nothing of the answer fits: scored as an empty answer
            encoded = (list(p[-(max_length - 1):]) + [eos_id], [IGNORE] * min(len(p), max_length - 1)
                       + [eos_id], True)
        rows.append({"input_ids": encoded[0], "labels": encoded[1]})
    return rows


def encode_preferences(df: pd.DataFrame, tokenizer, meta: dict) -> list[dict]:
    """Per preference row: {"chosen": row, "rejected": row}, each with input_ids and labels."""
    prompts = prompt_ids(tokenizer, df["prompt"].tolist(), meta["template"])
    args = (meta["max_length"], meta["eos_token_id"])
    chosen = encode_answers(tokenizer, prompts, df["chosen"].tolist(), *args)
    rejected = encode_answers(tokenizer, prompts, df["rejected"].tolist(), *args)
    return [{"chosen": c, "rejected": r} for c, r in zip(chosen, rejected, strict=True)]


def pair_batch(pairs: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """The chosen rows then the rejected rows of ``pairs`` as one right-padded batch (2B, T)."""
    return pad_batch([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_id)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The rows of step ``step``: consecutive slices of a permutation per pass over the data, fixed
    by ``seed`` and the pass alone, so a resumed run draws what the killed one would have."""
    import numpy as np

    size = min(batch_size, n)
    start = step * size
    picked: list[int] = []
    while len(picked) < size:
        epoch, offset = divmod(start + len(picked), n)
        order = np.random.default_rng(seed + epoch).permutation(n)
        picked += order[offset : offset + size - len(picked)].tolist()
    return picked
