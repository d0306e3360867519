"""Stage prepare: tokenize every split with the model's fast tokenizer (truncate, no padding).

    python -m stages.prepare       # normally via `dvc repro prepare`; reads `model` and `prepare`

Padding happens later, per batch, so short batches stay short. Writes under ``paths.processed``:
``datasets/`` (a DatasetDict on disk), ``tokenizer/``, ``labels.json`` (id <-> name) and
``stats.json`` (token lengths, truncated rows). Task causal_lm (see stages/lm_data.py) writes
``lm.json`` instead of ``labels.json``: plain text packed into ``prepare.block_size`` blocks, or
prompt/response rows with the prompt masked out of the loss; from scratch, the tokenizer is a
byte-level BPE trained on the train split.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from stages.common import (
    SPLITS,
    UserError,
    label_set,
    load_tokenizer,
    read_json,
    resolve_model_source,
    run_main,
    write_json,
)
from stages.params import Params, load_params


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


def tokenize_split(df: pd.DataFrame, tokenizer, max_length: int, batch_size: int):
    """A datasets.Dataset with text, labels, input_ids, attention_mask (lengths vary per row)."""
    from datasets import Dataset

    ds = Dataset.from_pandas(df, preserve_index=False)
    return ds.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
        batched=True,
        batch_size=batch_size,
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


def require_validated(path: Path) -> None:
    verdict = read_json(path, "run `dvc repro validate` first")
    if not verdict.get("success"):
        raise UserError(f"{path}: the data failed validation; fix it before preparing (see report)")


def fresh(out: Path) -> Path:
    if out.exists():
        shutil.rmtree(out)
    return out


def prepare_lm(params: Params, frames: dict[str, pd.DataFrame]) -> dict:
    """causal_lm: tokenizer, packed or masked rows per split, lm.json and stats.json."""
    import datasets

    from stages import lm_data

    datasets.disable_progress_bars()
    tokenizer = lm_data.lm_tokenizer(params, frames["train"])
    splits, stats = {}, {}
    for split, df in frames.items():
        splits[split], stats[split] = lm_data.encode_split(df, tokenizer, params, split)
    out = fresh(params.paths.processed)
    datasets.DatasetDict(splits).save_to_disk(str(out / "datasets"))
    tokenizer.save_pretrained(str(out / "tokenizer"))
    write_json(out / "lm.json", lm_data.lm_info(params, tokenizer))
    write_json(out / "stats.json", stats)
    print(f"prepare: {stats} -> {out}")
    return stats


def main(params: Params | None = None) -> dict:
    params = params or load_params()
    data, paths = params.data, params.paths
    require_validated(paths.validation)
    frames = {s: pd.read_parquet(paths.interim / f"{s}.parquet") for s in SPLITS}
    if params.task == "causal_lm":
        return prepare_lm(params, frames)
    labels = label_set(frames["train"][data.label_column], data.labels)
    mapping = label_mapping(labels)
    tokenizer = load_tokenizer(resolve_model_source(params.model.source),
                               params.model.trust_remote_code)

    import datasets

    datasets.disable_progress_bars()
    splits, stats = {}, {}
    for split, df in frames.items():
        table = pd.DataFrame({
            "text": df[data.text_column].astype(str),
            "labels": encode_labels(df[data.label_column], mapping["label2id"], split),
        })
        splits[split] = tokenize_split(
            table, tokenizer, params.prepare.max_length, params.prepare.map_batch_size
        )
        stats[split] = length_stats(splits[split], params.prepare.max_length)

    out = fresh(paths.processed)
    datasets.DatasetDict(splits).save_to_disk(str(out / "datasets"))
    tokenizer.save_pretrained(str(out / "tokenizer"))
    write_json(out / "labels.json", mapping)
    write_json(out / "stats.json", stats)
    print(f"prepare: {stats} -> {out}")
    return stats


if __name__ == "__main__":
    run_main(main)
