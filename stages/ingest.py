"""Stage ingest: copy the source into data/raw, clean it, and write train/validation/test Parquet.

    python -m stages.ingest        # normally via `dvc repro ingest`; reads params section `data`

The source (``data.source``) is a .csv/.jsonl/.parquet file, a folder of ``train``/``validation``/
``test`` files of those formats, or ``hf:<dataset id>``. Splits the source lacks are carved from
train with a seeded, stratified split. The manifest (a DVC metric) records rows, labels, dropped rows
and the source's content hash, so `dvc metrics diff` shows data changes between branches.
"""

from __future__ import annotations

import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd

from stages.common import SPLITS, UserError, run_main, sha256_of, write_json
from stages.params import Cleaning, Data, Params, load_params

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
HF_PREFIX = "hf:"


def read_table(path: Path) -> pd.DataFrame:
    """Read one CSV/JSONL/Parquet file, turning the usual ways it can be unreadable into UserErrors."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: unsupported format '{path.suffix}' (use {', '.join(FORMATS)})")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty")
    try:
        if fmt == "csv":
            return pd.read_csv(path, encoding="utf-8", keep_default_na=False, na_values=[""])
        if fmt == "jsonl":
            return pd.read_json(path, lines=True, dtype=False)
        return pd.read_parquet(path)
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
            "re-save the file as UTF-8"
        ) from None
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise UserError(f"{path}: cannot be read as {fmt}: {str(err).splitlines()[0]}") from None


def find_split_files(folder: Path) -> dict[str, Path]:
    """Map split name -> file for a folder source; train is required, the others optional."""
    found: dict[str, Path] = {}
    for split in SPLITS:
        matches = [p for p in sorted(folder.glob(f"{split}.*")) if p.suffix.lower() in FORMATS]
        if len(matches) > 1:
            raise UserError(f"{folder}: several files for split '{split}': {[p.name for p in matches]}")
        if matches:
            found[split] = matches[0]
    if "train" not in found:
        names = sorted(p.name for p in folder.iterdir())
        raise UserError(f"{folder}: no train.csv/.jsonl/.parquet file (found: {names})")
    return found


def load_hub_dataset(dataset_id: str) -> dict[str, pd.DataFrame]:
    """Load every split of a hub dataset; offline this fails with a message, not a traceback."""
    import datasets

    try:
        dd = datasets.load_dataset(dataset_id)
    except Exception as err:  # the hub client raises many types (offline, 404, auth)
        raise UserError(
            f"data.source 'hf:{dataset_id}': cannot load from the Hugging Face hub "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            "Without network access, point data.source at a local file or folder."
        ) from None
    renamed = {"dev": "validation", "valid": "validation", "val": "validation"}
    return {renamed.get(name, name): ds.to_pandas() for name, ds in dd.items()}


def load_source(data: Data) -> dict[str, pd.DataFrame]:
    """Read the source into tables keyed by split name (``source`` for a single, unsplit file)."""
    if data.source.startswith(HF_PREFIX):
        return load_hub_dataset(data.source.removeprefix(HF_PREFIX))
    path = Path(data.source)
    if not path.exists():
        raise UserError(f"data.source '{path}' does not exist")
    if path.is_dir():
        return {split: read_table(p) for split, p in find_split_files(path).items()}
    return {"source": read_table(path)}


def labels_as_strings(labels: pd.Series, where: str) -> pd.Series:
    """Labels become strings (ints stay readable: 1.0 from a CSV with gaps becomes '1'); nulls stay."""
    present = labels.dropna()
    is_num = present.map(lambda v: isinstance(v, (int, float, np.integer, np.floating)))
    if is_num.any() and not is_num.all():
        examples = {repr(present[is_num].iloc[0]), repr(present[~is_num].iloc[0])}
        raise UserError(
            f"{where}: label column mixes numbers and strings ({int(is_num.sum())} numeric, "
            f"{int((~is_num).sum())} text, e.g. {sorted(examples)}); use one kind"
        )

    def fmt(v: object) -> object:
        if isinstance(v, (float, np.floating)) and float(v).is_integer():
            return str(int(v))
        return str(v)

    return labels.map(fmt, na_action="ignore").astype("string")


def check_columns(df: pd.DataFrame, where: str, data: Data) -> None:
    missing = [c for c in (data.text_column, data.label_column) if c not in df.columns]
    if missing:
        raise UserError(
            f"{where}: missing column(s) {missing} (data.text_column / data.label_column); "
            f"the file has columns {list(map(str, df.columns))}"
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


def make_splits(
    tables: dict[str, pd.DataFrame], data: Data
) -> tuple[dict[str, pd.DataFrame], dict[str, dict[str, int]]]:
    """Check, clean and complete the splits; return them with the dropped counts per table."""
    cleaned, dropped = {}, {}
    for name, df in tables.items():
        check_columns(df, f"{data.source} [{name}]", data)
        df = df.assign(**{data.label_column: labels_as_strings(df[data.label_column], name)})
        cleaned[name], dropped[name] = clean_table(df, data)
    base = cleaned.pop("source", None)
    if base is None:
        base = cleaned.pop("train")
    missing = {s: getattr(data.split, s) for s in ("validation", "test") if s not in cleaned}
    splits = {**stratified_split(base, data.label_column, missing, data.seed), **cleaned}
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
    if raw_dir.exists():
        shutil.rmtree(raw_dir)
    raw_dir.mkdir(parents=True)
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
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for name, df in splits.items():
        df.to_parquet(out_dir / f"{name}.parquet", index=False)


def main(params: Params | None = None) -> dict:
    params = params or load_params()
    data, paths = params.data, params.paths
    tables = load_source(data)
    splits, dropped = make_splits(tables, data)  # all checks pass before anything is written
    copy_raw(data, tables, paths.raw)
    write_splits(splits, paths.interim)
    manifest = build_manifest(splits, dropped, data, sha256_of(paths.raw))
    write_json(paths.manifest, manifest)
    n_dropped = sum(sum(d.values()) for d in dropped.values())
    print(f"ingest: {manifest['rows']} rows, {n_dropped} dropped {dropped} -> {paths.interim}")
    return manifest


if __name__ == "__main__":
    run_main(main)
