"""Stage ingest: copy the source into data/raw, clean it, and write train/validation/test Parquet.

    python -m stages.ingest        # normally via `dvc repro ingest`; reads params section `data`

The source (``data.source``) is a .csv/.jsonl/.parquet file, a folder of ``train``/``validation``/
``test`` files of those formats, or ``hf:<dataset id>``; for task causal_lm also .txt files (one row
per document or line, ``data.text_unit``). Splits the source lacks are carved from train with a
seeded split, stratified by label for classification. The manifest (a DVC metric) records rows,
labels (causal_lm: characters), dropped rows and the source's content hash, so `dvc metrics diff`
shows data changes between branches.

Classification (docs/labelling.md): rows without a label (an empty label cell, or a folder source's
``unlabeled`` file) go to ``<interim>/unlabeled.parquet``, never to a split; Label Studio JSON
exports (the source itself, or a folder source's ``labelstudio/*.json``) add labels, resolved by
majority, and the manifest counts what they held (``label_studio``) and the pool (``unlabeled``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from lmforge.common import SPLITS, UserError, run_main, sha256_of, write_aside, write_json
from lmforge.data.cleaning import clean_table, labels_as_strings, row_key, text_columns
from lmforge.data.conversations import clean_conversations, load_conversations, manifest_detail
from lmforge.data.pool import split_pools
from lmforge.data.sources import (
    HF_PREFIX,
    LABEL_STUDIO_DIR,
    UNLABELED,
    delimiter_hint,
    label_studio_exports,
    load_source,
)
from lmforge.params import Data, Params, load_params
from lmforge.tasks import CAUSAL_LM, CLASSIFICATION


def check_columns(df: pd.DataFrame, where: str, data: Data, task: str = CLASSIFICATION) -> None:
    label = {} if task == CAUSAL_LM else {"data.label_column": data.label_column}
    wanted = text_columns(data, task) | label
    missing = {key: c for key, c in wanted.items() if c not in df.columns}
    if missing:
        found = list(map(str, df.columns))
        raise UserError(
            f"{where}: missing column(s) {list(missing.values())} ({', '.join(missing)}); "
            f"the file has columns {found}{delimiter_hint(found[0]) if len(found) == 1 else ''}"
        )


def stratified_split(
    df: pd.DataFrame, label_column: str, fractions: dict[str, float], seed: int
) -> dict[str, pd.DataFrame]:
    """Split rows per class with a seeded permutation; each class keeps at least one train row.

    Rows keep their source order within each split, so the output is stable for a given seed.
    """
    rng = np.random.default_rng(seed)
    picked: dict[str, list[np.ndarray]] = {name: [] for name in ["train", *fractions]}
    groups = df.groupby(label_column, dropna=False, sort=True).indices
    for _, idx in sorted(groups.items(), key=lambda kv: str(kv[0])):
        idx = rng.permutation(idx)
        start = 0
        for name, frac in fractions.items():
            n = min(int(round(len(idx) * frac)), max(len(idx) - start - 1, 0))
            picked[name].append(idx[start : start + n])
            start += n
        picked["train"].append(idx[start:])
    return {
        name: df.iloc[np.sort(np.concatenate(parts or [np.array([], int)]))].reset_index(drop=True)
        for name, parts in picked.items()
    }


def random_split(df: pd.DataFrame, fractions: dict[str, float], seed: int) -> dict[str, pd.DataFrame]:
    """Split rows with a seeded permutation (no labels to stratify by); train keeps at least a row.

    Rows keep their source order within each split, so the output is stable for a given seed.
    """
    idx = np.random.default_rng(seed).permutation(len(df))
    picked, start = {}, 0
    for name, frac in fractions.items():
        n = min(int(round(len(idx) * frac)), max(len(idx) - start - 1, 0))
        picked[name], start = idx[start : start + n], start + n
    picked = {"train": idx[start:], **picked}
    return {name: df.iloc[np.sort(i)].reset_index(drop=True) for name, i in picked.items()}


def require_rows(
    df: pd.DataFrame, raw: pd.DataFrame, where: str, dropped: dict, key: list[str]
) -> None:
    """A table that cleaning emptied would give an empty split: name it and what was dropped."""
    if len(df):
        return
    example = raw[key].iloc[0].to_dict()
    raise UserError(
        f"{where}: 0 rows left after cleaning ({len(raw)} read: {dropped['empty']} empty, "
        f"{dropped['duplicate']} duplicate dropped; data.clean), e.g. {example!r}"
    )


def require_carved(
    splits: dict[str, pd.DataFrame], fractions: dict, base: pd.DataFrame, data: Data, task: str
) -> None:
    """A carved split can round to 0 rows when the data is small: say so before train fails."""
    for split, frac in fractions.items():
        if len(splits[split]) == 0:
            if task == CAUSAL_LM:
                what = f"of {len(base)} rows (after cleaning) rounds to 0 rows"
            else:
                per_class = base[data.label_column].value_counts(dropna=False).to_dict()
                what = ("of each class rounds to 0 rows (rows per class after cleaning: "
                        f"{per_class})")
            raise UserError(
                f"{data.source}: the {split} split is empty: data.split.{split} = {frac:g} {what}; "
                f"add rows, raise data.split.{split}, or provide a {split} file"
            )


def clean_one(df: pd.DataFrame, name: str, data: Data, task: str) -> tuple[pd.DataFrame, dict]:
    """Check and clean one table read from the source; causal_lm keeps only its text columns."""
    where = df.attrs.get("path") or f"{data.source} [{name}]"
    check_columns(df, where, data, task)
    if data.chat is not None:  # conversations: read and cleaned by lmforge/data/conversations.py
        cleaned, dropped = clean_conversations(df, data)
        require_rows(cleaned, df, where, dropped, ["messages"])
        return cleaned, dropped
    if task == CAUSAL_LM:
        df = df[list(text_columns(data, task).values())]
    else:
        labels = labels_as_strings(df[data.label_column], f"{where} column '{data.label_column}'")
        df = df.assign(**{data.label_column: labels})
    cleaned, dropped = clean_table(df, data, task)
    require_rows(cleaned, df, where if name == "source" else f"{where} ({name} split)", dropped,
                 row_key(data, task))
    return cleaned, dropped


def make_splits(
    tables: dict[str, pd.DataFrame], data: Data, task: str = CLASSIFICATION
) -> tuple[dict[str, pd.DataFrame], dict[str, dict[str, int]]]:
    """Check, clean and complete the splits; return them with the dropped counts per table."""
    cleaned, dropped = {}, {}
    for name, df in tables.items():
        cleaned[name], dropped[name] = clean_one(df, name, data, task)
    base = cleaned.pop("source", None)
    if base is None:
        base = cleaned.pop("train")
    missing = {s: getattr(data.split, s) for s in ("validation", "test") if s not in cleaned}
    if task == CAUSAL_LM:
        carved = random_split(base, missing, data.seed)
    else:
        carved = stratified_split(base, data.label_column, missing, data.seed)
    require_carved(carved, missing, base, data, task)
    splits = {**carved, **cleaned}
    return {s: splits[s] for s in SPLITS}, dropped


def build_manifest(
    splits: dict[str, pd.DataFrame], dropped: dict[str, dict[str, int]], data: Data, digest: str,
    task: str = CLASSIFICATION,
) -> dict:
    """The data manifest: numbers a reviewer diffs between branches (`dvc metrics diff`).

    Classification counts rows per label; causal_lm has no labels and counts characters per split.
    """
    rows = {s: len(df) for s, df in splits.items()}
    if data.chat is not None:  # conversations: characters, turns and source formats per split
        detail = manifest_detail(splits)
    elif task == CAUSAL_LM:
        columns = list(text_columns(data, task).values())
        chars = {s: int(sum(df[c].str.len().sum() for c in columns)) for s, df in splits.items()}
        detail = {"chars": {**chars, "total": sum(chars.values())}}
    else:
        detail = {"labels": {
            s: {str(k): int(v) for k, v in df[data.label_column].value_counts(dropna=False).items()}
            for s, df in splits.items()
        }}
    return {"source": data.source, "source_sha256": digest,
            "rows": {**rows, "total": sum(rows.values())}, **detail, "dropped": dropped}


def copy_raw(data: Data, tables: dict[str, pd.DataFrame], raw_dir: Path) -> None:
    """Keep an immutable copy of exactly what was read (bytes for files, Parquet for hub data)."""
    if data.source.startswith(HF_PREFIX):
        for name, df in tables.items():
            df.to_parquet(raw_dir / f"{name}.parquet", index=False)
        return
    for df in tables.values():  # the reader notes each file's path
        path = Path(df.attrs["path"])
        shutil.copy2(path, raw_dir / path.name)


def copy_exports(exports: list[Path], raw_dir: Path, in_folder: bool) -> None:
    """Label Studio exports go to raw/ as they sit in the source (a folder's in labelstudio/)."""
    dest = raw_dir / LABEL_STUDIO_DIR if in_folder else raw_dir
    for path in exports:
        dest.mkdir(exist_ok=True)
        shutil.copy2(path, dest / path.name)


def write_splits(splits: dict[str, pd.DataFrame], out_dir: Path) -> None:
    for name, df in splits.items():
        df.to_parquet(out_dir / f"{name}.parquet", index=False)


def main(params: Params | None = None) -> dict:
    params = params or load_params()
    data, paths = params.data, params.paths
    tables = load_conversations(data) if data.chat else load_source(data, params.task)
    # Classification: rows without a label are kept aside for labelling (stage select), and Label
    # Studio exports add labels (lmforge/data/pool.py); neither changes a source without them.
    exports = label_studio_exports(data, params.task)
    pools = split_pools(tables, exports, data) if params.task == CLASSIFICATION else None
    splits, dropped = make_splits(pools.tables if pools else tables, data, params.task)
    # dvc.yaml persists these outputs, so a failed run leaves the last good ones in place; new ones
    # are written aside and swapped in only once complete.
    with write_aside(paths.raw, paths.interim, paths.manifest) as (raw, interim, manifest_file):
        raw.mkdir()
        interim.mkdir()
        copy_raw(data, tables, raw)
        copy_exports(exports, raw, Path(data.source).is_dir())
        write_splits(splits, interim)
        if pools is not None:  # never a split: nothing downstream of validate reads it
            pools.unlabeled.to_parquet(interim / f"{UNLABELED}.parquet", index=False)
        manifest = build_manifest(splits, dropped, data, sha256_of(raw), params.task)
        manifest |= pools.manifest if pools else {}
        write_json(manifest_file, manifest)
    n_dropped = sum(sum(d.values()) for d in dropped.values())
    print(f"ingest: {manifest['rows']} rows, {n_dropped} dropped {dropped} -> {paths.interim}")
    return manifest


if __name__ == "__main__":
    run_main(main)
