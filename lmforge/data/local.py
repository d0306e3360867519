"""The local engine of stage ingest: read, clean, deduplicate, split and write the source in batches.

One batch of ``data.batch_rows`` rows is in memory at a time, whatever the source's size. What
grows with the rows is small and per row: the exact-duplicate table holds an 8-byte hash per
distinct row of a table (about 34 MB per million rows), and the split needs, per row of the table
the missing splits are carved from, a label code (``shuffle``, classification; 4 bytes) or a hash
(``hash``; 8 bytes). Cleaned rows of that table wait in ``<interim>/.carve/`` until the split is
known, then go to their split. Classification's labelling inputs are human-sized and held whole:
Label Studio exports, and the texts of rows without a label (the pool).

Outputs (lmforge/data/shards.py): ``<interim>/<split>.parquet/part-*.parquet``, and for
classification ``<interim>/unlabeled.parquet``.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from lmforge.common import SPLITS, UserError
from lmforge.data.cleaning import clean_table, row_key, spells_number, text_columns
from lmforge.data.conversations import clean_conversations, manifest_detail
from lmforge.data.hashing import SeenRows, row_hashes
from lmforge.data.labelstudio import majority
from lmforge.data.messages import conversation_key
from lmforge.data.pool import (
    apply_labels,
    build_pool,
    export_summary,
    known_labels,
    merge_exports,
    new_rows,
    no_label_error,
    take_unlabeled,
    unlabeled_file_texts,
    with_labels,
)
from lmforge.data.shards import ShardWriter, read_batches, split_path
from lmforge.data.sources import UNLABELED, Table, delimiter_hint
from lmforge.data.splitting import carve
from lmforge.params import Data
from lmforge.tasks import CAUSAL_LM, CLASSIFICATION

PART_ROWS = 1_000_000  # rows per Parquet part file of a split


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


def require_carved(data: Data, picked: dict, missing: dict, labels: pd.Series | None,
                   n_rows: int) -> None:
    """A carved split can round to 0 rows when the data is small: say so before train fails."""
    for split, frac in missing.items():
        if len(picked[split]) == 0:
            if data.split.method == "hash":
                what = f"of {n_rows} rows (after cleaning) got 0 rows by hash"
            elif labels is None:
                what = f"of {n_rows} rows (after cleaning) rounds to 0 rows"
            else:
                per_class = labels.value_counts(dropna=False).to_dict()
                what = f"of each class rounds to 0 rows (rows per class after cleaning: {per_class})"
            raise UserError(
                f"{data.source}: the {split} split is empty: data.split.{split} = {frac:g} {what}; "
                f"add rows, raise data.split.{split}, or provide a {split} file"
            )


def add_counts(total: dict, part: dict) -> None:
    """Add nested counts into ``total`` (in place)."""
    for key, value in part.items():
        if isinstance(value, dict):
            add_counts(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value


class TableState:
    """What ingest learns about one source table as its batches go by."""

    def __init__(self, name: str, where: str) -> None:
        self.name, self.where = name, where
        self.read = self.kept = self.labelled = self.unlabelled = 0
        self.dropped: Counter = Counter({"empty": 0, "duplicate": 0})
        self.example: dict | None = None
        self.seen = SeenRows()
        self.kinds: dict[str, list] = {}  # label kind (number/text) -> [rows, first example]

    def note_kinds(self, labels: pd.Series) -> None:
        """Classification: a table whose labels mix numbers and strings is refused (any batch)."""
        present = labels.dropna()
        is_num = present.map(spells_number).astype(bool).to_numpy()
        for kind, mask in (("number", is_num), ("text", ~is_num)):
            if mask.any():
                seen = self.kinds.setdefault(kind, [0, present[mask].iloc[0]])
                seen[0] += int(mask.sum())
        if len(self.kinds) == 2:
            (n_num, num), (n_text, text) = self.kinds["number"], self.kinds["text"]
            raise UserError(
                f"{self.where}: label column mixes numbers and strings ({n_num} numeric, {n_text} "
                f"text, e.g. {[num, text]!r}); use one kind")


class LocalIngest:
    """One ingest run: ``run`` reads the tables and writes the splits under ``interim``."""

    def __init__(self, data: Data, task: str, interim: Path) -> None:
        self.data, self.task, self.interim = data, task, Path(interim)
        self.classify = task == CLASSIFICATION
        self.texts = list(text_columns(data, task).values())
        self.writers: dict[str, ShardWriter] = {}
        self.detail: dict = {}
        self.pool_texts: list[pd.Series] = []
        self.labels: dict[str, str] = {}  # exported text -> label (Label Studio)
        self.filled: set = set()
        self.relabelled: set = set()
        self.held: set = set()
        self.carve_labels: list[np.ndarray] = []  # per base batch: label codes
        self.label_codes: dict[str, int] = {}
        self.carve_hashes: list[np.ndarray] = []  # per base batch: text hashes (method hash)
        self.template: pd.DataFrame | None = None  # a cleaned batch's columns, for an empty split

    def where(self, table: Table) -> str:
        return str(table.path) if table.path else f"{self.data.source} [{table.name}]"

    def writer(self, split: str) -> ShardWriter:
        if split not in self.writers:
            where = f"{self.data.source} ({split} split)"
            self.writers[split] = ShardWriter(split_path(self.interim, split), PART_ROWS, where)
        return self.writers[split]

    # -- one batch ------------------------------------------------------------------------------
    def key_hashes(self, df: pd.DataFrame, columns: list[str]) -> np.ndarray:
        if self.data.chat is not None:  # conversations compare as their role/content sequence
            return row_hashes(pd.DataFrame({"k": df["messages"].map(conversation_key)}), ["k"])
        return row_hashes(df, columns)

    def take(self, batch: pd.DataFrame, state: TableState) -> pd.DataFrame:
        """Check and clean one batch of a table; return its rows not seen before in the table."""
        data = self.data
        check_columns(batch, state.where, data, self.task)
        if data.chat is not None:
            state.read += len(batch)
            cleaned, dropped = clean_conversations(batch, data)
        else:
            if self.classify:
                batch = self.sort_labels(batch, state)
            elif self.task == CAUSAL_LM:
                batch = batch[self.texts]
            state.read += len(batch)
            cleaned, dropped = clean_table(batch, data, self.task)
        if state.example is None and len(batch):
            state.example = batch[row_key(data, self.task)].iloc[0].to_dict()
        if data.clean.drop_duplicates and len(cleaned):
            keep = state.seen.first_seen(self.key_hashes(cleaned, row_key(data, self.task)))
            dropped["duplicate"] += int((~keep).sum())
            cleaned = cleaned[keep].reset_index(drop=True)
        state.dropped.update(dropped)
        state.kept += len(cleaned)
        if self.template is None and len(cleaned):
            self.template = cleaned.iloc[:0]
        return cleaned

    def sort_labels(self, batch: pd.DataFrame, state: TableState) -> pd.DataFrame:
        """Classification: labels as strings, exported labels applied, rows without one pooled."""
        data = self.data
        batch = with_labels(batch, state.name, data)
        state.note_kinds(batch[data.label_column])
        if self.labels:
            filled, relabelled, held = apply_labels(batch, self.labels, data)
            self.filled |= filled
            self.relabelled |= relabelled
            self.held |= held
        batch, texts = take_unlabeled(batch, data)
        state.labelled += len(batch)
        state.unlabelled += len(texts)
        if len(texts):
            self.pool_texts.append(texts)
        return batch

    def finish(self, state: TableState) -> None:
        """After a table's last batch: refuse a table without labels, or one cleaning emptied."""
        if self.classify and state.unlabelled and not state.labelled:
            raise no_label_error(state.where, state.unlabelled)
        if state.kept:
            return
        where = state.where if state.name == "source" or self.data.chat is not None \
            else f"{state.where} ({state.name} split)"
        dropped = state.dropped
        raise UserError(
            f"{where}: 0 rows left after cleaning ({state.read} read: {dropped['empty']} empty, "
            f"{dropped['duplicate']} duplicate dropped; data.clean), e.g. {state.example!r}"
        )

    def count(self, split: str, df: pd.DataFrame) -> None:
        """Add a written batch to the manifest's numbers for its split."""
        self.detail.setdefault("rows", {})
        self.detail["rows"][split] = self.detail["rows"].get(split, 0) + len(df)
        if self.data.chat is not None:
            part = manifest_detail({split: df})
            part = {k: {s: v for s, v in d.items() if s != "total"} for k, d in part.items()}
        elif self.task == CAUSAL_LM:
            part = {"chars": {split: int(sum(df[c].str.len().sum() for c in self.texts))}}
        else:
            counts = df[self.data.label_column].value_counts(dropna=False)
            part = {"labels": {split: {str(k): int(v) for k, v in counts.items()}}}
        add_counts(self.detail, part)

    # -- the whole source -----------------------------------------------------------------------
    def run(self, tables: dict[str, Table], exports: list[Path]) -> dict:
        """Read every table, write the splits; returns the manifest's rows, detail and dropped."""
        data = self.data
        base_name = "source" if "source" in tables or "train" not in tables else "train"
        missing = {s: getattr(data.split, s) for s in ("validation", "test") if s not in tables}
        tasks = self.read_exports(tables, exports) if exports else {}
        carve_dir = self.interim / ".carve"
        pending = ShardWriter(carve_dir, PART_ROWS, f"{data.source} ({base_name})")
        states: dict[str, TableState] = {}
        for name, table in tables.items():
            if name == UNLABELED:
                self.pool_texts += [unlabeled_file_texts(b, data) for b in table.read()]
                continue
            state = states[name] = TableState(name, self.where(table))
            for batch in table.read():
                cleaned = self.take(batch, state)
                if name == base_name:
                    self.remember(cleaned)
                    pending.write(cleaned)
                else:
                    self.writer(name).write(cleaned)
                    self.count(name, cleaned)
            if name != base_name:
                self.finish(state)
        extra = {}
        if exports:
            extra["label_studio"] = self.add_exported(states, base_name, pending, tasks, exports)
        base = states.get(base_name) or TableState(base_name, data.source)
        states[base_name] = base
        self.finish(base)
        pending.close()
        self.carve(carve_dir, base_name, missing)
        shutil.rmtree(carve_dir)
        for split in SPLITS:
            self.writer(split).close(self.template)
        if self.classify:
            extra |= self.write_pool(set(tasks))
        dropped = {name: dict(state.dropped) for name, state in states.items()}
        return {"rows": self.detail.pop("rows", {}), "detail": self.detail, "dropped": dropped,
                "extra": extra}

    def remember(self, cleaned: pd.DataFrame) -> None:
        """What the split of the base table needs of each row: its label code or text hash."""
        if self.data.split.method == "hash":
            self.carve_hashes.append(row_hashes(cleaned, self.texts) if self.data.chat is None
                                     else self.key_hashes(cleaned, []))
        elif self.classify:
            codes = self.label_codes
            labels = cleaned[self.data.label_column].tolist()
            self.carve_labels.append(np.array([codes.setdefault(v, len(codes)) for v in labels],
                                              dtype=np.int32))

    def carve(self, carve_dir: Path, base_name: str, missing: dict[str, float]) -> None:
        """Send each cleaned base row to its split (train, or one carved from it)."""
        data = self.data
        n_rows = sum(len(h) for h in self.carve_hashes) if self.carve_hashes else None
        labels = None
        if self.classify and data.split.method != "hash":
            names = np.array(list(self.label_codes), dtype=object)
            codes = np.concatenate(self.carve_labels) if self.carve_labels else np.array([], int)
            labels = pd.Series(names[codes] if len(names) else [], dtype=object)
            n_rows = len(labels)
        hashes = np.concatenate(self.carve_hashes) if self.carve_hashes else np.array([], np.uint64)
        if n_rows is None:
            from lmforge.data.shards import count_rows

            n_rows = count_rows(carve_dir)
        picked = carve(data.split.method, missing, data.seed, n_rows, labels, hashes)
        require_carved(data, picked, missing, labels, n_rows)
        order = list(picked)  # train first, then the carved splits
        code = np.zeros(n_rows, dtype=np.int8)
        for i, name in enumerate(order):
            code[picked[name]] = i
        start = 0
        for batch in read_batches(carve_dir, data.batch_rows):
            part = code[start : start + len(batch)]
            start += len(batch)
            for i, name in enumerate(order):
                rows = batch[part == i]
                if len(rows):
                    self.writer(name).write(rows)
                    self.count(name, rows)

    # -- labelling inputs (classification) ------------------------------------------------------
    def read_exports(self, tables: dict[str, Table], exports: list[Path]) -> dict:
        """Label Studio tasks by cleaned text; their majority labels apply as batches go by."""
        data, found = self.data, set()
        if data.labels is None:  # an exported choice must be a label the source uses
            for name, table in tables.items():
                if name == UNLABELED:
                    continue
                for batch in table.read():
                    if data.label_column in batch:
                        found |= set(with_labels(batch, name, data)[data.label_column].dropna())
        tasks = merge_exports(exports, data, known_labels(found, data))
        self.labels = {k: lab for k, t in tasks.items() if (lab := majority(t.votes)) is not None}
        return tasks

    def add_exported(self, states: dict, base_name: str, pending: ShardWriter, tasks: dict,
                     exports: list[Path]) -> dict:
        """Exported texts the source lacks join the base table (last); the manifest's entry."""
        rows = new_rows(self.labels, self.held, self.data)
        if len(rows):
            rows.attrs["path"] = str(exports[0])
            where = str(exports[0]) if base_name not in states else states[base_name].where
            state = states.setdefault(base_name, TableState(base_name, where))
            cleaned = self.take(rows, state)
            self.remember(cleaned)
            pending.write(cleaned)
        applied = {"new_rows": len(rows), "filled": len(self.filled),
                   "relabelled": len(self.relabelled)}
        return export_summary(tasks, len(exports), applied)

    def write_pool(self, queued: set[str]) -> dict:
        """The rows to label (stage select ranks them): ``<interim>/unlabeled.parquet``."""
        pool, entry = build_pool(self.pool_texts, self.labelled_texts, queued, self.data)
        pool.to_parquet(self.interim / f"{UNLABELED}.parquet", index=False)
        return {"unlabeled": entry} if entry else {}

    def labelled_texts(self, pool: pd.Series) -> pd.Series:
        """Which pool texts some labelled row holds, found by scanning the written splits."""
        column = self.data.text_column
        wanted = SeenRows()
        pool_hashes = row_hashes(pd.DataFrame({column: pool}), [column])
        wanted.add(pool_hashes)
        found = SeenRows()
        for split in SPLITS:
            for batch in read_batches(split_path(self.interim, split), self.data.batch_rows, [column]):
                hashes = row_hashes(batch, [column])
                found.add(hashes[wanted.contains(hashes)])
        return pd.Series(found.contains(pool_hashes), index=pool.index)
