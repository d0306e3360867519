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
import re
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


def read_table(path: Path) -> pd.DataFrame:
    """Read one CSV/JSONL/Parquet file, turning the usual ways it can be unreadable into UserErrors."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: unsupported format '{path.suffix}' (use {', '.join(FORMATS)})")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty")
    try:
        if fmt == "csv":
            df = pd.read_csv(path, encoding="utf-8", keep_default_na=False, na_values=[""])
        elif fmt == "jsonl":
            df = pd.read_json(path, lines=True, dtype=False)
        else:
            df = pd.read_parquet(path)
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: the file is empty (no header, no rows)") from None
    except (ValueError, pd.errors.ParserError) as err:
        hint = delimiter_hint(first_line(path)) if fmt == "csv" else bad_json_line(path)
        raise UserError(f"{path}: cannot be read as {fmt}: {str(err).splitlines()[0]}{hint}") from None
    if df.empty:
        raise UserError(f"{path}: the file holds no rows (columns: {list(map(str, df.columns))})")
    df.attrs["path"] = str(path)  # lets later checks name the file, not just the split
    return df


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


def split_text(text: str, unit: str) -> list[str]:
    """A .txt file's rows: blank-line-separated documents (their inner line breaks kept) or lines.

    Blank lines only separate rows: they never become rows themselves.
    """
    pieces = re.split(r"\n[ \t]*\n", text) if unit == "document" else text.split("\n")
    return [p.strip("\n") for p in pieces if p.strip()]


def read_text(path: Path, column: str, unit: str) -> pd.DataFrame:
    """Read a UTF-8 .txt file into one text column, one row per document or line (data.text_unit)."""
    raw = path.read_bytes()
    if not raw:
        raise UserError(f"{path}: the file is empty")
    try:
        text = raw.decode("utf-8-sig")  # a BOM is an encoding mark, not text
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    rows = split_text(text.replace("\r\n", "\n").replace("\r", "\n"), unit)
    if not rows:
        raise UserError(f"{path}: the file holds only whitespace")
    df = pd.DataFrame({column: pd.Series(rows, dtype="string")})
    df.attrs["path"] = str(path)
    return df


def read_file(path: Path, data: Data, task: str) -> pd.DataFrame:
    """One source file: a table, or for task causal_lm also plain text (.txt)."""
    if path.suffix.lower() != TEXT_SUFFIX:
        return read_table(path)
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
    return read_text(path, data.text_column, data.text_unit)


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


def load_source(data: Data, task: str = CLASSIFICATION) -> dict[str, pd.DataFrame]:
    """Read the source into tables keyed by split name (``source`` for a single, unsplit file;
    ``unlabeled`` for a folder's rows to label). Label Studio exports are left to the caller
    (``label_studio_exports``): a source that is one export gives no table.

    A table read from a file carries its path in ``df.attrs["path"]``.
    """
    if data.source.startswith(HF_PREFIX):
        return load_hub_dataset(data.source.removeprefix(HF_PREFIX))
    path = Path(data.source)
    if not path.exists():
        raise UserError(f"data.source '{path}' does not exist")
    exports = label_studio_exports(data, task)
    if path.is_dir():
        names = (*SPLITS, UNLABELED) if task == CLASSIFICATION else SPLITS
        files = find_split_files(path, source_suffixes(task), names, need_train=not exports)
        return {split: read_file(p, data, task) for split, p in files.items()}
    return {} if exports else {"source": read_file(path, data, task)}
