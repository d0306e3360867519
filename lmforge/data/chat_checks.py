"""Stage validate's checks on conversations (``data.chat``): the derived tables and expectations.

As for the other checks of stages/validate.py, what Great Expectations has no expectation for is
computed here into a column that holds a description of the problem (naming the split's row and
turn) where a conversation has it, and is null elsewhere; "values must be null" then counts the
conversations and shows the descriptions as examples. The checks, per split:

- ``roles_allowed``: every role is system, user or assistant;
- ``system_only_first``: a system message only as the first message;
- ``turns_alternate``: after it, user and assistant take turns, the user first;
- ``ends_with_assistant``: the last message is the assistant's (what the model learns to say);
- ``no_empty_turn``: no blank content;
- ``turns_within_bounds``: at most ``validate.max_turns`` messages;
- ``chars_within_bounds``: the characters of the whole conversation within
  ``validate.min_text_chars``..``max_text_chars``;
- ``duplicate_share``: at most ``validate.max_duplicate_share`` of the conversations repeat an
  earlier one;
- ``no_leakage_from_train`` (validation, test): no first user turn also opens a train conversation.
"""

from __future__ import annotations

import pandas as pd

from lmforge.common import SPLITS, UserError
from lmforge.data.messages import ROLES, conversation_key, first_user_turn
from lmforge.params import Params, Validate

REPEATS = "conversation_repeats_earlier_row"
LEAKED = "first_user_turn_in_train"
# check name -> the derived column that holds its problems
COLUMNS = {
    "roles_allowed": "role_not_allowed",
    "system_only_first": "system_not_first",
    "turns_alternate": "turns_out_of_order",
    "ends_with_assistant": "last_turn_not_assistant",
    "no_empty_turn": "empty_turn",
    "turns_within_bounds": "turns_out_of_bounds",
    "chars_within_bounds": "chars_out_of_bounds",
}


def system_problem(roles: list[str]) -> str | None:
    late = [str(i) for i, role in enumerate(roles) if role == "system" and i > 0]
    return f"system message(s) at {', '.join(late)}: only the first may be one" if late else None


def alternation_problem(roles: list[str]) -> str | None:
    """Where user and assistant first fail to take turns (the user first); system messages and
    unknown roles are other checks' business."""
    expected, previous = "user", "the start"
    for i, role in enumerate(roles):
        if role not in ("user", "assistant"):
            continue
        if role != expected:
            return f"message {i} is {role} after {previous} (expected {expected})"
        expected, previous = ("assistant" if role == "user" else "user"), role
    return None


def problems(messages, v: Validate) -> dict[str, str | None]:
    """What is wrong with one conversation, per derived column (None: nothing)."""
    roles = [str(m["role"]) for m in messages]
    found = dict.fromkeys(COLUMNS.values())
    bad_roles = [f"message {i}: {r!r}" for i, r in enumerate(roles) if r not in ROLES]
    if bad_roles:
        found["role_not_allowed"] = f"role not one of {', '.join(ROLES)}: {', '.join(bad_roles)}"
    found["system_not_first"] = system_problem(roles)
    found["turns_out_of_order"] = alternation_problem(roles)
    if not roles or roles[-1] != "assistant":
        found["last_turn_not_assistant"] = f"the last message is {roles[-1] if roles else 'missing'}"
    empty = [str(i) for i, m in enumerate(messages) if not str(m["content"]).strip()]
    if empty:
        found["empty_turn"] = f"message(s) {', '.join(empty)} blank"
    if v.max_turns is not None and len(roles) > v.max_turns:
        found["turns_out_of_bounds"] = f"{len(roles)} messages (validate.max_turns {v.max_turns})"
    chars = sum(len(str(m["content"])) for m in messages)
    lo, hi = v.min_text_chars, v.max_text_chars
    if (lo is not None and chars < lo) or (hi is not None and chars > hi):
        found["chars_out_of_bounds"] = (f"{chars} characters (validate.min_text_chars {lo}, "
                                        f"max_text_chars {hi})")
    return found


def derived_table(df: pd.DataFrame, split: str, train_openers: set[str] | None,
                  v: Validate) -> pd.DataFrame:
    """One split's derived columns, each problem prefixed with the split and row that has it."""
    rows = []
    keys = df["messages"].map(conversation_key)
    repeated = keys.duplicated(keep="first")
    for i, messages in enumerate(df["messages"]):
        where = f"{split} row {i}: "
        row = {c: (where + p if p else None) for c, p in problems(messages, v).items()}
        row[REPEATS] = where + keys.iloc[i][:80] if repeated.iloc[i] else None
        if train_openers is not None:
            opener = first_user_turn(messages)
            row[LEAKED] = where + repr(opener[:80]) if opener in train_openers else None
        rows.append(row)
    columns = [*COLUMNS.values(), REPEATS] + ([LEAKED] if train_openers is not None else [])
    return pd.DataFrame(rows, columns=columns).astype("object")


def chat_suite(frames: dict[str, pd.DataFrame], params: Params) -> tuple[dict, dict]:
    """(tables GX validates, {table: [(check name, expectation)]}) for conversations."""
    from great_expectations import expectations as gxe

    v = params.validate_
    for split, df in frames.items():
        if "messages" not in df.columns:
            raise UserError(f"{split}: the interim split has no 'messages' column, but data.chat is "
                            "set: the data is stale, run `dvc repro ingest`")
    openers = {first_user_turn(m) for m in frames["train"]["messages"]} - {None}
    derived, checks = {}, {}
    for split in SPLITS:
        leak = openers if split != "train" and v.check_leakage else None
        derived[split] = derived_table(frames[split], split, leak, v)
        named = [(name, gxe.ExpectColumnValuesToBeNull(column=column))
                 for name, column in COLUMNS.items()]
        if v.max_duplicate_share is not None:
            named.append(("duplicate_share", gxe.ExpectColumnValuesToBeNull(
                column=REPEATS, mostly=1 - v.max_duplicate_share)))
        if leak is not None:
            named.append(("no_leakage_from_train", gxe.ExpectColumnValuesToBeNull(column=LEAKED)))
        checks[split] = [(f"{split}/{name}", exp) for name, exp in named]
    return derived, checks
