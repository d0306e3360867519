"""Evaluate for causal_lm: NLL counting, left-padded generation, and the stage on a tiny GPT-2."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from lmforge import tracking
from lmforge.causal_lm import evaluate as evaluate_lm
from lmforge.causal_lm import model as lm
from lmforge.common import UserError, write_json
from lmforge.params import Generation, parse_params
from stages import evaluate
from tests.conftest import tmp_paths
from tests.helpers import (
    TEMPLATE,
    encode_pair,
    make_pairs,
    make_texts,
    pack_blocks,
    tiny_gpt2,
    write_model,
    write_processed,
)


@pytest.fixture(scope="module")
def tokenizer(bpe_tokenizer):
    """The byte-level BPE of tests/conftest.py, by the name these tests use."""
    return bpe_tokenizer


def lm_params(tmp_path, pairs: bool, **evaluate_cfg):
    raw = {
        "task": "causal_lm",
        "paths": tmp_paths(tmp_path),
        "model": {"source": "scratch", "scratch": {"layers": 2, "heads": 2, "hidden": 32,
                                                   "context": 64, "vocab_size": 300}},
        "prepare": {"block_size": 32, "max_length": 64, "template": TEMPLATE},
        "train": {"seed": 3, "early_stopping": {"monitor": "val_loss", "mode": "min", "patience": 2}},
        "evaluate": {"batch_size": 5, "generation": {"max_new_tokens": 8}, **evaluate_cfg},
        "gate": {"floors": {"perplexity": {"max": 1e9}},
                 "tolerances": {"perplexity": {"direction": "lower", "rel": 0.1}}},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    if pairs:
        raw["data"] = {"prompt_column": "prompt", "response_column": "response"}
    return parse_params(raw)


def fit_a_little(model, rows: list[dict], steps: int = 30):
    """A few full-batch steps: enough to lower the NLL on text this repetitive."""
    import torch

    batch = evaluate_lm.pad_right(rows, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture
def lm_run(tmp_path, monkeypatch):
    """The working directory is tmp_path (MLflow's sqlite file goes there too)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


# -- pure pieces ---------------------------------------------------------------------------------

def test_nll_counts_only_response_tokens_and_ignores_padding(tokenizer):
    import torch

    model = tiny_gpt2(tokenizer)
    rows = [encode_pair(tokenizer, r) for r in make_pairs(7)]
    assert len({len(r["input_ids"]) for r in rows}) > 1  # batches pad
    nll, tokens = evaluate_lm.sequence_nll(model, rows, batch_size=3, pad_id=tokenizer.pad_token_id)

    for r, got_nll, got_tokens in zip(rows, nll, tokens, strict=True):
        response = len(tokenizer(r["response"], add_special_tokens=False)["input_ids"]) + 1  # + EOS
        assert got_tokens == response  # every response token and EOS, no prompt token
        with torch.inference_mode():  # HF's own loss: the mean over this row's targets alone
            mean = model(input_ids=torch.tensor([r["input_ids"]]),
                         labels=torch.tensor([r["labels"]])).loss.item()
        assert got_nll == pytest.approx(mean * response, rel=1e-5)


def test_left_padded_batches_generate_what_each_prompt_gets_alone(tokenizer):
    model = tiny_gpt2(tokenizer, seed=1)
    rows = [encode_pair(tokenizer, r) for r in make_pairs(6)]
    prompts = [r["input_ids"][: 3 + 2 * i] for i, r in enumerate(rows)]  # 3 to 13 tokens
    gen = Generation(max_new_tokens=6)
    batched = evaluate_lm.generate(model, tokenizer, prompts, gen, batch_size=6)
    alone = [evaluate_lm.generate(model, tokenizer, [p], gen, batch_size=1)[0] for p in prompts]
    assert batched == alone
    assert any(batched)  # something was generated at all


def test_pair_prompts_are_templated_and_cut_from_the_left(tokenizer):
    rows = make_pairs(2)
    examples = evaluate_lm.pair_examples(rows, TEMPLATE, tokenizer, room=5)
    full = tokenizer(TEMPLATE.format(prompt=rows[0]["prompt"]), add_special_tokens=False)["input_ids"]
    assert examples["ids"][0] == full[-5:]  # the end, next to the response, is kept
    assert examples["prompt"].tolist() == [r["prompt"] for r in rows]
    assert examples["reference"].tolist() == [r["response"] for r in rows]


def test_text_prompts_are_block_prefixes_and_the_rest_is_the_reference(tokenizer):
    rows = pack_blocks(tokenizer, make_texts(4), block=32)
    rows.append({"input_ids": rows[0]["input_ids"][:10], "labels": rows[0]["input_ids"][:10]})
    examples = evaluate_lm.text_examples(rows, prefix_tokens=12, tokenizer=tokenizer, room=56,
                                         limit=None)
    long = [r for r in rows if len(r["input_ids"]) > 12]
    assert len(long) < len(rows)  # the 10-token block (and a short last one) has nothing to continue
    assert len(examples) == len(long)
    assert examples["ids"][0] == rows[0]["input_ids"][:12]
    rest = tokenizer.decode(rows[0]["input_ids"][12:], skip_special_tokens=True).strip()
    assert examples["reference"][0] == rest
    assert len(evaluate_lm.text_examples(rows, 12, tokenizer, 56, limit=2)) == 2


def test_prompt_room_refuses_max_new_tokens_filling_the_context(tokenizer):
    model = tiny_gpt2(tokenizer, context=16)
    assert evaluate_lm.prompt_room(model, Generation(max_new_tokens=10)) == 6
    with pytest.raises(UserError, match=r"evaluate\.generation\.max_new_tokens: 16 leaves no room"):
        evaluate_lm.prompt_room(model, Generation(max_new_tokens=16))


def test_sampling_settings_come_from_params_only(tokenizer):
    greedy = evaluate_lm.generation_kwargs(Generation(max_new_tokens=4), tokenizer)
    assert greedy == {"max_new_tokens": 4, "do_sample": False, "eos_token_id": tokenizer.eos_token_id,
                      "pad_token_id": tokenizer.pad_token_id}
    sampled = evaluate_lm.generation_kwargs(Generation(do_sample=True, top_p=0.9), tokenizer)
    assert sampled["top_k"] == 0 and sampled["top_p"] == 0.9 and sampled["temperature"] == 1.0


def test_sampled_generation_reproduces_with_its_seed(tokenizer):
    model = tiny_gpt2(tokenizer, seed=2)
    prompts = [encode_pair(tokenizer, r)["input_ids"][:6] for r in make_pairs(3)]
    gen = Generation(max_new_tokens=6, do_sample=True, seed=7)
    first = evaluate_lm.generate(model, tokenizer, prompts, gen, batch_size=3)
    assert evaluate_lm.generate(model, tokenizer, prompts, gen, batch_size=3) == first


# -- the stage ----------------------------------------------------------------------------------

def test_main_on_pairs_writes_metrics_generations_and_logs_to_the_run(lm_run, tokenizer):
    from mlflow.tracking import MlflowClient

    params = lm_params(lm_run, pairs=True, max_generations=5)
    rows = [encode_pair(tokenizer, r) for r in make_pairs(24)]
    write_processed(params, tokenizer, {"train": rows[:8], "validation": rows[8:12], "test": rows[12:]})
    # The trained model is the starting model itself: both perplexities must then agree, which
    # checks that evaluate rebuilds the start exactly (same seed) and scores both the same way.
    write_model(params, lm.start_model(params, tokenizer).eval(), tokenizer, pairs=True)
    tracking.start_run(params, ("train",), "hash")

    metrics = evaluate.main(params)

    saved = json.loads(params.paths.eval_metrics.read_text())
    assert saved == metrics
    assert list(saved) == ["perplexity", "perplexity_start", "loss", "tokens", "n",
                           "bleu", "rouge1", "rouge2", "rougeL", "exact_match", "generated"]
    assert all(math.isfinite(v) for v in saved.values())
    assert saved["n"] == 12 and saved["generated"] == 5
    assert saved["perplexity"] == pytest.approx(math.exp(saved["loss"]), rel=1e-5)
    assert saved["perplexity_start"] == pytest.approx(saved["perplexity"], rel=1e-5)
    responses = sum(len(tokenizer(r["response"], add_special_tokens=False)["input_ids"]) + 1
                    for r in rows[12:])
    assert saved["tokens"] == responses
    assert 0 <= saved["bleu"] <= 100 and all(0 <= saved[k] <= 1 for k in ("rouge1", "rouge2", "rougeL"))

    generations = pd.read_csv(params.paths.eval_reports / "generations.csv", keep_default_na=False)
    assert generations.columns.tolist() == ["prompt", "reference", "generated"]
    assert len(generations) == 5
    assert generations["prompt"].tolist() == [r["prompt"] for r in rows[12:17]]
    assert generations["reference"].tolist() == [r["response"] for r in rows[12:17]]
    plot = pd.read_csv(params.paths.eval_plots / "perplexity.csv")
    assert plot["model"].tolist() == ["start", "trained"]
    assert plot["perplexity"].tolist() == [saved["perplexity_start"], saved["perplexity"]]

    client = MlflowClient(tracking_uri=params.tracking.uri)
    run_id = tracking.run_id(params.paths.run_info)
    logged = client.get_run(run_id).data.metrics
    assert logged["test/perplexity"] == pytest.approx(saved["perplexity"])
    assert {"test/perplexity_start", "test/bleu", "test/rougeL", "test/tokens"} <= set(logged)
    artifacts = {a.path for a in client.list_artifacts(run_id, "evaluate")}
    assert artifacts == {"evaluate/eval.json", "evaluate/perplexity.csv", "evaluate/generations.csv"}


def test_main_on_plain_text_continues_prefixes_and_beats_the_start(lm_run, tokenizer):
    params = lm_params(lm_run, pairs=False, max_generations=50, prefix_tokens=8)
    train = pack_blocks(tokenizer, make_texts(16), block=32)
    test = pack_blocks(tokenizer, make_texts(24)[16:], block=32)
    write_processed(params, tokenizer, {"train": train, "validation": test[:2], "test": test})
    model = fit_a_little(lm.start_model(params, tokenizer), train)
    write_model(params, model, tokenizer, pairs=False)
    tracking.start_run(params, ("train",), "hash")

    metrics = evaluate.main(params)

    assert list(metrics) == ["perplexity", "perplexity_start", "loss", "tokens", "n"]
    assert metrics["n"] == len(test)
    assert metrics["tokens"] == sum(len(r["input_ids"]) - 1 for r in test)  # first token: no target
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-5)
    assert metrics["perplexity"] < metrics["perplexity_start"]  # those steps did learn something
    generations = pd.read_csv(params.paths.eval_reports / "generations.csv", keep_default_na=False)
    assert len(generations) == sum(len(r["input_ids"]) > 8 for r in test)  # all of them: 50 > rows


def test_missing_model_folder_is_named(lm_run):
    params = lm_params(lm_run, pairs=True)
    write_json(params.paths.run_info, {"run_id": "unused"})
    with pytest.raises(UserError, match=rf"{params.paths.model}: no trained model"):
        evaluate.main(params)


def test_classifier_folder_is_refused_as_not_a_causal_lm(lm_run, tiny_model_dir):
    import shutil

    params = lm_params(lm_run, pairs=True)
    shutil.copytree(tiny_model_dir, params.paths.model)
    with pytest.raises(UserError, match=r"lm\.json not found: the model was not trained for task causal_lm"):
        evaluate_lm.load_trained(params.paths.model)
    write_json(params.paths.model / "lm.json", {"format": "pairs"})
    with pytest.raises(UserError, match=r"holds a BertForSequenceClassification, not a causal LM"):
        evaluate_lm.load_trained(params.paths.model)


def test_pairs_model_on_plain_test_data_is_called_stale(lm_run, tokenizer):
    params = lm_params(lm_run, pairs=True)
    rows = pack_blocks(tokenizer, make_texts(4), block=32)
    write_processed(params, tokenizer, {"train": rows, "validation": rows, "test": rows})
    with pytest.raises(UserError, match=r"no prompt/response columns.*run `dvc repro prepare`"):
        evaluate_lm.load_test_rows(params.paths.processed, pairs=True)
    assert len(evaluate_lm.load_test_rows(params.paths.processed, pairs=False)) == len(rows)
