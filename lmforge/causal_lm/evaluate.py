"""causal_lm evaluation: perplexity of the trained and the starting model and generations (stage
evaluate), and the scorer stage export runs on the same rows for PyTorch and ONNX alike.

Reads the trained model, its tokenizer and ``lm.json`` from ``paths.model`` and the test split from
``paths.processed/datasets``. Writes ``paths.eval_metrics`` (perplexity, perplexity_start, loss,
tokens, n; pairs and conversations add bleu, rouge1, rouge2, rougeL, exact_match, generated; a
conversation is scored on its last assistant message), ``paths.eval_plots/perplexity.csv``
(start vs trained) and ``paths.eval_reports/generations.csv`` (prompt, reference, generated), and
adds the test/* metrics and these files to train's MLflow run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bento.prompts import format_prompt
from lmforge import tracking
from lmforge.causal_lm import chat
from lmforge.causal_lm import model as lm
from lmforge.common import UserError, read_json, rounded, write_json
from lmforge.metrics import load_metric
from lmforge.models import device, require_trained
from lmforge.params import Generation, Params
from lmforge.tasks import CAUSAL_LM, task
from lmforge.training.lit import pad_batch

PERPLEXITY_CSV = task(CAUSAL_LM).plots[0]  # in paths.eval_plots
GENERATIONS_CSV = task(CAUSAL_LM).reports[0]  # in paths.eval_reports
CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel")  # class name endings of Hugging Face causal LMs


def load_trained(folder: Path):
    """The trained causal LM (eval mode, on the GPU when there is one), its tokenizer and lm.json."""
    require_trained(folder)
    meta = read_json(folder / "lm.json", "the model was not trained for task causal_lm: run "
                     "`dvc repro train`")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a weight-loading bar per run floods DVC's output
    archs = AutoConfig.from_pretrained(str(folder), trust_remote_code=False).architectures or []
    if archs and not any(a.endswith(CAUSAL_HEADS) for a in archs):
        raise UserError(f"{folder} holds a {', '.join(archs)}, not a causal LM: the model is stale, "
                        "run `dvc repro train`")
    try:  # our own train output: weights from safetensors, never code shipped beside them
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), use_safetensors=True, trust_remote_code=False)
    except ValueError as err:  # an architecture transformers has no causal LM class for
        raise UserError(f"{folder}: not a causal LM: {' '.join(str(err).split())[:300]}") from None
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    return model.to(device()).eval(), tokenizer, meta


def pad_right(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and labels (B, T) padded on the right as in training (padding
    carries no loss); other columns of the rows (prompt, response) are left out."""
    return pad_batch([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows], pad_id)


def sequence_nll(model, rows: list[dict], batch_size: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the summed NLL (nats) of its target tokens and how many there are, in row order.

    Targets are the shifted labels that are not -100 (the prompt of a pair, and padding, are not);
    the same count as train's val_loss (lm.token_nll).
    """
    dev = next(model.parameters()).device

    def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits

    return rows_nll(forward, rows, batch_size, pad_id)


def rows_nll(forward, rows: list[dict], batch_size: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """sequence_nll with any runner: ``forward(input_ids, attention_mask)`` gives logits (B, T, V).

    Rows are batched by length, as in classification, so a batch pads little.
    """
    order = np.argsort([len(r["input_ids"]) for r in rows], kind="stable")
    nll, tokens = np.zeros(len(rows)), np.zeros(len(rows), dtype=np.int64)
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            idx = order[start : start + batch_size]
            batch = pad_right([rows[i] for i in idx], pad_id)
            logits = forward(batch["input_ids"], batch["attention_mask"])  # (B, T, V)
            labels = batch["labels"].to(logits.device)
            for j, i in enumerate(idx):
                row_nll, row_tokens = lm.token_nll(logits[j : j + 1], labels[j : j + 1])
                nll[i], tokens[i] = row_nll.item(), row_tokens.item()
    return nll, tokens


def context_of(model) -> int:
    """Positions the model attends over (GPT-2 n_positions, Llama max_position_embeddings)."""
    return int(model.config.max_position_embeddings)


def prompt_room(model, gen: Generation) -> int:
    """Prompt tokens that fit beside max_new_tokens in the model's context."""
    room = context_of(model) - gen.max_new_tokens
    if room < 1:
        raise UserError(f"evaluate.generation.max_new_tokens: {gen.max_new_tokens} leaves no room "
                        f"for a prompt in the model's context of {context_of(model)} tokens")
    return room


def pad_left(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask (B, T), padded on the left so every prompt ends at T."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    return ids, mask


def generation_kwargs(gen: Generation, tokenizer) -> dict:
    """model.generate settings from params alone; sampling is temperature + top-p (top-k off)."""
    kwargs = {"max_new_tokens": gen.max_new_tokens, "do_sample": gen.do_sample,
              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if gen.do_sample:
        kwargs |= {"temperature": gen.temperature, "top_p": gen.top_p, "top_k": 0}
    return kwargs


def generate(model, tokenizer, prompts: list[list[int]], gen: Generation, batch_size: int) -> list[str]:
    """The new text after each prompt (token ids), stripped, in the prompts' order.

    Batched with left padding and an attention mask, so each prompt's last token sits where the
    first new one goes; a batch only holds prompts of similar length.
    """
    from transformers import GenerationConfig

    # Only params decide: a base model's shipped defaults (repetition penalty, ...) do not apply.
    model.generation_config = GenerationConfig()
    if gen.do_sample:
        torch.manual_seed(gen.seed)
    dev = next(model.parameters()).device
    order = np.argsort([len(p) for p in prompts], kind="stable")
    texts = [""] * len(prompts)
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = pad_left([prompts[i] for i in idx], tokenizer.pad_token_id)
            out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                                 **generation_kwargs(gen, tokenizer))  # (B, T + new)
            new = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
            for i, text in zip(idx, new, strict=True):
                texts[i] = text.strip()
    return texts


def pair_examples(rows: list[dict], template: str, tokenizer, room: int) -> pd.DataFrame:
    """Prompt ids (the template around the prompt, cut from the left to ``room``) and references."""
    texts = [format_prompt(r["prompt"], template) for r in rows]  # as prepare formatted them
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return pd.DataFrame({"prompt": [r["prompt"] for r in rows],
                         "reference": [r["response"] for r in rows],
                         "ids": [x[-room:] for x in ids]})


def chat_examples(rows: list[dict], tokenizer, room: int) -> pd.DataFrame:
    """Conversations: the messages before the last assistant message, rendered with the chat
    template and a generation prompt (cut from the left to ``room``), and that message."""
    texts = [chat.render(tokenizer, json.loads(r["prompt"]), add_generation_prompt=True) for r in rows]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return pd.DataFrame({"prompt": [r["prompt"] for r in rows],
                         "reference": [r["response"] for r in rows],
                         "ids": [x[-room:] for x in ids]})


def text_examples(rows: list[dict], prefix_tokens: int, tokenizer, room: int,
                  limit: int | None) -> pd.DataFrame:
    """The first ``limit`` blocks longer than the prefix: their first ``prefix_tokens`` tokens (at
    most ``room``, the last ones kept) as prompt, the rest of the block as reference."""
    long = [r["input_ids"] for r in rows if len(r["input_ids"]) > prefix_tokens][:limit]
    prefixes = [x[:prefix_tokens][-room:] for x in long]
    return pd.DataFrame({
        "prompt": tokenizer.batch_decode(prefixes, skip_special_tokens=True),
        "reference": [t.strip() for t in tokenizer.batch_decode(
            [x[prefix_tokens:] for x in long], skip_special_tokens=True)],
        "ids": prefixes,
    })


def text_scores(generated: list[str], references: list[str]) -> dict:
    """Corpus BLEU (0-100), mean ROUGE-1/2/L F1 (0-1) and exact match (the share of generations
    equal to their reference, surrounding whitespace aside) against the references."""
    bleu = load_metric("bleu").compute(predictions=generated, references=references)["score"]
    rouge = load_metric("rouge").compute(predictions=generated, references=references)
    exact = float(np.mean([g.strip() == r.strip() for g, r in zip(generated, references, strict=True)]))
    return {"bleu": bleu, **rouge, "exact_match": exact, "generated": len(generated)}


def perplexities(trained: tuple, start: tuple, n: int) -> dict:
    """eval.json's perplexity keys from (nll, tokens) per row of each model."""
    metric = load_metric("perplexity")
    ours = metric.compute(nll=trained[0].tolist(), tokens=trained[1].tolist())
    before = metric.compute(nll=start[0].tolist(), tokens=start[1].tolist())
    return {"perplexity": ours["perplexity"], "perplexity_start": before["perplexity"],
            "loss": ours["loss"], "tokens": ours["tokens"], "n": n}


def load_test_rows(processed: Path, pairs: bool) -> list[dict]:
    from datasets import load_from_disk

    test = load_from_disk(str(processed / "datasets"))["test"]
    if len(test) == 0:
        raise UserError(f"{processed}: the test split is empty; nothing to evaluate")
    if pairs and not {"prompt", "response"} <= set(test.column_names):
        raise UserError(f"{processed}: the test split has no prompt/response columns, but the "
                        "model was trained on pairs: the data is stale, run `dvc repro prepare`")
    return test.to_list()


def start_nll(params: Params, tokenizer, rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Per-row NLL and target tokens of the untrained starting model, rebuilt as train began."""
    model = lm.start_model(params, tokenizer).to(device()).eval()
    return sequence_nll(model, rows, params.evaluate.batch_size, tokenizer.pad_token_id)


def write_outputs(params: Params, metrics: dict, examples: pd.DataFrame) -> list[Path]:
    paths = params.paths
    write_json(paths.eval_metrics, metrics)
    paths.eval_plots.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"model": ["start", "trained"],
                  "perplexity": [metrics["perplexity_start"], metrics["perplexity"]]}
                 ).to_csv(paths.eval_plots / PERPLEXITY_CSV, index=False)
    paths.eval_reports.mkdir(parents=True, exist_ok=True)
    examples[["prompt", "reference", "generated"]].to_csv(
        paths.eval_reports / GENERATIONS_CSV, index=False)
    return [paths.eval_metrics, paths.eval_plots / PERPLEXITY_CSV,
            paths.eval_reports / GENERATIONS_CSV]


def say(what: str) -> None:
    """A phase line, flushed: a log file (DVC, CI, a queue worker) shows where evaluate is."""
    print(f"evaluate: {what}", flush=True)


def evaluate(params: Params) -> dict:
    """Score the trained causal LM on the test split; write and log the results."""
    cfg = params.evaluate
    model, tokenizer, meta = load_trained(params.paths.model)
    pairs = meta["format"] in ("pairs", "chat")  # rows with a response to generate
    rows = load_test_rows(params.paths.processed, pairs)
    say(f"perplexity of the trained model on {len(rows)} test rows")
    trained = sequence_nll(model, rows, cfg.batch_size, tokenizer.pad_token_id)

    room = prompt_room(model, cfg.generation)
    if meta["format"] == "chat":
        examples = chat_examples(rows[: cfg.max_generations], tokenizer, room)
    elif pairs:
        examples = pair_examples(rows[: cfg.max_generations], meta["template"], tokenizer, room)
    else:
        examples = text_examples(rows, cfg.prefix_tokens, tokenizer, room, cfg.max_generations)
    say(f"generating {len(examples)} continuations")
    examples["generated"] = generate(model, tokenizer, examples["ids"].tolist(),
                                     cfg.generation, cfg.batch_size) if len(examples) else []
    del model  # before the starting model is built: never two models in (GPU) memory at once

    say("perplexity of the starting model")
    metrics = perplexities(trained, start_nll(params, tokenizer, rows), len(rows))
    if pairs:
        metrics |= text_scores(examples["generated"].tolist(), examples["reference"].tolist())
    metrics = rounded(metrics)
    files = write_outputs(params, metrics, examples)
    tracking.log_to_run(params, {f"test/{k}": float(v) for k, v in metrics.items()}, files)
    print(f"evaluate: perplexity {metrics['perplexity']} (start {metrics['perplexity_start']}), "
          f"{len(examples)} generations", flush=True)
    return metrics
