"""Stage align: the DPO-family losses (checked against TRL's DPOTrainer on the same tensors and
against numbers worked by hand), GRPO's advantages and objective, the rewards and their errors, the
preference checks of validate, and the stage on a tiny GPT-2 with evaluate's before/after section."""

from __future__ import annotations

import json
import math
import sys
import types

import pandas as pd
import pytest
import torch

from lmforge import tracking
from lmforge.alignment import dpo, grpo, rewards
from lmforge.alignment.data import batch_indices
from lmforge.common import UserError, write_json
from lmforge.params import Dpo, Reward, parse_params
from stages import align, evaluate, validate
from tests.conftest import REPO, tmp_paths
from tests.helpers import (
    TEMPLATE,
    encode_pair,
    make_pairs,
    make_texts,
    tiny_gpt2,
    train_bpe,
    write_model,
    write_processed,
)

# --- the losses ---------------------------------------------------------------------------------


def loss_of(kind: str, **kw) -> float:
    """The loss of one pair with c=-10, r=-12, ref_c=-11, ref_r=-11, n_c=4, n_r=5."""
    t = lambda v: torch.tensor([float(v)])  # noqa: E731
    cfg = Dpo(loss=kind, **kw)
    return dpo.pair_loss(t(-10), t(-12), t(-11), t(-11), t(4), t(5), cfg).item()


def test_losses_by_hand():
    """delta = (-10 - -11) - (-12 - -11) = 2; beta 0.1: beta * delta = 0.2.

    sigmoid: -log(sigmoid(0.2)) = log(1 + e^-0.2) = 0.598139; with label smoothing 0.1:
    0.9 * 0.598139 + 0.1 * log(1 + e^0.2) (= 0.798139) = 0.618139.
    ipo: (1/4 - (-1)/5 - 1/(2 * 0.1))^2 = (0.45 - 5)^2 = 20.7025.
    robust, eps 0.1: (0.9 * 0.598139 - 0.1 * 0.798139) / 0.8 = 0.573139.
    simpo, gamma/beta 0.5: z = 0.1 * (-10/4 - -12/5) - 0.05 = -0.06; log(1 + e^0.06) = 0.723597.
    """
    assert loss_of("sigmoid") == pytest.approx(0.598139, abs=1e-6)
    assert loss_of("sigmoid", label_smoothing=0.1) == pytest.approx(0.618139, abs=1e-6)
    assert loss_of("ipo") == pytest.approx(20.7025, abs=1e-4)
    assert loss_of("robust", label_smoothing=0.1) == pytest.approx(0.573139, abs=1e-6)
    assert loss_of("simpo") == pytest.approx(0.723597, abs=1e-6)


@pytest.fixture(scope="module")
def tokenizer():
    pairs = make_pairs(8)
    return train_bpe(make_texts() + [TEMPLATE.format(prompt=p["prompt"]) + p["response"] for p in pairs])


@pytest.mark.parametrize("loss, smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("robust", 0.2)])
def test_loss_equals_trl_dpo_trainer_on_the_same_batch(tokenizer, tmp_path, loss, smoothing):
    """TRL's DPOTrainer tokenizes, collates and scores a batch; ours scores the same tensors with the
    same policy and reference (two different random GPT-2s, so the log-ratios are not zero)."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    policy, reference = tiny_gpt2(tokenizer, seed=0), tiny_gpt2(tokenizer, seed=1)
    rows = [{"prompt": TEMPLATE.format(prompt=p["prompt"]), "chosen": p["response"],
             "rejected": p["response"].replace("the ", "a ")} for p in make_pairs(8)]
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=4,
                     beta=0.1, loss_type=[loss], label_smoothing=smoothing, use_cpu=True)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, batch).item()
        ours_batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                      "labels": batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)}
        out = dpo.sequence_logps(trainer.model, ours_batch)
        ref_out = dpo.sequence_logps(trainer.ref_model, ours_batch)
        ours, metrics = dpo.pair_terms(out, ref_out, Dpo(beta=0.1, loss=loss, label_smoothing=smoothing))
    assert ours.item() == pytest.approx(theirs, rel=1e-5)
    assert metrics["kl"] > 0 and 0 <= metrics["reward_accuracy"] <= 1


# --- GRPO pieces --------------------------------------------------------------------------------


def test_group_advantages_center_each_group_and_count_groups_that_teach_nothing():
    rewards_ = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    adv, zero = grpo.group_advantages(rewards_, 4)
    assert adv[:4].sum().item() == pytest.approx(0, abs=1e-6) and adv[0] > 0 > adv[1]
    assert adv[4:].abs().max().item() == 0 and zero == 0.5


def test_completion_mask_keeps_tokens_up_to_the_first_eos():
    completions = torch.tensor([[5, 6, 0, 7, 0], [5, 5, 5, 5, 5], [0, 1, 1, 1, 1]])
    assert grpo.completion_mask(completions, 0).tolist() == [
        [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_objective_is_minus_advantage_on_policy_and_clips_a_ratio_beyond_the_range():
    logps = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, -1.0])
    loss, kl = grpo.objective(logps, logps.detach(), logps.detach(), adv, mask, 0.2, 0.04)
    assert loss.item() == pytest.approx(0.0) and kl == pytest.approx(0.0)  # -(1) and -(-1), mean 0
    loss.backward()
    assert logps.grad[0, 0] < 0 < logps.grad[1, 0] and logps.grad[0, 2] == 0  # up, down, masked
    # A ratio of e^1 with a positive advantage is clipped at 1.2: no gradient through it.
    high = torch.ones(1, 1, requires_grad=True)
    clipped, _ = grpo.objective(high, torch.zeros(1, 1), high.detach(), torch.tensor([1.0]),
                                torch.ones(1, 1), 0.2, 0.0)
    clipped.backward()
    assert clipped.item() == pytest.approx(-1.2) and high.grad.item() == 0


def test_batch_indices_depend_on_the_step_alone_and_cover_each_row_once_per_pass():
    seen = [i for step in range(5) for i in batch_indices(10, 2, step, seed=1)]
    assert sorted(seen) == list(range(10))
    assert batch_indices(10, 2, 7, seed=1) == batch_indices(10, 2, 7, seed=1)


# --- rewards ------------------------------------------------------------------------------------


def test_builtin_rewards():
    loaded = rewards.load_rewards({
        "same": Reward(function="exact_match"), "caps": Reward(function="regex", pattern=r"[A-Z ]+"),
        "near": Reward(function="numeric", tolerance=0.5),
        "short": Reward(function="length_penalty", max_chars=4),
        "words": Reward(function="rewards.sample:words_in_place", weight=2.0)})
    total, each = rewards.score(loaded, ["p"], [" 12.2 RED "], ["12"])
    assert each == {"same": [0.0], "caps": [0.0], "near": [1.0],
                    "short": [-1.0], "words": [-1.0]}  # 8 chars, 4 over; 1 word wrong, 1 extra
    assert total == [0.0 + 0.0 + 1.0 - 1.0 - 2.0]
    assert rewards.score(loaded[:1], ["p"], ["b a"], ["b a"])[0] == [1.0]


@pytest.fixture
def broken_rewards(monkeypatch):
    """rewards.broken: one function that raises, one that returns text, one NaN."""
    module = types.ModuleType("rewards.broken")
    module.raises = lambda prompt, completion, reference: {}["missing"]
    module.text = lambda prompt, completion, reference: "1.0"
    module.nan = lambda prompt, completion, reference: math.nan
    monkeypatch.setitem(sys.modules, "rewards.broken", module)


@pytest.mark.parametrize("name, says", [
    ("raises", "reward rewards.broken:raises raised KeyError: 'missing' on prompt 'Reverse: a b'"),
    ("text", "reward rewards.broken:text returned '1.0', not a finite number, on prompt 'Reverse: a b'"),
    ("nan", "reward rewards.broken:nan returned nan, not a finite number"),
])
def test_a_bad_reward_function_is_named_with_the_prompt(broken_rewards, name, says):
    loaded = rewards.load_rewards({"mine": Reward(function=f"rewards.broken:{name}")})
    with pytest.raises(UserError) as err:
        rewards.score(loaded, ["Reverse: a b"], ["b a"], ["b a"])
    assert says in str(err.value)


def test_a_missing_reward_module_or_function_is_named():
    with pytest.raises(UserError, match="rewards.nope:f: cannot import rewards.nope"):
        rewards.load_rewards({"r": Reward(function="rewards.nope:f")})
    with pytest.raises(UserError, match="rewards.sample has no function nope"):
        rewards.load_rewards({"r": Reward(function="rewards.sample:nope")})


# --- params -------------------------------------------------------------------------------------


def raw_params(root, **align) -> dict:
    """A tiny causal_lm run on preference pairs under ``root``, with ``align`` settings."""
    return {
        "task": "causal_lm", "paths": tmp_paths(root),
        "data": {"prompt_column": "prompt", "response_column": "response",
                 "rejected_column": "rejected"},
        "model": {"source": "scratch", "scratch": {"layers": 2, "heads": 2, "hidden": 32,
                                                   "context": 64, "vocab_size": 300}},
        "prepare": {"block_size": 32, "max_length": 64, "template": TEMPLATE},
        "train": {"early_stopping": {"monitor": "val_loss", "mode": "min", "patience": 2}},
        "evaluate": {"batch_size": 8, "generation": {"max_new_tokens": 8}},
        "gate": {"floors": {"perplexity": {"max": 1e9}},
                 "tolerances": {"perplexity": {"direction": "lower", "rel": 0.1}}},
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}"},
        "align": {"max_steps": 4, "batch_size": 4, "learning_rate": 1e-3, "log_every_n_steps": 2,
                  "checkpoint_every_n_steps": 2,
                  "grpo": {"group_size": 4, "max_new_tokens": 8}, **align},
    }


@pytest.mark.parametrize("change, says", [
    ({"task": "classification", "data.prompt_column": None, "data.response_column": None,
      "data.rejected_column": None, "model": {}, "gate": {}},
     "align.method: 'dpo' aligns a causal LM trained on prompt/response pairs"),
    ({"data.rejected_column": None}, "align.method: 'dpo' needs preference rows: set "
     "data.rejected_column"),
    ({"data.rejected_column": "prompt"},
     "data.rejected_column: 'prompt' is already the prompt or response column"),
    ({"align.method": "grpo", "align.grpo.max_new_tokens": 64},
     "align.grpo.max_new_tokens: 64 leaves no room for a prompt in model.scratch.context (64)"),
    ({"align.grpo.rewards": {"r": {"function": "regex"}}},
     "pattern goes with function regex, and regex needs it"),
    ({"align.grpo.rewards": {"r": {"function": "mine.py:f"}}},
     "function 'mine.py:f': a built-in (exact_match, regex, numeric, length_penalty) or "
     "'rewards.<module>:<function>'"),
    ({"align.grpo.rewards": {"r": {"function": "regex", "pattern": "(("}}},
     "pattern '((' is not a regular expression"),
    ({"align.grpo.rewards": {"my reward": {"function": "exact_match"}}},
     "reward names ['my reward']: letters, digits and _ only"),
    ({"align.method": "none", "gate.floors": {"align.exact_match.after": {"min": 0.5}}},
     "gate.floors.align.exact_match.after: task causal_lm has no such metric"),
], ids=["classification", "no rejected column", "rejected is the prompt", "no room",
        "regex without pattern", "not in rewards/", "bad pattern", "bad name",
        "gate on align while off"])
def test_align_params_that_do_not_fit_are_named(tmp_path, change, says):
    raw = raw_params(tmp_path, method="dpo")
    for dotted, value in change.items():
        *parents, last = dotted.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[last] = value
    with pytest.raises(UserError) as err:
        parse_params(raw)
    assert says in str(err.value)


def test_check_names_a_reward_module_that_is_not_in_rewards(tmp_path, monkeypatch):
    from stages.check import source_problems

    raw = raw_params(tmp_path, method="grpo")
    raw["data"]["source"] = str(REPO / "data/sample/preferences.csv")
    raw["align"]["grpo"]["rewards"] = {"ok": {"function": "rewards.sample:words_in_place"},
                                       "typo": {"function": "rewards.smaple:words_in_place"}}
    monkeypatch.chdir(REPO)  # reward modules are looked up in the repo's rewards/
    assert [p for p in source_problems(parse_params(raw)) if "align" in p] == [
        "align.grpo.rewards.typo: rewards.smaple:words_in_place: no file rewards/smaple.py"]


def test_gate_may_name_the_align_section_when_align_is_on(tmp_path):
    raw = raw_params(tmp_path, method="grpo")
    raw["gate"]["floors"] = {"align.exact_match.after": {"min": 0.5}}
    assert parse_params(raw).gate.floors["align.exact_match.after"].min == 0.5


# --- validate on preference rows ----------------------------------------------------------------


def preference_frame(n: int = 24, offset: int = 0) -> pd.DataFrame:
    rows = make_pairs(n + offset)[offset:]
    return pd.DataFrame([{**r, "rejected": r["response"].replace("the ", "a ")} for r in rows])


def test_validate_names_a_missing_rejected_answer_and_one_equal_to_the_chosen(tmp_path):
    params = parse_params(raw_params(tmp_path, method="dpo"))
    train = preference_frame(16)
    train.loc[3, "rejected"] = train.loc[3, "response"] + "  "  # equal, whitespace aside
    train.loc[5, "rejected"] = None
    frames = {"train": train, "validation": preference_frame(4, 16), "test": preference_frame(4, 20)}
    report = validate.run_suite(frames, params)
    failed = {name for name, c in report["checks"].items() if not c["success"]}
    assert failed == {"train/rejected_differs_from_chosen", "train/rejected_not_null"}
    assert report["checks"]["train/rejected_differs_from_chosen"]["examples"] == [train.loc[3, "prompt"]]
    assert report["checks"]["test/rejected_length"]["success"]


# --- the stage on a tiny GPT-2 ------------------------------------------------------------------


def set_up(root, tokenizer, monkeypatch, **align_cfg):
    """What align reads: interim splits with preferences, train's model, the MLflow run."""
    # MLflow's set_tracking_uri exports the URI: a test before this one must not pick the store.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = parse_params(raw_params(root, **align_cfg))
    df = preference_frame(24)
    params.paths.interim.mkdir(parents=True)
    splits = {"train": df[:16], "validation": df[16:20], "test": df[20:]}
    for name, part in splits.items():
        part.to_parquet(params.paths.interim / f"{name}.parquet", index=False)
    write_processed(params, tokenizer, {name: [encode_pair(tokenizer, r) for r in part.to_dict("records")]
                                        for name, part in splits.items()})  # evaluate's rows
    params.paths.model.mkdir(parents=True)
    write_model(params, tiny_gpt2(tokenizer), tokenizer, pairs=True)
    tracking.start_run(params, ("task",), "ab" * 32)
    return params


def weights(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_stage_aligns_writes_its_outputs_and_evaluate_scores_before_and_after(
        tmp_path, monkeypatch, tokenizer, method):
    monkeypatch.chdir(tmp_path)
    # A random model earns no exact match; lengths vary, so the length penalty gives a signal.
    reward = {"exact_match": {"function": "exact_match"},
              "words": {"function": "rewards.sample:words_in_place"},
              "short": {"function": "length_penalty", "max_chars": 5}}
    grpo_cfg = {"group_size": 4, "max_new_tokens": 8, "temperature": 1.5, "rewards": reward}
    params = set_up(tmp_path, tokenizer, monkeypatch, method=method, grpo=grpo_cfg)
    summary = align.main(params)

    paths = params.paths
    changed = [k for k, v in weights(paths.aligned).items()
               if not torch.equal(v, weights(paths.model)[k])]
    assert changed, "no weight moved"
    info = json.loads((paths.aligned / "align.json").read_text())
    assert info["method"] == method and info["columns"]["response"] == "chosen"
    curves = pd.read_csv(paths.align_plots / "steps.csv")
    assert list(curves["step"]) == [1, 2, 3, 4]
    if method == "dpo":
        assert {"loss", "reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps",
                "kl"} <= set(curves.columns)
        assert curves["reward_margin"].iloc[-1] > 0 and summary["test_kl"] > 0
    else:
        assert {"reward_mean", "reward_std", "kl", "completion_length", "zero_std_share",
                "exact_match_mean", "words_std", "short_mean"} <= set(curves.columns)
        assert "test_exact_match" in summary and "test_reward" in summary
    assert json.loads(paths.align_metrics.read_text()) == summary
    from mlflow import MlflowClient  # the curves went into train's run, under align/

    client = MlflowClient(params.tracking.uri)
    run_id = json.loads(paths.run_info.read_text())["run_id"]
    curve = "align/loss" if method == "dpo" else "align/reward_mean"  # each method's own curves
    assert len(client.get_metric_history(run_id, curve)) == 4

    ev = evaluate.main(params)
    section = json.loads(paths.eval_metrics.read_text())["align"]
    assert ev["align"] == section
    assert set(section["exact_match"]) == {"before", "after"}
    assert ("preference_accuracy" in section) == (method == "dpo")
    assert ("reward" in section) == (method == "grpo")


def test_with_lora_the_reference_is_the_model_with_adapters_off(tmp_path, monkeypatch, tokenizer):
    """Fresh adapters start at zero: at step 1 the policy is the reference, so the sigmoid loss is
    log 2 exactly; the adapters are merged into the saved weights."""
    monkeypatch.chdir(tmp_path)
    params = set_up(tmp_path, tokenizer, monkeypatch, method="dpo", learning_rate=1e-2)
    raw = raw_params(tmp_path, method="dpo", learning_rate=1e-2)
    raw["model"] = {"source": str(params.paths.model),
                    "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["c_attn"]}}
    params = parse_params(raw)
    align.main(params)
    curves = pd.read_csv(params.paths.align_plots / "steps.csv")
    assert curves["loss"].iloc[0] == pytest.approx(math.log(2), abs=1e-6)
    assert curves["kl"].iloc[0] == pytest.approx(0, abs=1e-6) and curves["kl"].iloc[-1] > 0
    after, before = weights(params.paths.aligned), weights(params.paths.model)
    assert set(after) == set(before)  # a plain model: no adapter weights left
    assert not torch.equal(after["transformer.h.0.attn.c_attn.weight"],
                           before["transformer.h.0.attn.c_attn.weight"])
    assert torch.equal(after["transformer.h.0.mlp.c_fc.weight"], before["transformer.h.0.mlp.c_fc.weight"])


def test_method_none_writes_a_marker_and_loads_nothing(tmp_path):
    params = parse_params(raw_params(tmp_path, method="none"))  # no model, no data, no run
    assert align.main(params) == {"aligned": False}
    assert sorted(p.name for p in params.paths.aligned.iterdir()) == ["align.json"]
    assert (params.paths.align_plots / "steps.csv").read_text() == "step,loss\n"
    from lmforge.alignment import scored_model

    assert scored_model(params.paths) == params.paths.model


def test_a_reward_that_raises_stops_the_stage_and_keeps_the_outputs(
        tmp_path, monkeypatch, tokenizer, broken_rewards):
    monkeypatch.chdir(tmp_path)
    params = set_up(tmp_path, tokenizer, monkeypatch, method="grpo",
                    grpo={"group_size": 2, "max_new_tokens": 4,
                          "rewards": {"mine": {"function": "rewards.broken:raises"}}})
    write_json(params.paths.align_metrics, {"aligned": False})
    with pytest.raises(UserError, match=r"reward rewards.broken:raises raised KeyError.*on prompt "
                                        r"'what color is the"):
        align.main(params)
    assert json.loads(params.paths.align_metrics.read_text()) == {"aligned": False}
    assert not params.paths.aligned.exists()
