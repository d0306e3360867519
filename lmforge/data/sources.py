"""Reading a data source: files, split folders, hub datasets, and the ways each can be unreadable.

Used by stages/ingest.py; every failure is a UserError naming the file and what to do. Plain-text
(.txt) files are read only for task causal_lm: a classifier needs a label for every text.

The labelling loop (docs/labelling.md) adds two things a classification source may hold: rows to
label (an ``unlabeled`` file in a folder source; empty label cells anywhere), and Label Studio
JSON exports (the source itself, or every .json in a folder source's ``labelstudio/``). Exports are
only found here; lmforge/data/labelstudio.py reads them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pandas as pd

from lmforge.common import SPLITS, UserError
from lmforge.params import Data
from lmforge.tasks import CAUSAL_LM, CLASSIFICATION

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
TEXT_SUFFIX = ".txt"
HF_PREFIX = "hf:"
UNLABELED = "unlabeled"  # a folder source's file of rows to label: a text column, no labels
LABEL_STUDIO_DIR = "labelstudio"  # a folder source's subfolder of Label Studio JSON exports


def table_batches(path: Path, batch_rows: int, text_columns: list[str]) -> Iterator[pd.DataFrame]:
    """Read one CSV/JSONL/Parquet file in batches of ``batch_rows`` rows, turning the usual ways it can
    be unreadable into UserErrors. Format checks happen now; reading, as the batches are taken.

    ``text_columns`` are read as text from a CSV: a batch of digits-only texts stays text.
    """
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: unsupported format '{path.suffix}' (use {', '.join(FORMATS)})")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty")
    return _table_batches(path, fmt, batch_rows, text_columns)


def _table_batches(path: Path, fmt: str, batch_rows: int, text_columns: list[str]) -> Iterator[pd.DataFrame]:
    columns, rows = None, 0
    try:
        if fmt == "csv":
            reader = pd.read_csv(path, encoding="utf-8", keep_default_na=False, na_values=[""],
                                 chunksize=batch_rows, dtype=dict.fromkeys(text_columns, str))
        elif fmt == "jsonl":
            reader = pd.read_json(path, lines=True, dtype=False, chunksize=batch_rows)
        else:
            reader = parquet_batches(path, batch_rows)
        for df in reader:
            if columns is None:
                columns = list(map(str, df.columns))
            if len(df):
                rows += len(df)
                df.attrs["path"] = str(path)  # lets later checks name the file, not just the split
                yield df
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: the file is empty (no header, no rows)") from None
    except (ValueError, pd.errors.ParserError) as err:
        hint = delimiter_hint(first_line(path)) if fmt == "csv" else bad_json_line(path)
        raise UserError(f"{path}: cannot be read as {fmt}: {str(err).splitlines()[0]}{hint}") from None
    if not rows:
        if columns is None and fmt == "csv":
            columns = list(map(str, pd.read_csv(path, nrows=0, encoding="utf-8").columns))
        raise UserError(f"{path}: the file holds no rows (columns: {columns or []})")


def parquet_batches(path: Path, batch_rows: int) -> Iterator[pd.DataFrame]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except pa.ArrowException as err:
        raise ValueError(str(err)) from None
    yielded = False
    for batch in pf.iter_batches(batch_size=batch_rows):
        yielded = True
        yield batch.to_pandas()
    if not yielded:
        yield pf.schema_arrow.empty_table().to_pandas()


def first_line(path: Path) -> str:
    with path.open("rb") as f:
        return f.readline(4096).decode("utf-8", "replace")


def delimiter_hint(header: str) -> str:
    """Why a CSV header came out as one column: the file is separated by something else."""
    for sep, name in ((";", "semicolon"), ("\t", "tab"), ("|", "pipe")):
        if sep in header and "," not in header:
            return (f"; the header looks {name}-separated ({header.strip()[:60]!r}): a .csv must be "
                    "comma-separated (re-save it with ',' or as .jsonl/.parquet)")
    return ""


def bad_json_line(path: Path) -> str:
    """The first line of a JSONL file that is not one JSON value: pandas only gives an offset."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for no, line in enumerate(f, 1):
            try:
                json.loads(line) if line.strip() else None
            except ValueError:
                return f" (line {no}: {line.strip()[:80]!r})"
    return ""


def not_utf8(path: Path) -> UserError:
    """Name the first undecodable byte by line, with that line, so the user can find it."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
        return UserError(f"{path}: not UTF-8 text; re-save the file as UTF-8")
    except UnicodeDecodeError as err:
        line_no = raw.count(b"\n", 0, err.start) + 1
        start, end = raw.rfind(b"\n", 0, err.start) + 1, raw.find(b"\n", err.start)
        line = raw[start : end if end >= 0 else len(raw)].decode("utf-8", "replace").rstrip("\r")
        return UserError(
            f"{path}: not UTF-8 text (byte {raw[err.start]:#04x} on line {line_no}: {line[:80]!r}); "
            "re-save the file as UTF-8 (it may be Latin-1 or cp1252)"
        )


def is_separator(line: str) -> bool:
    """A line that only separates documents: empty, or spaces and tabs."""
    return not line.strip(" \t")


def text_rows(lines: Iterable[str], unit: str) -> Iterator[str]:
    """A .txt file's rows: blank-line-separated documents (their inner line breaks kept) or lines.

    Blank lines only separate rows: they never become rows themselves.
    """
    doc: list[str] = []
    for line in lines:
        line = line.rstrip("\n")
        if unit == "line":
            if line.strip():
                yield line
        elif is_separator(line):
            if doc and "".join(doc).strip():
                yield "\n".join(doc)
            doc = []
        else:
            doc.append(line)
    if doc and "".join(doc).strip():
        yield "\n".join(doc)


def text_batches(path: Path, column: str, unit: str, batch_rows: int) -> Iterator[pd.DataFrame]:
    """Read a UTF-8 .txt file into one text column, one row per document or line (data.text_unit),
    in batches; line ends are read as \\n whatever the file uses, and a BOM is dropped."""
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty")
    return _text_batches(path, column, unit, batch_rows)


def _text_batches(path: Path, column: str, unit: str, batch_rows: int) -> Iterator[pd.DataFrame]:
    def batch(rows: list[str]) -> pd.DataFrame:
        df = pd.DataFrame({column: pd.Series(rows, dtype="string")})
        df.attrs["path"] = str(path)
        return df

    rows, any_rows = [], False
    try:
        with path.open(encoding="utf-8-sig", newline=None) as f:  # a BOM is an encoding mark
            for row in text_rows(f, unit):
                rows.append(row)
                if len(rows) == batch_rows:
                    any_rows = True
                    yield batch(rows)
                    rows = []
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    if not rows and not any_rows:
        raise UserError(f"{path}: the file holds only whitespace")
    if rows:
        yield batch(rows)


def file_batches(path: Path, data: Data, task: str, batch_rows: int) -> Iterator[pd.DataFrame]:
    """One source file in batches: a table, or for task causal_lm also plain text (.txt)."""
    from lmforge.data.cleaning import text_columns

    if path.suffix.lower() != TEXT_SUFFIX:
        return table_batches(path, batch_rows, list(text_columns(data, task).values()))
    if task != CAUSAL_LM:
        raise UserError(
            f"{path}: unsupported format '{TEXT_SUFFIX}' for task {task}: plain text has no labels; "
            f"use {', '.join(FORMATS)} with text and label columns, or set task: causal_lm"
        )
    if data.pairs:
        raise UserError(
            f"{path}: a .txt file holds plain text, but data.prompt_column/response_column ask for "
            "pairs: use a table (.csv/.jsonl/.parquet) with both columns, or set both to null"
        )
    return text_batches(path, data.text_column, data.text_unit, batch_rows)


def source_suffixes(task: str) -> tuple[str, ...]:
    return (*FORMATS, TEXT_SUFFIX) if task == CAUSAL_LM else tuple(FORMATS)


def find_split_files(folder: Path, suffixes: tuple[str, ...] = tuple(FORMATS),
                     names: tuple[str, ...] = SPLITS, need_train: bool = True) -> dict[str, Path]:
    """Map split name (or ``unlabeled``) -> file for a folder source; train is required unless
    ``need_train`` is off (Label Studio exports provide the labelled rows)."""
    found: dict[str, Path] = {}
    for split in names:
        matches = [p for p in sorted(folder.glob(f"{split}.*")) if p.suffix.lower() in suffixes]
        if len(matches) > 1:
            raise UserError(f"{folder}: several files for split '{split}': {[p.name for p in matches]}")
        if matches:
            found[split] = matches[0]
    if "train" not in found and need_train:
        present = sorted(p.name for p in folder.iterdir())
        kinds = "/".join(s for s in suffixes if s != ".json")
        raise UserError(f"{folder}: no train{kinds} file (found: {present})")
    return found


def is_label_studio_export(path: Path) -> bool:
    """A .json file holding one JSON list (Label Studio's export), or one task object on its first
    line (an export without its list, which the export reader then refuses by name), not JSON Lines."""
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    head = first_line(path).strip()
    if head.startswith("["):
        return True
    try:
        first = json.loads(head)
    except ValueError:
        return False
    return isinstance(first, dict) and {"data", "annotations"} <= set(first)


def label_studio_exports(data: Data, task: str = CLASSIFICATION) -> list[Path]:
    """The Label Studio exports of a classification source, in name order (Label Studio names an
    export by its date, so a later one comes later): the source itself, or every .json in a folder
    source's ``labelstudio/``."""
    path = Path(data.source)
    if task != CLASSIFICATION or data.source.startswith(HF_PREFIX):
        return []
    if path.is_dir():
        return sorted((path / LABEL_STUDIO_DIR).glob("*.json"))
    return [path] if is_label_studio_export(path) else []


@dataclass
class Table:
    """One table of the source: where it comes from, and its rows in batches (read lazily)."""

    name: str  # train, validation, test, unlabeled, or source for a single unsplit file
    path: Path | None  # the file; None for a hub split
    read: Callable[[], Iterator[pd.DataFrame]]  # each call reads the table again, from the start
    frame: pd.DataFrame | None = None  # a table read whole (hub, conversations)

    @classmethod
    def whole(cls, name: str, df: pd.DataFrame) -> Table:
        path = df.attrs.get("path")
        return cls(name, Path(path) if path else None, lambda: iter([df]), df)


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


def load_source(data: Data, task: str = CLASSIFICATION, batch_rows: int | None = None) -> dict[str, Table]:
    """The source's tables keyed by split name (``source`` for a single, unsplit file;
    ``unlabeled`` for a folder's rows to label), each read in batches of ``batch_rows`` rows
    (default data.batch_rows). Label Studio exports are left to the caller
    (``label_studio_exports``): a source that is one export gives no table.

    Each batch read from a file carries its path in ``df.attrs["path"]``.
    """
    batch_rows = batch_rows or data.batch_rows
    if data.source.startswith(HF_PREFIX):
        tables = load_hub_dataset(data.source.removeprefix(HF_PREFIX))
        return {name: Table.whole(name, df) for name, df in tables.items()}
    path = Path(data.source)
    if not path.exists():
        raise UserError(f"data.source '{path}' does not exist")
    exports = label_studio_exports(data, task)
    if path.is_dir():
        names = (*SPLITS, UNLABELED) if task == CLASSIFICATION else SPLITS
        files = find_split_files(path, source_suffixes(task), names, need_train=not exports)
    else:
        files = {} if exports else {"source": path}
    for p in files.values():
        file_batches(p, data, task, batch_rows)  # the format checks, before anything is read
    return {name: Table(name, p, partial(file_batches, p, data, task, batch_rows))
            for name, p in files.items()}
