"""How bento/generate.py turns prompts into token rows and generated ids into answers.

Pure functions (no model, no BentoML, no store lookup at import), so tests call them directly.
They mirror stage prepare: a pairs model saw ``template`` around each prompt, and tokens were made
with add_special_tokens=False. ``format_prompt`` is the one definition of the prompt contract:
lmforge/causal_lm/data.py imports it from here, so training and serving cannot diverge.
"""


def format_prompt(prompt: str, template: str | None) -> str:
    """The text the model continues: the prompt inside the training template (its one ``{prompt}``
    slot), or the prompt itself for a plain-text model (template None).

    A plain replace, not ``str.format``: braces elsewhere in the template are text, not fields.
    """
    return prompt if template is None else template.replace("{prompt}", prompt)


def fit_context(ids: list[int], budget: int, start_id: int) -> list[int]:
    """The last ``budget`` ids: the end of a prompt is what the continuation follows.

    An empty prompt becomes ``[start_id]`` (BOS, or EOS for GPT-2 style tokenizers, which mark a
    document start with it), so the model has a position to continue from.
    """
    if budget < 1:
        raise ValueError(f"no room for a prompt token (budget {budget})")
    return ids[-budget:] if ids else [start_id]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """(input_ids, attention_mask) of one batch, padded on the left so that every row ends with
    its own last token: generation appends after the last position of each row."""
    width = max(len(r) for r in rows)
    ids = [[pad_id] * (width - len(r)) + r for r in rows]
    mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    return ids, mask


def until_stop(generated: list[int], stop_ids: set[int]) -> tuple[list[int], bool]:
    """The ids a row generated up to and including its first stop id (what follows is padding
    of a batch that went on for other rows), and whether it stopped there."""
    for i, token in enumerate(generated):
        if token in stop_ids:
            return generated[: i + 1], True
    return generated, False


def stop_id_set(*ids: int | list[int] | None) -> set[int]:
    """Every EOS id named by the tokenizer and the generation config (an int, a list, or None)."""
    found: set[int] = set()
    for value in ids:
        found |= set(value) if isinstance(value, list) else {value} if value is not None else set()
    return found


def drop_oldest_exchange(messages: list[dict]) -> list[dict] | None:
    """The conversation without its oldest exchange: the first message after the leading system
    message(s), and what follows it up to the next user message. None when the last user message
    would go: there is nothing left to drop.

    The one rule for a conversation over the context, in prepare (prepare.chat_overflow) and in
    the service's /v1/chat/completions alike: the system message stays, the oldest turns go.
    """
    start = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    users = [i for i in range(start + 1, len(messages)) if messages[i]["role"] == "user"]
    if not users:
        return None
    return messages[:start] + messages[users[0]:]
