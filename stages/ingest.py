"""Stage ingest: copy the source into data/raw, clean it, and write train/validation/test Parquet.

    python -m stages.ingest        # normally via `dvc repro ingest`; reads params section `data`

The source (``data.source``) is a .csv/.jsonl/.parquet file, a folder of ``train``/``validation``/
``test`` files of those formats, or ``hf:<dataset id>``. Splits the source lacks are carved from
train with a seeded, stratified split. The manifest (a DVC metric) records rows, labels, dropped rows
and the source's content hash, so `dvc metrics diff` shows data changes between branches.
"""

from __future__ import annotations

import re
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd

from stages.common import SPLITS, UserError, run_main, sha256_of, write_json
from stages.params import Cleaning, Data, Params, load_params
from stages.sources import HF_PREFIX, delimiter_hint, find_split_files, load_source


def is_number(v: object) -> bool:
    # A CSV column holding 1 and "pos" arrives as strings: "1" counts as the number it spells.
    if isinstance(v, str):
        return re.fullmatch(r"\s*-?\d+(\.\d+)?\s*", v) is not None
    return isinstance(v, (int, float, np.integer, np.floating))


def labels_as_strings(labels: pd.Series, where: str) -> pd.Series:
    """Labels become strings (ints stay readable: 1.0 from a CSV with gaps becomes '1'); nulls stay."""
    present = labels.dropna()
    is_num = present.map(is_number).astype(bool)
    if is_num.any() and not is_num.all():
        examples = [present[is_num].iloc[0], present[~is_num].iloc[0]]
        raise UserError(
            f"{where}: label column mixes numbers and strings ({int(is_num.sum())} numeric, "
            f"{int((~is_num).sum())} text, e.g. {examples!r}); use one kind"
        )

    def fmt(v: object) -> object:
        if isinstance(v, (float, np.floating)) and float(v).is_integer():
            return str(int(v))
        return str(v)

    return labels.map(fmt, na_action="ignore").astype("string")


def check_columns(df: pd.DataFrame, where: str, data: Data) -> None:
    wanted = {"data.text_column": data.text_column, "data.label_column": data.label_column}
    missing = {key: c for key, c in wanted.items() if c not in df.columns}
    if missing:
        found = list(map(str, df.columns))
        raise UserError(
            f"{where}: missing column(s) {list(missing.values())} ({', '.join(missing)}); "
            f"the file has columns {found}{delimiter_hint(found[0]) if len(found) == 1 else ''}"
        )


def clean_texts(texts: pd.Series, cfg: Cleaning) -> pd.Series:
    """Normalize and collapse whitespace; nulls stay null so drop_empty can count them."""

    def one(t: object) -> object:
        if t is None or t is pd.NA or (isinstance(t, float) and np.isnan(t)):
            return pd.NA
        t = str(t)
        if cfg.unicode_form:
            t = unicodedata.normalize(cfg.unicode_form, t)
        if cfg.collapse_whitespace:
            t = " ".join(t.split())
        return t

    return texts.map(one).astype("string")


def clean_table(df: pd.DataFrame, data: Data) -> tuple[pd.DataFrame, dict[str, int]]:
    """Clean one table; return it and the rows dropped per reason."""
    df = df.copy()
    df[data.text_column] = clean_texts(df[data.text_column], data.clean)
    dropped = {"empty": 0, "duplicate": 0}
    if data.clean.drop_empty:
        empty = df[data.text_column].isna() | (df[data.text_column].str.strip() == "")
        dropped["empty"] = int(empty.sum())
        df = df[~empty.fillna(True)]
    if data.clean.drop_duplicates:
        dup = df.duplicated(subset=[data.text_column, data.label_column], keep="first")
        dropped["duplicate"] = int(dup.sum())
        df = df[~dup]
    return df.reset_index(drop=True), dropped


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


def require_rows(df: pd.DataFrame, raw: pd.DataFrame, where: str, dropped: dict, data: Data) -> None:
    """A table that cleaning emptied would give an empty split: name it and what was dropped."""
    if len(df):
        return
    example = raw[[data.text_column, data.label_column]].iloc[0].to_dict()
    raise UserError(
        f"{where}: 0 rows left after cleaning ({len(raw)} read: {dropped['empty']} empty, "
        f"{dropped['duplicate']} duplicate dropped; data.clean), e.g. {example!r}"
    )


def require_carved(
    splits: dict[str, pd.DataFrame], fractions: dict, base: pd.DataFrame, data: Data
) -> None:
    """A carved split can round to 0 rows when every class is small: say so before train fails."""
    for split, frac in fractions.items():
        if len(splits[split]) == 0:
            per_class = base[data.label_column].value_counts(dropna=False).to_dict()
            raise UserError(
                f"{data.source}: the {split} split is empty: data.split.{split} = {frac:g} of each "
                f"class rounds to 0 rows (rows per class after cleaning: {per_class}); add rows, "
                f"raise data.split.{split}, or provide a {split} file"
            )


def make_splits(
    tables: dict[str, pd.DataFrame], data: Data
) -> tuple[dict[str, pd.DataFrame], dict[str, dict[str, int]]]:
    """Check, clean and complete the splits; return them with the dropped counts per table."""
    cleaned, dropped = {}, {}
    for name, df in tables.items():
        where = df.attrs.get("path") or f"{data.source} [{name}]"
        check_columns(df, where, data)
        labels = labels_as_strings(df[data.label_column], f"{where} column '{data.label_column}'")
        cleaned[name], dropped[name] = clean_table(df.assign(**{data.label_column: labels}), data)
        require_rows(cleaned[name], df, where if name == "source" else f"{where} ({name} split)",
                     dropped[name], data)
    base = cleaned.pop("source", None)
    if base is None:
        base = cleaned.pop("train")
    missing = {s: getattr(data.split, s) for s in ("validation", "test") if s not in cleaned}
    carved = stratified_split(base, data.label_column, missing, data.seed)
    require_carved(carved, missing, base, data)
    splits = {**carved, **cleaned}
    return {s: splits[s] for s in SPLITS}, dropped


def build_manifest(
    splits: dict[str, pd.DataFrame], dropped: dict[str, dict[str, int]], data: Data, digest: str
) -> dict:
    """The data manifest: numbers a reviewer diffs between branches (`dvc metrics diff`)."""
    label_counts = {
        s: {str(k): int(v) for k, v in df[data.label_column].value_counts(dropna=False).items()}
        for s, df in splits.items()
    }
    rows = {s: len(df) for s, df in splits.items()}
    return {
        "source": data.source,
        "source_sha256": digest,
        "rows": {**rows, "total": sum(rows.values())},
        "labels": label_counts,
        "dropped": dropped,
    }


def copy_raw(data: Data, tables: dict[str, pd.DataFrame], raw_dir: Path) -> None:
    """Keep an immutable copy of exactly what was read (bytes for files, Parquet for hub data)."""
    src = Path(data.source)
    if data.source.startswith(HF_PREFIX):
        for name, df in tables.items():
            df.to_parquet(raw_dir / f"{name}.parquet", index=False)
    elif src.is_dir():
        for p in find_split_files(src).values():
            shutil.copy2(p, raw_dir / p.name)
    else:
        shutil.copy2(src, raw_dir / src.name)


def write_splits(splits: dict[str, pd.DataFrame], out_dir: Path) -> None:
    for name, df in splits.items():
        df.to_parquet(out_dir / f"{name}.parquet", index=False)


def staging(dest: Path) -> Path:
    """An empty folder beside dest (same filesystem: moving it into place is a rename)."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed mid-write
    tmp.mkdir(parents=True)
    return tmp


def swap_in(tmp: Path, dest: Path) -> None:
    """Replace dest by the fully written tmp; a crash in between leaves dest or .dest.old, never half."""
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def main(params: Params | None = None) -> dict:
    params = params or load_params()
    data, paths = params.data, params.paths
    tables = load_source(data)
    splits, dropped = make_splits(tables, data)  # all checks pass before anything is written
    # dvc.yaml persists these outputs, so a failed run leaves the last good ones in place; new ones
    # are written aside and swapped in only once complete.
    raw, interim = staging(paths.raw), staging(paths.interim)
    copy_raw(data, tables, raw)
    write_splits(splits, interim)
    manifest = build_manifest(splits, dropped, data, sha256_of(raw))
    swap_in(raw, paths.raw)
    swap_in(interim, paths.interim)
    write_json(paths.manifest, manifest)
    n_dropped = sum(sum(d.values()) for d in dropped.values())
    print(f"ingest: {manifest['rows']} rows, {n_dropped} dropped {dropped} -> {paths.interim}")
    return manifest


if __name__ == "__main__":
    run_main(main)
