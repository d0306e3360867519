"""Classification data for stage prepare: the label set and its id mapping, and tokenized splits
(truncated, not padded: padding happens per batch in training)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from lmforge.common import UserError
from lmforge.data.cleaning import label_set
from lmforge.models import load_tokenizer, resolve_model_source
from lmforge.params import Params


def label_mapping(labels: list[str]) -> dict:
    """The id <-> name mapping saved with the data and, later, with the model config."""
    return {
        "id2label": {str(i): name for i, name in enumerate(labels)},
        "label2id": {name: i for i, name in enumerate(labels)},
    }


def encode_labels(labels: pd.Series, label2id: dict[str, int], split: str) -> list[int]:
    unknown = sorted(set(labels.dropna()) - set(label2id)) + (["<null>"] if labels.isna().any() else [])
    if unknown:
        raise UserError(
            f"{split}: labels {unknown[:5]} are not in the label set {list(label2id)} "
            "(validate should have caught this: run `dvc repro`, not the stage alone)"
        )
    return [label2id[v] for v in labels]


def tokenize_split(df: pd.DataFrame, tokenizer, max_length: int, batch_size: int, num_proc: int = 1):
    """A datasets.Dataset with text, labels, input_ids, attention_mask (lengths vary per row)."""
    from datasets import Dataset

    ds = Dataset.from_pandas(df, preserve_index=False)
    return ds.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc if len(ds) >= 2 * num_proc * batch_size else None,  # else: not worth a fork
        desc=None,
    )


def length_stats(ds, max_length: int) -> dict:
    lengths = np.array([len(ids) for ids in ds["input_ids"]])
    return {
        "rows": int(len(lengths)),
        "tokens_mean": round(float(lengths.mean()), 2) if len(lengths) else 0.0,
        "tokens_max": int(lengths.max()) if len(lengths) else 0,
        "truncated": int((lengths >= max_length).sum()),
    }


def encode_splits(params: Params, frames: dict[str, pd.DataFrame]) -> tuple[object, dict, dict, dict]:
    """Stage prepare's work for classification: (tokenizer, Dataset per split, labels.json, stats)."""
    data, prep = params.data, params.prepare
    mapping = label_mapping(label_set(frames["train"][data.label_column], data.labels))
    tokenizer = load_tokenizer(resolve_model_source(params.model.source),
                               params.model.trust_remote_code)
    splits, stats = {}, {}
    for split, df in frames.items():
        table = pd.DataFrame({
            "text": df[data.text_column].astype(str),
            "labels": encode_labels(df[data.label_column], mapping["label2id"], split),
        })
        splits[split] = tokenize_split(table, tokenizer, prep.max_length, prep.map_batch_size,
                                        prep.num_proc)
        stats[split] = length_stats(splits[split], prep.max_length)
    return tokenizer, splits, mapping, stats
