"""A classification source's labelled and unlabelled rows, sorted before ingest cleans and splits.

Rows without a label (an empty label cell anywhere, or every row of a folder source's ``unlabeled``
file) never reach a split: they form the pool stage select ranks for labelling. Label Studio
exports add labels, resolved per task by majority: a text labelled there takes that label wherever
the source holds it (filling an empty cell, or replacing the old label: the export is the newer,
human-checked answer), and a text the source lacks joins the rows the missing splits are carved
from (the single file, or train). Texts are compared after cleaning (``data.clean``), as ingest
compares them; the pool leaves out a text labelled anywhere and one already in Label Studio.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from lmforge.common import UserError
from lmforge.data.cleaning import clean_texts, labels_as_strings
from lmforge.data.labelstudio import TaskVotes, agreement, majority, read_export
from lmforge.data.sources import UNLABELED
from lmforge.params import Data


@dataclass
class Pools:
    """What ingest splits (labelled rows only) and what it keeps aside for labelling."""

    tables: dict[str, pd.DataFrame]  # labelled rows, keyed as the source's tables
    unlabeled: pd.DataFrame  # one column, data.text_column: cleaned, distinct, labelled nowhere
    manifest: dict = field(default_factory=dict)  # entries for metrics/data.json (none: nothing new)


def where(df: pd.DataFrame, name: str, data: Data) -> str:
    return df.attrs.get("path") or f"{data.source} [{name}]"


def is_missing(labels: pd.Series) -> pd.Series:
    """An empty label cell: null, or only whitespace."""
    return labels.isna() | (labels.fillna("").astype(str).str.strip() == "")


def with_labels(tables: dict[str, pd.DataFrame], data: Data) -> dict[str, pd.DataFrame]:
    """The tables with their labels as strings (an empty cell: null)."""
    out = {}
    for name, df in tables.items():
        labels = labels_as_strings(df[data.label_column], f"{where(df, name, data)} column "
                                                          f"'{data.label_column}'")
        out[name] = df.assign(**{data.label_column: labels.mask(is_missing(labels))})
        out[name].attrs = dict(df.attrs)
    return out


def known_labels(tables: dict[str, pd.DataFrame], data: Data) -> set[str] | None:
    """The labels an exported choice must be one of: data.labels, else the source's; None: any."""
    if data.labels is not None:
        return set(data.labels)
    found = {v for df in tables.values() for v in df[data.label_column].dropna()}
    return found or None


def merge_exports(exports: list[Path], data: Data, known: set[str] | None) -> dict[str, TaskVotes]:
    """Tasks by cleaned text over every export: votes add up within a file; a later file replaces
    an earlier one's task (Label Studio names exports by date, so the later one is the newer)."""
    merged: dict[str, TaskVotes] = {}
    for path in exports:
        tasks = read_export(path, data.text_column, known)
        keys = clean_texts(pd.Series([t.text for t in tasks], dtype="string"), data.clean)
        per_file: dict[str, TaskVotes] = {}
        for key, task in zip(keys, tasks, strict=True):
            if pd.isna(key) or not key.strip():
                continue  # an empty text has nothing to label
            seen = per_file.setdefault(key, TaskVotes(key))
            seen.votes.update(task.votes)
            seen.skipped += task.skipped
        merged.update(per_file)
    return merged


def export_summary(tasks: dict[str, TaskVotes], files: int, applied: dict[str, int]) -> dict:
    """The manifest's ``label_studio`` entry: what the exports held and what became of it."""
    votes = [t.votes for t in tasks.values()]
    resolved = [majority(v) for v in votes]
    return {
        "files": files, "tasks": len(tasks),
        "annotations": int(sum(sum(v.values()) for v in votes)),
        "skipped": int(sum(t.skipped for t in tasks.values())),  # cancelled, or nothing chosen
        "unannotated": sum(1 for v in votes if not v),
        "ties": sum(1 for v, r in zip(votes, resolved, strict=True) if v and r is None),
        "labelled": sum(1 for r in resolved if r is not None),
        **applied,  # new rows, labels filled in, labels replaced
        "agreement": agreement(list(tasks.values())),
    }


def apply_labels(tables: dict[str, pd.DataFrame], labels: dict[str, str], data: Data) -> dict:
    """Set each exported label on the rows holding its text (in place); count the texts whose
    empty label was filled and those whose label changed (a repeated row counts once)."""
    filled, relabelled = set(), set()
    for df in tables.values():
        keys = clean_texts(df[data.text_column], data.clean)
        new = keys.map(labels).astype("string")
        hit = new.notna().to_numpy()
        old = df[data.label_column]
        filled |= set(keys[hit & old.isna().to_numpy()])
        relabelled |= set(keys[hit & old.notna().to_numpy() & (old != new).fillna(False).to_numpy()])
        df.loc[hit, data.label_column] = new[hit]
    return {"filled": len(filled), "relabelled": len(relabelled)}


def add_new_rows(tables: dict[str, pd.DataFrame], labels: dict[str, str], data: Data,
                 source: Path) -> int:
    """Exported texts the source lacks become rows of the table the missing splits come from."""
    held = set()
    for df in tables.values():
        held |= set(clean_texts(df[data.text_column], data.clean).dropna())
    new = {k: v for k, v in labels.items() if k not in held}
    if not new:
        return 0
    rows = pd.DataFrame({data.text_column: list(new), data.label_column: list(new.values())},
                        dtype="string")
    base = next((n for n in ("source", "train") if n in tables), "source")
    attrs = dict(tables[base].attrs) if base in tables else {"path": str(source)}
    tables[base] = pd.concat([tables[base], rows], ignore_index=True) if base in tables else rows
    tables[base].attrs = attrs
    return len(new)


def take_unlabeled(tables: dict[str, pd.DataFrame], data: Data) -> list[pd.Series]:
    """Remove the rows without a label from each table (in the dict); return their texts."""
    texts = []
    for name, df in list(tables.items()):
        missing = df[data.label_column].isna()
        if missing.all():
            raise UserError(f"{where(df, name, data)}: no row has a label ({len(df)} without one): "
                            f"put rows to label in an {UNLABELED} file beside train, or label them")
        texts.append(df.loc[missing, data.text_column])
        attrs, tables[name] = df.attrs, df[~missing].reset_index(drop=True)
        tables[name].attrs = dict(attrs)
    return texts


def unlabeled_file_texts(df: pd.DataFrame, data: Data) -> pd.Series:
    """The texts of the ``unlabeled`` file: it needs the text column; a label there is a mistake."""
    path = where(df, UNLABELED, data)
    if data.text_column not in df.columns:
        raise UserError(f"{path}: missing column '{data.text_column}' (data.text_column); the file "
                        f"has columns {list(map(str, df.columns))}")
    if data.label_column in df.columns and (~is_missing(df[data.label_column])).any():
        n = int((~is_missing(df[data.label_column])).sum())
        raise UserError(f"{path}: {n} row(s) have a label: rows with labels belong in train (or "
                        f"the single source file); the {UNLABELED} file holds rows to label")
    return df[data.text_column]


def build_pool(texts: list[pd.Series], tables: dict[str, pd.DataFrame],
               queued: set[str], data: Data) -> tuple[pd.DataFrame, dict]:
    """The cleaned, distinct texts to label next, and the counts of those left out, by reason."""
    if not texts:
        return pd.DataFrame({data.text_column: pd.Series([], dtype="string")}), {}
    pool = clean_texts(pd.concat(texts, ignore_index=True), data.clean)
    empty = pool.isna() | (pool.str.strip() == "")
    pool = pool[~empty]
    labelled = set()
    for df in tables.values():
        labelled |= set(clean_texts(df[data.text_column], data.clean).dropna())
    dup = pool.duplicated()
    known = pool.isin(labelled) & ~dup
    in_studio = pool.isin(queued) & ~dup & ~known
    kept = pool[~(dup | known | in_studio)].reset_index(drop=True)
    dropped = {"empty": int(empty.sum()), "duplicate": int(dup.sum()),
               "labelled": int(known.sum()), "in_label_studio": int(in_studio.sum())}
    return pd.DataFrame({data.text_column: kept}), {"rows": len(kept), "dropped": dropped}


def split_pools(tables: dict[str, pd.DataFrame], exports: list[Path], data: Data) -> Pools:
    """Sort a classification source's rows into labelled tables and the pool to label.

    ``tables`` as lmforge.data.sources.load_source returns them; ``exports`` Label Studio exports.
    """
    unlabeled = tables.get(UNLABELED)
    tables = {n: df for n, df in tables.items() if n != UNLABELED}
    columns = {data.text_column, data.label_column}
    if any(not columns <= set(df.columns) for df in tables.values()):  # ingest names the columns
        return Pools(tables, pd.DataFrame({data.text_column: pd.Series([], dtype="string")}))
    labelled = with_labels(tables, data)
    manifest: dict = {}
    tasks: dict[str, TaskVotes] = {}
    if exports:
        tasks = merge_exports(exports, data, known_labels(labelled, data))
        labels = {k: lab for k, t in tasks.items() if (lab := majority(t.votes)) is not None}
        changed = apply_labels(labelled, labels, data)
        new_rows = add_new_rows(labelled, labels, data, exports[0])
        manifest["label_studio"] = export_summary(tasks, len(exports),
                                                  {"new_rows": new_rows, **changed})
    texts = take_unlabeled(labelled, data)
    if unlabeled is not None:
        texts.append(unlabeled_file_texts(unlabeled, data))
    pool, entry = build_pool([t for t in texts if len(t)], labelled, set(tasks), data)
    if entry:
        manifest["unlabeled"] = entry
    return Pools(labelled, pool, manifest)
