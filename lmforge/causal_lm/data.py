"""Causal-LM data for stage prepare: the tokenizer, packed text blocks, masked prompt/response rows.

Used by stages/prepare.py when ``task`` is causal_lm. The pure functions (``pack_blocks``,
``encode_pair``, and ``format_prompt`` from bento/prompts.py) are the data contract train, evaluate
and the service rely on:

- every text is tokenized without special tokens; the only special token ever added is EOS, after a
  document (plain text) or a response (pairs);
- plain text: documents + EOS are concatenated per split and cut into ``prepare.block_size`` blocks,
  labels == input_ids;
- pairs: ids(template with the prompt) + ids(response) + [EOS], labels -100 on the prompt part;
- conversations (``data.chat``): each rendered with the tokenizer's chat template, labels on the
  assistant messages only (lmforge/causal_lm/chat.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain

import pandas as pd

from bento.prompts import format_prompt
from lmforge.causal_lm import chat
from lmforge.common import IGNORE, UserError
from lmforge.data.messages import as_list
from lmforge.models import load_tokenizer, resolve_model_source
from lmforge.params import SCRATCH, Params
from lmforge.tasks import CAUSAL_LM

EOS = "<|endoftext|>"  # end of a document or response; also BOS, as in GPT-2
PAD = "<|pad|>"


def pack_blocks(docs: Iterable[Sequence[int]], eos_id: int, block_size: int) -> list[list[int]]:
    """Concatenate the documents' token ids, each followed by EOS, and cut into block_size blocks.

    The last block keeps the remainder (shorter than block_size) rather than dropping tokens.
    """
    stream = list(chain.from_iterable(chain(doc, (eos_id,)) for doc in docs))
    return [stream[i : i + block_size] for i in range(0, len(stream), block_size)]


def encode_pair(
    prompt_ids: Sequence[int], response_ids: Sequence[int], eos_id: int, max_length: int
) -> tuple[list[int], list[int], bool] | None:
    """One training row: (input_ids, labels, truncated), or None when no response token is left.

    input_ids = prompt + response + [EOS]; labels are IGNORE on the prompt, then response + EOS.
    Over max_length, the prompt is cut from the left first (its end, next to the response, is what
    generation continues from), down to nothing if need be; then response + EOS from the right (a
    cut response keeps no EOS: the model must not learn to stop mid-answer).
    """
    target = [*response_ids, eos_id]
    keep = max(0, min(len(prompt_ids), max_length - len(target)))
    prompt = list(prompt_ids[len(prompt_ids) - keep :])
    target = target[: max_length - len(prompt)]
    if not response_ids or not target:
        return None
    truncated = len(prompt) < len(prompt_ids) or len(target) <= len(response_ids)
    return prompt + target, [IGNORE] * len(prompt) + target, truncated


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int,
              specials: Sequence[str] = ()):
    """A byte-level BPE (GPT-2 style) trained on texts, as a transformers fast tokenizer.

    Specials: EOS (also BOS) and PAD, ids 0 and 1, then ``specials`` (conversations: the chat
    template's IM_START). The same texts give the same vocabulary: merges with equal counts are
    ordered by token id, and the byte alphabet is fixed.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS, PAD, *specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    # No cleanup on decode: " ." must come back as " .", so decode(encode(text)) == text.
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS,
                                   pad_token=PAD, clean_up_tokenization_spaces=False)


def pretrained_tokenizer(source: str, trust_remote_code: bool = False):
    """The model source's fast tokenizer, with pad = EOS when it has no pad token."""
    tokenizer = load_tokenizer(resolve_model_source(source), trust_remote_code)
    if not tokenizer.is_fast:
        raise UserError(f"model.source '{source}': no fast tokenizer (tokenizer.json) found")
    if tokenizer.eos_token is None:
        raise UserError(
            f"model.source '{source}': its tokenizer has no eos_token; causal_lm ends every document "
            "and response with EOS so the model learns where text stops (use another model.source)"
        )
    if tokenizer.pad_token is None:  # padded positions carry no loss, so any id will do
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def lm_columns(params: Params) -> list[str]:
    """The interim columns causal_lm reads: [text] or [prompt, response]."""
    data = params.data
    return [data.prompt_column, data.response_column] if data.pairs else [data.text_column]


def training_texts(train: pd.DataFrame, params: Params) -> Iterator[str]:
    """What the BPE learns from: the train texts, or each formatted prompt and each response."""
    if not params.data.pairs:
        yield from train[params.data.text_column].astype(str)
        return
    prompt, response = lm_columns(params)
    for p, r in zip(train[prompt].astype(str), train[response].astype(str), strict=True):
        yield format_prompt(p, params.prepare.template)
        yield r


def lm_tokenizer(params: Params, train: pd.DataFrame):
    """model.source 'scratch': a BPE trained on the train split; else the pretrained tokenizer.
    Conversations: with a chat template (the tokenizer's, else the default one)."""
    model, conversations = params.model, params.data.chat is not None
    if model.source != SCRATCH:
        tokenizer = pretrained_tokenizer(model.source, model.trust_remote_code)
    elif conversations:
        texts = chat.training_texts(as_list(m) for m in train["messages"])
        cfg = model.scratch
        tokenizer = train_bpe(texts, cfg.vocab_size, cfg.min_frequency, specials=(chat.IM_START,))
    else:
        cfg = model.scratch
        return train_bpe(training_texts(train, params), cfg.vocab_size, cfg.min_frequency)
    if conversations:
        chat.ensure_template(tokenizer)
    return tokenizer


def encode_texts(tokenizer, texts: Sequence[str], batch_size: int) -> list[list[int]]:
    """Token ids of each text, no special tokens; verbose=False: long documents are expected."""
    ids: list[list[int]] = []
    for i in range(0, len(texts), batch_size):
        batch = list(texts[i : i + batch_size])
        ids += tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
    return ids


def to_dataset(columns: dict[str, list]):
    """A datasets.Dataset with fixed column types (an empty split keeps them too)."""
    from datasets import Dataset, Features, List, Value

    types = {"input_ids": List(Value("int32")), "labels": List(Value("int64")),
             "prompt": Value("string"), "response": Value("string")}
    return Dataset.from_dict(columns, features=Features({c: types[c] for c in columns}))


def packed_split(texts: Sequence[str], tokenizer, params: Params) -> tuple[object, dict]:
    """Plain text: a Dataset of packed blocks (labels == input_ids) and its stats."""
    docs = encode_texts(tokenizer, texts, params.prepare.map_batch_size)
    blocks = pack_blocks(docs, tokenizer.eos_token_id, params.prepare.block_size)
    stats = {"texts": len(texts), "rows": len(blocks), "tokens": sum(map(len, blocks)),
             "truncated": 0, "dropped": 0}
    return to_dataset({"input_ids": blocks, "labels": [list(b) for b in blocks]}), stats


def pairs_split(df: pd.DataFrame, tokenizer, params: Params) -> tuple[object, dict]:
    """Pairs: a Dataset of masked rows, with the raw prompt and response, and its stats."""
    prep, (p_col, r_col) = params.prepare, lm_columns(params)
    prompts, responses = list(df[p_col].astype(str)), list(df[r_col].astype(str))
    formatted = [format_prompt(p, prep.template) for p in prompts]
    p_ids = encode_texts(tokenizer, formatted, prep.map_batch_size)
    r_ids = encode_texts(tokenizer, responses, prep.map_batch_size)
    cols: dict[str, list] = {"input_ids": [], "labels": [], "prompt": [], "response": []}
    truncated = 0
    for row in zip(p_ids, r_ids, prompts, responses, strict=True):
        encoded = encode_pair(row[0], row[1], tokenizer.eos_token_id, prep.max_length)
        if encoded is None:
            continue
        for key, value in zip(cols, (*encoded[:2], *row[2:]), strict=True):
            cols[key].append(value)
        truncated += encoded[2]
    rows = len(cols["input_ids"])
    stats = {"texts": len(df), "rows": rows, "tokens": sum(map(len, cols["input_ids"])),
             "truncated": truncated, "dropped": len(df) - rows}
    return to_dataset(cols), stats


def chat_split(df: pd.DataFrame, tokenizer, params: Params, split: str) -> tuple[object, dict]:
    """Conversations: a Dataset of rendered rows with labels on the assistant tokens, each with its
    prompt (JSON of the messages before the last assistant message) and response (that message)
    for evaluate; and its stats."""
    prep = params.prepare
    cols: dict[str, list] = {"input_ids": [], "labels": [], "prompt": [], "response": []}
    truncated = turns_dropped = 0
    for i, messages in enumerate(df["messages"]):
        encoded = chat.fit_conversation(
            tokenizer, as_list(messages), prep.max_length, prep.chat_loss == "last_turn",
            prep.chat_overflow == "refuse", f"{split} conversation {i}")
        if encoded is None:
            continue
        prompt, response = chat.prompt_and_reference(encoded.messages)
        for key, value in zip(cols, (encoded.input_ids, encoded.labels,
                                     json.dumps(prompt, ensure_ascii=False), response), strict=True):
            cols[key].append(value)
        truncated += encoded.turns_dropped > 0
        turns_dropped += encoded.turns_dropped
    rows = len(cols["input_ids"])
    stats = {"texts": len(df), "rows": rows, "tokens": sum(map(len, cols["input_ids"])),
             "assistant_tokens": sum(sum(x != IGNORE for x in row) for row in cols["labels"]),
             "truncated": truncated, "turns_dropped": turns_dropped, "dropped": len(df) - rows}
    return to_dataset(cols), stats


def encode_split(df: pd.DataFrame, tokenizer, params: Params, split: str) -> tuple[object, dict]:
    """One interim split as training rows; a split that loses every row is an error."""
    if params.data.chat is not None:
        ds, stats = chat_split(df, tokenizer, params, split)
    elif params.data.pairs:
        ds, stats = pairs_split(df, tokenizer, params)
    else:
        ds, stats = packed_split(list(df[params.data.text_column].astype(str)), tokenizer, params)
    if stats["rows"] == 0:
        raise UserError(
            f"{split}: no rows left after tokenizing ({stats['texts']} texts, {stats['dropped']} "
            "without a response token); check the data and prepare.max_length"
        )
    return ds, stats


def lm_info(params: Params, tokenizer) -> dict:
    """lm.json: how the data was encoded, for train, evaluate and the service."""
    pairs, conversations = params.data.pairs, params.data.chat is not None
    return {
        "task": CAUSAL_LM,
        "format": "chat" if conversations else "pairs" if pairs else "text",
        **({"chat_loss": params.prepare.chat_loss} if conversations else {}),
        "template": params.prepare.template if pairs else None,
        "block_size": params.prepare.block_size,
        "max_length": params.prepare.max_length,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def encode_splits(params: Params, frames: dict[str, pd.DataFrame]) -> tuple[object, dict, dict, dict]:
    """Stage prepare's work for causal_lm: (tokenizer, Dataset per split, lm.json, stats per split)."""
    tokenizer = lm_tokenizer(params, frames["train"])
    splits, stats = {}, {}
    for split, df in frames.items():
        splits[split], stats[split] = encode_split(df, tokenizer, params, split)
    return tokenizer, splits, lm_info(params, tokenizer), stats
