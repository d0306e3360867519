"""causal_lm on conversations (``data.chat``): the chat template, rendering, and which tokens the
loss counts. Used by prepare (lmforge/causal_lm/data.py) and evaluate.

- The tokenizer's own chat template renders each conversation (``apply_chat_template``). A tokenizer
  without one (our from-scratch BPE, a base model) gets DEFAULT_CHAT_TEMPLATE, ChatML-style with
  the tokenizer's EOS closing every message, saved into the tokenizer folder by prepare: train copies
  it beside the model, so evaluate and the service render with exactly the same template.
- Labels: the tokens of each assistant message (its content and the template's end-of-message
  text, e.g. EOS, but not the whitespace after it) carry the loss; with ``prepare.chat_loss:
  last_turn`` only those of the last one. Every other token is IGNORE.
- Spans are found by rendering the conversation prefix by prefix: assistant message i spans from
  the end of ``render(messages[:i], add_generation_prompt=True)`` to the end of
  ``render(messages[:i + 1])``; the full text is tokenized once, and a token counts when it starts
  inside a span (its character offsets), so the ids are exactly those of the whole rendered text.
- Over ``prepare.max_length`` tokens the oldest exchanges go, the system message stays
  (bento/prompts.py ``drop_oldest_exchange``, the service's rule too), or prepare refuses
  (``prepare.chat_overflow: refuse``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from bento.prompts import drop_oldest_exchange
from lmforge.common import IGNORE, UserError

IM_START = "<|im_start|>"  # a special token of the from-scratch BPE; plain text for other tokenizers
# ChatML's layout, with the tokenizer's EOS as <|im_end|>: every tokenizer has an EOS whose
# embedding a pretrained model already knows (a new token would stay untrained under LoRA), and
# generation stops at it without any stop string.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + eos_token + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def ensure_template(tokenizer) -> str:
    """Give a tokenizer without a chat template the default one; say which it renders with."""
    if tokenizer.chat_template:
        return "tokenizer"
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return "default"


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as the model reads it; a template that refuses it is a UserError."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as err:  # jinja2's TemplateError, raised by the template itself (raise_exception)
        raise UserError(f"the chat template refuses a conversation ({type(err).__name__}: {err}): "
                        f"{json.dumps(messages, ensure_ascii=False)[:200]}") from None


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant message in it."""
    text = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        through = render(tokenizer, messages[: i + 1])
        if not (text.startswith(before) and text.startswith(through) and through.startswith(before)):
            raise UserError("the chat template does not render a conversation prefix by prefix (an "
                            "earlier message renders differently once later ones follow), so the "
                            "assistant's tokens cannot be found: use a tokenizer with another template")
        spans.append((len(before), len(before) + len(through[len(before):].rstrip())))
    return text, spans


def label_ids(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]],
              last_only: bool) -> list[int]:
    """Labels: the id where the token starts inside a counted span, else IGNORE."""
    counted = spans[-1:] if last_only else spans
    return [i if any(a <= start < b for a, b in counted) else IGNORE
            for i, (start, _) in zip(ids, offsets, strict=True)]


def encode(tokenizer, messages: list[dict], last_only: bool) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one whole conversation."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], label_ids(enc["input_ids"], enc["offset_mapping"], spans, last_only)


@dataclass
class Encoded:
    """One training row, and what fitting it into max_length cost."""

    input_ids: list[int]
    labels: list[int]
    messages: list[dict]  # the conversation as encoded (oldest exchanges dropped)
    turns_dropped: int


def fit_conversation(tokenizer, messages: list[dict], max_length: int, last_only: bool,
                     refuse: bool, where: str) -> Encoded | None:
    """The conversation encoded within max_length tokens: the oldest exchanges dropped while it is
    longer (None when even its last exchange is), or a UserError naming it (``refuse``)."""
    kept = messages
    while True:
        ids, labels = encode(tokenizer, kept, last_only)
        if len(ids) <= max_length:
            return Encoded(ids, labels, kept, len(messages) - len(kept))
        if refuse:
            raise UserError(f"{where}: {len(ids)} tokens, over prepare.max_length ({max_length}); "
                            "prepare.chat_overflow: drop_oldest_turns would drop its oldest turns")
        kept = drop_oldest_exchange(kept)
        if kept is None:
            return None


def training_texts(conversations: Iterable[list[dict]]) -> Iterator[str]:
    """What a from-scratch BPE learns from: each message's role line and content."""
    for messages in conversations:
        for m in messages:
            yield f"{m['role']}\n{m['content']}"


def prompt_and_reference(messages: list[dict]) -> tuple[list[dict], str]:
    """Evaluate's example: the messages before the last assistant message, and that message."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]
