"""Conversations for stage ingest (``data.chat``): read JSONL/JSON/Parquet rows in the formats people
have and convert each to one canonical ``messages`` list of ``{"role", "content"}``.

Formats (``data.chat.format``; ``auto`` decides per row by the fields it has):

- ``messages`` (OpenAI): ``{"messages": [{"role": "system"|"developer"|"user"|"assistant",
  "content": "..."}]}``; ``developer`` becomes ``system``, other keys of a message are ignored;
- ``sharegpt``: ``{"conversations": [{"from": "system"|"human"|"user"|"gpt"|"assistant",
  "value": "..."}], "system": "..." (optional)}``;
- ``alpaca``: ``{"instruction": "...", "input": "..." (optional), "output": "...", "system": "..."
  (optional)}``: one user turn (the instruction, then a blank line and the input when there is
  one) and one assistant turn.

A row that cannot be converted (not JSON, not an object, a missing field, an unknown role, a
content that is not a string) stops ingest with a UserError naming the file and the row, or, with
``data.chat.on_bad_row: drop``, is skipped and counted per reason. Whether the conversation makes
sense (role order, last turn the assistant's, empty turns) is stage validate's to say, by row.

The interim splits hold ``messages`` (a list of structs in Parquet) and ``format`` (the source format
of each conversation, counted per split in the manifest).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd

from lmforge.common import UserError
from lmforge.data.cleaning import clean_texts
from lmforge.data.messages import conversation_key
from lmforge.params import Chat, Data

FORMATS = ("messages", "sharegpt", "alpaca")
SUFFIXES = (".jsonl", ".json", ".parquet")
HF_PREFIX = "hf:"
# Source role name -> canonical role, per format; any other name is an unknown role.
ROLE_NAMES = {
    "messages": {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"},
    "sharegpt": {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                 "assistant": "assistant"},
}
# Per format: the list field, and in each of its items the role and the content field.
TURN_FIELDS = {"messages": ("messages", "role", "content"),
               "sharegpt": ("conversations", "from", "value")}
# What a dropped row counts under in the manifest (data.chat.on_bad_row: drop).
REASONS = ("not_json", "not_an_object", "unknown_format", "missing_field", "not_a_list",
           "unknown_role", "not_a_string")


class BadRow(ValueError):
    """A row that cannot be converted: ``reason`` (one of REASONS) and what is wrong with it."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def detect(row: dict) -> str:
    """The format a row is in, by its fields (format auto)."""
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row or "output" in row:
        return "alpaca"
    raise BadRow("unknown_format", f"no 'messages', 'conversations' or 'instruction'/'output' field "
                 f"(fields: {sorted(row)[:8]}); data.chat.format names the format")


def text_field(obj: dict, key: str, where: str, optional: bool = False) -> str:
    """obj[key] as a string; a missing key is '' when optional (None too), else a BadRow."""
    if key not in obj or (optional and obj[key] is None):
        if optional:
            return ""
        raise BadRow("missing_field", f"{where}no '{key}' field")
    value = obj[key]
    if not isinstance(value, str):
        raise BadRow("not_a_string", f"{where}'{key}' is {type(value).__name__} {short(value)}, "
                     "not a string")
    return value


def short(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def turns(row: dict, fmt: str) -> list[dict]:
    """messages / sharegpt: the list of turns as canonical messages."""
    list_key, role_key, content_key = TURN_FIELDS[fmt]
    if list_key not in row:
        raise BadRow("missing_field", f"no '{list_key}' field")
    items = row[list_key]
    if not isinstance(items, list):
        raise BadRow("not_a_list", f"'{list_key}' is {type(items).__name__}, not a list")
    names = ROLE_NAMES[fmt]
    out = [{"role": "system", "content": text_field(row, "system", "")}] if row.get("system") else []
    for i, item in enumerate(items):
        where = f"{list_key}[{i}]: "
        if not isinstance(item, dict):
            raise BadRow("not_an_object", f"{where}is {type(item).__name__}, not an object")
        name = item.get(role_key)
        if role_key not in item:
            raise BadRow("missing_field", f"{where}no '{role_key}' field")
        if name not in names:
            raise BadRow("unknown_role", f"{where}unknown role {short(name)}; the {fmt} format's "
                         f"roles are {', '.join(names)}")
        out.append({"role": names[name], "content": text_field(item, content_key, where)})
    return out


def alpaca(row: dict) -> list[dict]:
    instruction, extra = text_field(row, "instruction", ""), text_field(row, "input", "", True)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    system = text_field(row, "system", "", optional=True)
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": text_field(row, "output", "")}]


def to_messages(row: object, fmt: str = "auto") -> tuple[list[dict], str]:
    """(canonical messages, the row's format) or BadRow."""
    if not isinstance(row, dict):
        raise BadRow("not_an_object", f"is {type(row).__name__} {short(row)}, not an object")
    fmt = detect(row) if fmt == "auto" else fmt
    return (alpaca(row) if fmt == "alpaca" else turns(row, fmt)), fmt


def read_records(path: Path) -> list[tuple[str, object]]:
    """(where, record) per row of a JSONL file, a JSON file (an array, or JSON lines) or Parquet.

    ``where`` names the row as a person finds it: ``line 3`` (1-based) in JSONL, ``element 2``
    (0-based) of a JSON array, ``row 2`` (0-based) of Parquet. A line that is not JSON becomes a
    BadRow record, so that it is counted or reported like any other bad row.
    """
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as err:  # pyarrow raises several types for a file that is not Parquet
            raise UserError(f"{path}: cannot be read as parquet: {str(err).splitlines()[0]}") from None
        return [(f"row {i}", r) for i, r in enumerate(rows)]
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        from lmforge.data.sources import not_utf8

        raise not_utf8(path) from None
    if text.lstrip().startswith("["):
        try:
            return [(f"element {i}", r) for i, r in enumerate(json.loads(text))]
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    records = []
    for no, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append((f"line {no}", json.loads(line)))
            except json.JSONDecodeError as err:
                records.append((f"line {no}", BadRow("not_json", f"not JSON ({err.msg}): "
                                                     f"{line.strip()[:60]!r}")))
    return records


def convert(records: list[tuple[str, object]], name: str, chat: Chat) -> tuple[pd.DataFrame, dict]:
    """The canonical table of one file's records and the rows dropped per reason (on_bad_row drop);
    a bad row with on_bad_row error is a UserError naming ``name`` and the row."""
    messages, formats, dropped = [], [], Counter()
    for where, record in records:
        try:
            if isinstance(record, BadRow):
                raise record
            row, fmt = to_messages(record, chat.format)
        except BadRow as bad:
            if chat.on_bad_row == "error":
                raise UserError(f"{name} {where}: {bad} ({bad.reason}; data.chat.on_bad_row: drop "
                                "skips such rows)") from None
            dropped[bad.reason] += 1
            continue
        messages.append(row)
        formats.append(fmt)
    if not messages:
        raise UserError(f"{name}: no conversation could be read ({len(records)} rows; dropped: "
                        f"{dict(dropped) or 'none'})")
    return pd.DataFrame({"messages": messages, "format": formats}), dict(dropped)


def read_file(path: Path, chat: Chat) -> pd.DataFrame:
    if path.suffix.lower() not in SUFFIXES:
        raise UserError(f"{path}: unsupported format '{path.suffix}' for conversations (data.chat): "
                        f"use {', '.join(SUFFIXES)}")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty")
    df, dropped = convert(read_records(path), str(path), chat)
    df.attrs |= {"path": str(path), "dropped": dropped}
    return df


def load_hub(dataset_id: str, chat: Chat) -> dict[str, pd.DataFrame]:
    """Every split of a hub dataset of conversations; offline this fails with a message."""
    import datasets

    try:
        dd = datasets.load_dataset(dataset_id)
    except Exception as err:  # the hub client raises many types (offline, 404, auth)
        raise UserError(f"data.source 'hf:{dataset_id}': cannot load from the Hugging Face hub "
                        f"({type(err).__name__}). Without network access, point data.source at a "
                        "local file or folder.") from None
    renamed = {"dev": "validation", "valid": "validation", "val": "validation"}
    tables = {}
    for split, ds in dd.items():
        name = f"hf:{dataset_id} [{split}]"
        df, dropped = convert([(f"row {i}", r) for i, r in enumerate(ds.to_list())], name, chat)
        df.attrs["dropped"] = dropped
        tables[renamed.get(split, split)] = df
    return tables


def load_conversations(data: Data) -> dict[str, pd.DataFrame]:
    """Read ``data.source`` as load_source does (file, split folder, hub), as conversations.

    Each table: ``messages`` and ``format`` columns; attrs ``path`` (a file) and ``dropped``.
    """
    if data.source.startswith(HF_PREFIX):
        return load_hub(data.source.removeprefix(HF_PREFIX), data.chat)
    path = Path(data.source)
    if not path.exists():
        raise UserError(f"data.source '{path}' does not exist")
    if not path.is_dir():
        return {"source": read_file(path, data.chat)}
    from lmforge.data.sources import find_split_files

    files = find_split_files(path, SUFFIXES)
    return {split: read_file(p, data.chat) for split, p in files.items()}


def clean_conversations(df: pd.DataFrame, data: Data) -> tuple[pd.DataFrame, dict[str, int]]:
    """data.clean on conversations: every content normalized and its whitespace collapsed (line
    breaks kept); a conversation without messages is empty; duplicates are equal conversations.

    Returns the table and the rows dropped per reason: the reading's (attrs ``dropped``) and
    ``empty`` / ``duplicate``. An empty content inside a conversation stays: validate names it.
    """
    read_drops = df.attrs.get("dropped", {})
    rows = [[dict(m) for m in conv] for conv in df["messages"]]
    contents = pd.Series([m["content"] for conv in rows for m in conv], dtype="string")
    cleaned = iter(clean_texts(contents, data.clean, keep_lines=True).tolist())
    for conv in rows:
        for m in conv:
            m["content"] = next(cleaned)
    df = pd.DataFrame({"messages": rows, "format": list(df["format"])})
    dropped = {reason: read_drops.get(reason, 0) for reason in REASONS} | {"empty": 0, "duplicate": 0}
    if data.clean.drop_empty:
        empty = df["messages"].map(len) == 0
        dropped["empty"] = int(empty.sum())
        df = df[~empty]
    if data.clean.drop_duplicates:
        dup = df["messages"].map(conversation_key).duplicated(keep="first")
        dropped["duplicate"] = int(dup.sum())
        df = df[~dup]
    return df.reset_index(drop=True), dropped


def manifest_detail(splits: dict[str, pd.DataFrame]) -> dict:
    """The manifest's numbers for conversations: characters and turns per split, and how many
    conversations of each source format each split holds."""
    chars = {s: int(sum(len(m["content"]) for conv in df["messages"] for m in conv))
             for s, df in splits.items()}
    turns_ = {s: int(df["messages"].map(len).sum()) for s, df in splits.items()}
    formats = {s: {f: int(n) for f, n in sorted(Counter(df["format"]).items())}
               for s, df in splits.items()}
    return {"chars": {**chars, "total": sum(chars.values())},
            "turns": {**turns_, "total": sum(turns_.values())}, "formats": formats}
