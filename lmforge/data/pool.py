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

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from lmforge.common import UserError
from lmforge.data.cleaning import clean_texts, labels_as_strings
from lmforge.data.labelstudio import TaskVotes, agreement, majority, read_export
from lmforge.data.sources import UNLABELED
from lmforge.params import Data


def where(df: pd.DataFrame, name: str, data: Data) -> str:
    return df.attrs.get("path") or f"{data.source} [{name}]"


def is_missing(labels: pd.Series) -> pd.Series:
    """An empty label cell: null, or only whitespace."""
    return labels.isna() | (labels.fillna("").astype(str).str.strip() == "")


def with_labels(df: pd.DataFrame, name: str, data: Data) -> pd.DataFrame:
    """The table with its labels as strings (an empty cell: null)."""
    labels = labels_as_strings(df[data.label_column], f"{where(df, name, data)} column "
                                                      f"'{data.label_column}'")
    out = df.assign(**{data.label_column: labels.mask(is_missing(labels))})
    out.attrs = dict(df.attrs)
    return out


def known_labels(found: set[str], data: Data) -> set[str] | None:
    """The labels an exported choice must be one of: data.labels, else the source's; None: any."""
    if data.labels is not None:
        return set(data.labels)
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


def apply_labels(df: pd.DataFrame, labels: dict[str, str], data: Data) -> tuple[set, set, set]:
    """Set each exported label on the rows holding its text (in place). Returns the texts whose
    empty label was filled, those whose label changed (a repeated row counts once), and every
    exported text the rows hold."""
    keys = clean_texts(df[data.text_column], data.clean)
    new = keys.map(labels).astype("string")
    hit = new.notna().to_numpy()
    old = df[data.label_column]
    filled = set(keys[hit & old.isna().to_numpy()])
    relabelled = set(keys[hit & old.notna().to_numpy() & (old != new).fillna(False).to_numpy()])
    df.loc[hit, data.label_column] = new[hit]
    return filled, relabelled, set(keys[hit])


def new_rows(labels: dict[str, str], held: set[str], data: Data) -> pd.DataFrame:
    """Exported texts the source lacks: rows for the table the missing splits come from."""
    new = {k: v for k, v in labels.items() if k not in held}
    return pd.DataFrame({data.text_column: list(new), data.label_column: list(new.values())},
                        dtype="string")


def take_unlabeled(df: pd.DataFrame, data: Data) -> tuple[pd.DataFrame, pd.Series]:
    """The rows with a label, and the texts of those without one."""
    missing = df[data.label_column].isna()
    kept = df[~missing].reset_index(drop=True)
    kept.attrs = dict(df.attrs)
    return kept, df.loc[missing, data.text_column]


def no_label_error(where_: str, rows: int) -> UserError:
    return UserError(f"{where_}: no row has a label ({rows} without one): put rows to label in an "
                     f"{UNLABELED} file beside train, or label them")


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


def build_pool(texts: list[pd.Series], labelled: Callable[[pd.Series], pd.Series],
               queued: set[str], data: Data) -> tuple[pd.DataFrame, dict]:
    """The cleaned, distinct texts to label next, and the counts of those left out, by reason.

    ``labelled`` marks the (cleaned) texts some labelled row of the source holds.
    """
    if not texts:
        return pd.DataFrame({data.text_column: pd.Series([], dtype="string")}), {}
    pool = clean_texts(pd.concat(texts, ignore_index=True), data.clean)
    empty = pool.isna() | (pool.str.strip() == "")
    pool = pool[~empty]
    dup = pool.duplicated()
    known = labelled(pool) & ~dup
    in_studio = pool.isin(queued) & ~dup & ~known
    kept = pool[~(dup | known | in_studio)].reset_index(drop=True)
    dropped = {"empty": int(empty.sum()), "duplicate": int(dup.sum()),
               "labelled": int(known.sum()), "in_label_studio": int(in_studio.sum())}
    return pd.DataFrame({data.text_column: kept}), {"rows": len(kept), "dropped": dropped}
