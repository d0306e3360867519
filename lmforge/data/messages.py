"""The canonical conversation, as ingest writes it and validate, prepare and evaluate read it: a list
of ``{"role", "content"}`` messages, roles from ROLES (lmforge/data/conversations.py converts the
source formats to it). Pure functions, no imports beyond the standard library.
"""

from __future__ import annotations

import json

ROLES = ("system", "user", "assistant")


def conversation_key(messages) -> str:
    """One string per conversation, equal for equal conversations (duplicates, leakage)."""
    return json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)


def first_user_turn(messages) -> str | None:
    return next((m["content"] for m in messages if m["role"] == "user"), None)


def as_list(messages) -> list[dict]:
    """Plain Python messages from what Parquet, Arrow or JSON give (numpy arrays, mappings)."""
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
