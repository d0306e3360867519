"""Evaluate's alignment section: the model train wrote (before) against the one align wrote
(after), on the test split, in ``paths.eval_metrics`` under ``align``:

- ``exact_match``: share of test prompts whose greedy completion equals the reference answer;
- grpo: ``reward``, the mean weighted reward of those completions (align.json's rewards);
- dpo: ``preference_accuracy``, share of test pairs the model gives the chosen answer a higher
  log-probability than the rejected one, and ``margin``, the mean of that difference (nats).

Each as ``{"before": x, "after": y}``, so `dvc metrics diff` and `lmforge gate --against` compare
them, and gate floors may name them (``align.exact_match.after``). Nothing when align was off.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lmforge import tracking
from lmforge.alignment import ALIGN_FILE
from lmforge.alignment.data import encode_preferences, pair_batch, prompt_ids, read_split
from lmforge.alignment.dpo import sequence_logps
from lmforge.alignment.rewards import load_rewards, score
from lmforge.common import read_json, rounded, write_json
from lmforge.params import Generation, Params, Reward


def greedy_scores(model, tokenizer, test, template: str | None, rewards: dict[str, Reward] | None,
                  max_new_tokens: int, batch_size: int) -> dict[str, float]:
    """Exact match (and, given rewards, their mean weighted sum) of greedy completions of the
    test rows' prompts against their ``chosen`` answers."""
    from lmforge.causal_lm.evaluate import generate

    room = int(model.config.max_position_embeddings) - max_new_tokens
    ids = [x[-room:] for x in prompt_ids(tokenizer, test["prompt"].tolist(), template)]
    texts = generate(model, tokenizer, ids, Generation(max_new_tokens=max_new_tokens), batch_size)
    refs = test["chosen"].tolist()
    right = [t.strip() == r.strip() for t, r in zip(texts, refs, strict=True)]
    scores = {"exact_match": float(np.mean(right))}
    if rewards:
        total, _ = score(load_rewards(rewards), test["prompt"].tolist(), texts, refs)
        scores["reward"] = float(np.mean(total))
    return scores


@torch.no_grad()
def preference_scores(model, tokenizer, pairs: list[dict], batch_size: int) -> dict[str, float]:
    """Reference-free preference accuracy and mean log-prob margin of chosen over rejected."""
    dev, margins = next(model.parameters()).device, []
    for start in range(0, len(pairs), batch_size):
        batch = pair_batch(pairs[start : start + batch_size], tokenizer.pad_token_id)
        logps = sequence_logps(model, {k: v.to(dev) for k, v in batch.items()})[0]
        chosen, rejected = logps.chunk(2)
        margins += (chosen - rejected).tolist()
    return {"preference_accuracy": float(np.mean(np.array(margins) > 0)),
            "margin": float(np.mean(margins))}


def model_scores(folder: Path, params: Params, info: dict) -> dict[str, float]:
    """One model's alignment scores on the test split."""
    from lmforge.causal_lm.evaluate import load_trained

    model, tokenizer, meta = load_trained(folder)
    dpo = info["method"] == "dpo"
    test = read_split(params.paths.interim, "test", info["columns"])
    rewards = None if dpo else {k: Reward(**r) for k, r in info["grpo"]["rewards"].items()}
    size = params.evaluate.batch_size
    scores = greedy_scores(model, tokenizer, test, meta["template"], rewards,
                           params.evaluate.generation.max_new_tokens, size)
    if dpo:
        scores |= preference_scores(model, tokenizer, encode_preferences(test, tokenizer, meta), size)
    return scores


def add_alignment(params: Params, metrics_file: Path) -> dict:
    """Add the ``align`` section to the (staged) eval metrics file and the MLflow run; return it
    as ``{"align": ...}``, or {} when align wrote no model."""
    aligned = params.paths.aligned
    if not (aligned / "config.json").is_file():
        return {}
    info = read_json(aligned / ALIGN_FILE, "run `dvc repro align`")
    before = model_scores(params.paths.model, params, info)
    after = model_scores(aligned, params, info)
    section = rounded({k: {"before": before[k], "after": after[k]} for k in before})
    metrics = read_json(metrics_file, "evaluate writes it first") | {"align": section}
    write_json(metrics_file, metrics)
    tracking.log_to_run(params, {f"test_align.{k}.{when}": float(v) for k, d in section.items()
                                 for when, v in d.items()}, [])
    print(f"evaluate: align {section}")
    return {"align": section}
