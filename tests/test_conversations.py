"""Conversations (data.chat) in ingest and validate: the three formats converted to one `messages`
form, detection, every bad row named (or dropped and counted), the manifest's counts, and each chat
check of validate on a conversation that breaks it."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from lmforge.common import UserError
from lmforge.data.chat_checks import problems
from lmforge.data.conversations import BadRow, to_messages
from lmforge.params import parse_params
from stages import ingest, validate
from tests.conftest import tmp_paths

SYSTEM = {"role": "system", "content": "You answer briefly."}


def chat_params(tmp_path, source, **sections) -> object:
    raw = {"task": "causal_lm", "paths": tmp_paths(tmp_path),
           "data": {"source": str(source), "chat": {}, "split": {"validation": 0.2, "test": 0.2}},
           "model": {"source": "scratch"},
           "validate": {"min_rows_per_class": None, "max_majority_share": None},
           "train": {"early_stopping": None},
           "gate": {"floors": {"perplexity": {"max": 1e9}}, "tolerances": {}}}
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return parse_params(raw)


def conversation(i: int, turns: int = 2) -> list[dict]:
    """A system message and ``turns`` user/assistant exchanges, distinct per i."""
    out = [SYSTEM]
    for t in range(turns):
        out += [{"role": "user", "content": f"question {t} of conversation {i}"},
                {"role": "assistant", "content": f"answer {t} to {i}"}]
    return out


def as_sharegpt(messages: list[dict]) -> dict:
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in messages]}


def as_alpaca(messages: list[dict]) -> dict:
    """A single exchange (with an optional system message) as an Alpaca row."""
    by_role = {m["role"]: m["content"] for m in messages}
    instruction, _, extra = by_role["user"].partition("\n\n")
    return {"instruction": instruction, "input": extra, "output": by_role["assistant"],
            **({"system": by_role["system"]} if "system" in by_role else {})}


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# --- conversion -------------------------------------------------------------------------------------

def test_the_three_formats_convert_to_the_same_messages():
    messages = conversation(1, turns=1)
    assert to_messages({"messages": messages}) == (messages, "messages")
    assert to_messages(as_sharegpt(messages)) == (messages, "sharegpt")
    assert to_messages(as_alpaca(messages)) == (messages, "alpaca")
    # Alpaca's input follows the instruction after a blank line; no system field, no system message.
    row = {"instruction": "Translate", "input": "a cat", "output": "eine Katze"}
    assert to_messages(row)[0] == [{"role": "user", "content": "Translate\n\na cat"},
                                   {"role": "assistant", "content": "eine Katze"}]
    # ShareGPT's top-level system field, OpenAI's developer role, extra keys ignored.
    share = {"system": "Be kind.", "conversations": [{"from": "human", "value": "hi"},
                                                     {"from": "gpt", "value": "hello", "weight": 1}]}
    assert to_messages(share)[0][0] == {"role": "system", "content": "Be kind."}
    dev = {"messages": [{"role": "developer", "content": "Be kind.", "name": "x"}]}
    assert to_messages(dev)[0] == [{"role": "system", "content": "Be kind."}]


@pytest.mark.parametrize(("row", "fmt", "reason", "message"), [
    ({"messages": [{"role": "bot", "content": "hi"}]}, "auto", "unknown_role",
     "messages[0]: unknown role \"bot\""),
    ({"conversations": [{"from": "tool", "value": "x"}]}, "auto", "unknown_role",
     "unknown role \"tool\"; the sharegpt format's roles are system, human, user, gpt, assistant"),
    ({"messages": [{"role": "user"}]}, "auto", "missing_field", "messages[0]: no 'content' field"),
    ({"messages": [{"content": "hi"}]}, "auto", "missing_field", "messages[0]: no 'role' field"),
    ({"conversations": [{"from": "human"}]}, "auto", "missing_field", "no 'value' field"),
    ({"instruction": "x"}, "auto", "missing_field", "no 'output' field"),
    ({"messages": [{"role": "user", "content": 5}]}, "auto", "not_a_string",
     "'content' is int 5, not a string"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, "auto",
     "not_a_string", "'content' is list"),
    ({"instruction": "x", "output": None}, "auto", "not_a_string", "'output' is NoneType"),
    ({"messages": "hi"}, "auto", "not_a_list", "'messages' is str, not a list"),
    ({"text": "hi"}, "auto", "unknown_format", "no 'messages', 'conversations' or"),
    ({"text": "hi"}, "sharegpt", "missing_field", "no 'conversations' field"),
    (["a list"], "auto", "not_an_object", "is list"),
])
def test_a_bad_row_names_its_reason_and_field(row, fmt, reason, message):
    with pytest.raises(BadRow) as bad:
        to_messages(row, fmt)
    assert bad.value.reason == reason
    assert message in str(bad.value)


# --- ingest ---------------------------------------------------------------------------------------

def test_ingest_reads_jsonl_json_and_parquet_with_counts_per_format(tmp_path):
    folder = tmp_path / "chats"
    folder.mkdir()
    rows = [{"messages": conversation(i)} for i in range(10)]
    rows += [as_sharegpt(conversation(i)) for i in range(10, 16)]
    rows += [as_alpaca(conversation(i, turns=1)) for i in range(16, 20)]
    write_jsonl(folder / "train.jsonl", rows)
    (folder / "validation.json").write_text(json.dumps([as_alpaca(conversation(30, 1))]))
    pd.DataFrame({"messages": [conversation(40), conversation(41)]}).to_parquet(folder / "test.parquet")
    params = chat_params(tmp_path, folder)

    manifest = ingest.main(params)

    assert manifest["rows"] == {"train": 20, "validation": 1, "test": 2, "total": 23}
    assert manifest["formats"] == {"train": {"alpaca": 4, "messages": 10, "sharegpt": 6},
                                   "validation": {"alpaca": 1}, "test": {"messages": 2}}
    assert manifest["turns"]["test"] == 10 and manifest["chars"]["total"] > 0
    train = pd.read_parquet(params.paths.interim / "train.parquet")
    assert list(train.columns) == ["messages", "format"]
    assert [dict(m) for m in train["messages"][10]] == conversation(10)  # sharegpt, converted
    assert sorted(p.name for p in params.paths.raw.iterdir()) == [
        "test.parquet", "train.jsonl", "validation.json"]


def test_a_bad_row_stops_ingest_naming_the_file_and_line(tmp_path):
    source = tmp_path / "chats.jsonl"
    write_jsonl(source, [{"messages": conversation(i)} for i in range(5)])
    with source.open("a") as f:
        f.write(json.dumps({"messages": [{"role": "bot", "content": "hi"}]}) + "\n")
    with pytest.raises(UserError) as err:
        ingest.main(chat_params(tmp_path, source))
    assert str(err.value).startswith(f"{source} line 6: messages[0]: unknown role \"bot\"")
    assert "data.chat.on_bad_row: drop" in str(err.value)


def test_bad_rows_are_dropped_and_counted_per_reason_when_params_say_so(tmp_path):
    source = tmp_path / "chats.jsonl"
    rows = [{"messages": conversation(i)} for i in range(12)]
    rows.insert(3, {"messages": [{"role": "bot", "content": "hi"}]})
    rows.insert(5, {"messages": [{"role": "user", "content": 5}]})
    rows.insert(7, {"conversations": [{"from": "human"}]})
    rows.append({"messages": conversation(0)})  # a duplicate
    write_jsonl(source, rows)
    with source.open("a") as f:
        f.write("{not json\n")
    params = chat_params(tmp_path, source, data={"chat": {"on_bad_row": "drop"}})

    manifest = ingest.main(params)

    dropped = manifest["dropped"]["source"]
    assert {k: v for k, v in dropped.items() if v} == {
        "unknown_role": 1, "not_a_string": 1, "missing_field": 1, "not_json": 1, "duplicate": 1}
    assert manifest["rows"]["total"] == 12


def test_a_json_array_and_parquet_name_their_bad_rows(tmp_path):
    source = tmp_path / "alpaca.json"
    source.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a"}]))
    with pytest.raises(UserError, match=r"alpaca.json element 1: no 'output' field"):
        ingest.main(chat_params(tmp_path, source))
    source = tmp_path / "chats.parquet"
    pd.DataFrame({"conversations": [[{"from": "human", "value": "x"}],
                                    [{"from": "robot", "value": "y"}]]}).to_parquet(source)
    with pytest.raises(UserError, match=r"chats.parquet row 1: conversations\[0\]: unknown role"):
        ingest.main(chat_params(tmp_path, source))


def test_the_format_set_in_params_is_required_of_every_row(tmp_path):
    source = tmp_path / "chats.jsonl"
    write_jsonl(source, [{"messages": conversation(i)} for i in range(3)] + [as_sharegpt(conversation(9))])
    with pytest.raises(UserError, match=r"line 4: no 'messages' field"):
        ingest.main(chat_params(tmp_path, source, data={"chat": {"format": "messages"}}))


def test_chat_params_are_checked_against_task_and_pairs():
    with pytest.raises(UserError, match="data.chat: conversations are for task causal_lm"):
        parse_params({"data": {"chat": {}}})
    with pytest.raises(UserError, match="a source holds conversations or pairs, not both"):
        parse_params({"task": "causal_lm", "model": {"source": "scratch"},
                      "data": {"chat": {}, "prompt_column": "p", "response_column": "r"}})
    with pytest.raises(UserError, match="data.chat.format"):
        parse_params({"task": "causal_lm", "data": {"chat": {"format": "openai"}}})


# --- validate ---------------------------------------------------------------------------------------

def test_a_good_conversation_has_no_problem():
    v = parse_params({}).validate_
    assert set(problems(conversation(1), v).values()) == {None}


@pytest.mark.parametrize(("messages", "column", "message"), [
    ([{"role": "user", "content": "x"}, {"role": "bot", "content": "x"},
      {"role": "assistant", "content": "y"}], "role_not_allowed",
     "role not one of system, user, assistant: message 1: 'bot'"),
    ([{"role": "user", "content": "x"}, SYSTEM, {"role": "assistant", "content": "y"}],
     "system_not_first", "system message(s) at 1: only the first may be one"),
    ([{"role": "user", "content": "x"}, {"role": "user", "content": "y"},
      {"role": "assistant", "content": "z"}], "turns_out_of_order",
     "message 1 is user after user (expected assistant)"),
    ([SYSTEM, {"role": "assistant", "content": "y"}], "turns_out_of_order",
     "message 1 is assistant after the start (expected user)"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
      {"role": "user", "content": "z"}], "last_turn_not_assistant", "the last message is user"),
    ([{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}], "empty_turn",
     "message(s) 0 blank"),
    (conversation(1, turns=3), "turns_out_of_bounds", "7 messages (validate.max_turns 6)"),
    ([{"role": "user", "content": "x" * 60}, {"role": "assistant", "content": "y"}],
     "chars_out_of_bounds", "61 characters (validate.min_text_chars 1, max_text_chars 50)"),
])
def test_each_chat_check_names_what_is_wrong(messages, column, message):
    chars = 200 if column == "turns_out_of_bounds" else 50  # 7 messages pass the character bound
    v = parse_params({"validate": {"max_turns": 6, "max_text_chars": chars}}).validate_
    found = problems(messages, v)
    assert found[column] == message
    assert [c for c, p in found.items() if p] == [column]  # and nothing else is blamed


def write_interim(params, splits: dict[str, list[list[dict]]]) -> None:
    params.paths.interim.mkdir(parents=True)
    for split, rows in splits.items():
        pd.DataFrame({"messages": rows, "format": "messages"}).to_parquet(
            params.paths.interim / f"{split}.parquet")


def test_validate_fails_naming_the_split_row_and_check(tmp_path):
    params = chat_params(tmp_path, tmp_path / "unused.jsonl")
    train = [conversation(i) for i in range(8)]
    bad = conversation(50)[:-1]  # ends with the user
    leaked = [SYSTEM, {"role": "user", "content": "question 0 of conversation 3"},
              {"role": "assistant", "content": "something else"}]
    write_interim(params, {"train": train, "validation": [conversation(40), bad],
                           "test": [conversation(41), leaked]})

    with pytest.raises(UserError) as err:
        validate.main(params)

    text = str(err.value)
    assert "validation failed: 2 of 26 checks" in text
    assert "validation/ends_with_assistant: 1 unexpected" in text
    assert "validation row 1: the last message is user" in text
    assert "test/no_leakage_from_train: 1 unexpected" in text
    assert "test row 1: 'question 0 of conversation 3'" in text
    report = json.loads(params.paths.validation.read_text())
    assert report["checks"]["test/no_leakage_from_train"] == 1
    assert report["checks"]["train/turns_alternate"] == 0


def test_validate_passes_clean_conversations(tmp_path):
    params = chat_params(tmp_path, tmp_path / "unused.jsonl")
    write_interim(params, {"train": [conversation(i) for i in range(8)],
                           "validation": [conversation(20)], "test": [conversation(21)]})
    report = validate.main(params)
    assert report["success"] and len(report["checks"]) == 26


@pytest.mark.parametrize(("name", "content", "message"), [
    ("chats.jsonl", "", "the file is empty"),
    ("chats.csv", "messages\nx\n", "unsupported format '.csv' for conversations (data.chat): use "
     ".jsonl, .json, .parquet"),
    ("chats.json", '[{"messages": []', "not valid JSON (line 1:"),
    ("chats.jsonl", '{"text": "a"}\n{"text": "b"}\n', "no conversation could be read (2 rows; "
     "dropped: {'unknown_format': 2})"),
])
def test_an_unreadable_file_stops_ingest_whatever_on_bad_row_says(tmp_path, name, content, message):
    source = tmp_path / name
    source.write_text(content)
    with pytest.raises(UserError) as err:
        ingest.main(chat_params(tmp_path, source, data={"chat": {"on_bad_row": "drop"}}))
    assert str(err.value).startswith(str(source)) and message in str(err.value)
