"""End to end for conversations: examples/chat_sft.yaml, shrunk to a tiny model (from scratch, or a
saved GPT-2 with LoRA), 150 conversations and a few steps, through `dvc repro` (every stage) in a
copy of the repo; then the Bento it built, served by `bentoml serve`, answers the `openai` client on
/v1/chat/completions, streaming too."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lmforge.overlay import apply_overlay, load_overlay
from tests.helpers import REPO, copy_repo, dvc, serving

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")

TINY_MODEL = {"layers": 2, "heads": 2, "hidden": 32, "context": 96, "vocab_size": 400,
              "min_frequency": 1}
REPO_CHAT = REPO / "data" / "sample" / "chat.jsonl"
TINY_TRAIN = {"batch_size": 16, "max_epochs": 2, "learning_rate": 3e-3, "log_every_n_steps": 1,
              "checkpoint_every_n_steps": None}


def use_chat_example(repo: Path, **overrides: dict) -> None:
    params = apply_overlay(yaml.safe_load((repo / "params.yaml").read_text()),
                           load_overlay(repo / "examples" / "chat_sft.yaml"))
    (repo / "params.yaml").write_text(yaml.safe_dump(apply_overlay(params, overrides),
                                                     sort_keys=False))


def test_a_chat_model_from_scratch_goes_from_dvc_repro_to_the_openai_client(tmp_path):
    repo = tiny_chat_repo(tmp_path, model={"scratch": TINY_MODEL})
    run_and_ask(repo, tmp_path)
    assert json.loads((repo / "models/model/lm.json").read_text())["format"] == "chat"


def test_a_pretrained_model_with_lora_goes_from_dvc_repro_to_the_openai_client(tmp_path):
    """model.source: a causal LM folder (a GPT-2 built from a config and saved, as a downloaded
    one would be; its tokenizer has no chat template) fine-tuned through LoRA adapters."""
    from lmforge.causal_lm import chat
    from tests.helpers import tiny_gpt2, train_bpe

    base = tmp_path / "base"
    lines = REPO_CHAT.read_text().splitlines()[:150]
    conversations = [json.loads(line)["messages"] for line in lines]
    tokenizer = train_bpe(list(chat.training_texts(conversations)))
    tokenizer.save_pretrained(str(base))
    tiny_gpt2(tokenizer, context=128).save_pretrained(str(base))
    repo = tiny_chat_repo(tmp_path, model={"source": str(base), "lora": {
        "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["c_attn"]}})
    run_and_ask(repo, tmp_path)

    trained = repo / "models/model"
    assert not (trained / "adapter_config.json").exists()  # merged: served as a plain model
    import torch
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(str(base)).state_dict()
    after = AutoModelForCausalLM.from_pretrained(str(trained)).state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved and all("c_attn" in k for k in moved), moved  # only where the adapters were


def tiny_chat_repo(tmp_path: Path, model: dict) -> Path:
    """A repo copy with examples/chat_sft.yaml applied to 150 sample conversations and a few
    steps of training."""
    repo = copy_repo(tmp_path / "repo")
    lines = (repo / "data/sample/chat.jsonl").read_text().splitlines()[:150]
    (repo / "data/tiny_chat.jsonl").write_text("\n".join(lines) + "\n")
    use_chat_example(repo, data={"source": "data/tiny_chat.jsonl",
                                 "split": {"validation": 0.1, "test": 0.1}},
                     model=model, prepare={"max_length": 96}, train=TINY_TRAIN,
                     evaluate={"max_generations": 4, "generation": {"max_new_tokens": 8}},
                     gate={"floors": {"exact_match": {"min": 0.0}}})
    return repo


def run_and_ask(repo: Path, tmp_path: Path) -> None:
    """`dvc repro` every stage, then ask the Bento it built through the `openai` client, plainly
    and streaming."""
    home = tmp_path / "bentoml"
    run = dvc(repo, "repro", BENTOML_HOME=str(home))
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])

    manifest = json.loads((repo / "metrics/data.json").read_text())
    assert manifest["formats"]["train"] == {"messages": 120}
    ev = json.loads((repo / "metrics/eval.json").read_text())
    assert {"perplexity", "perplexity_start", "bleu", "rougeL", "exact_match"} <= set(ev)
    assert ev["perplexity"] < ev["perplexity_start"] and ev["generated"] == 4
    generations = pd.read_csv(repo / "reports/eval/generations.csv", keep_default_na=False)
    assert len(generations) == 4
    assert (repo / "models/model/chat_template.jinja").exists()  # the template travels with it

    bento = json.loads((repo / "models/bento.json").read_text())["bento_tag"]
    with serving(bento, home, repo, tmp_path / "serve.log") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="no-keys-configured", max_retries=0)
        [model] = client.models.list().data
        messages = [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "Reverse the words: apple river stone"}]
        answer = client.chat.completions.create(model=model.id, messages=messages, max_tokens=8,
                                                temperature=0)
        stream = client.chat.completions.create(model=model.id, messages=messages, max_tokens=8,
                                                temperature=0, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert model.id == "lmforge-lm"
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert 1 <= answer.usage.completion_tokens <= 8
    assert streamed == answer.choices[0].message.content
