"""Benchmark: the causal-LM examples on real data, within a CPU budget.

    python -m benchmarks.lm shakespeare   # pretraining from scratch on Tiny Shakespeare
    python -m benchmarks.lm multi30k      # en->de pairs from Multi30k as instruction tuning
    python -m benchmarks.lm multi30k_chat # the same pairs as conversations (chat template)

Reads ../shared/datasets (never copied into the repo): in a temp `git clone` of this repo it writes
the source, applies the overlay examples/lm_pretrain.yaml, lm_instruct.yaml or chat_sft.yaml to the
committed params.yaml and then the overrides below (LM_* environment variables change the budget),
runs `dvc repro evaluate` and prints test perplexity before/after training, BLEU/ROUGE-L for pairs,
and training tokens/s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from lmforge.overlay import apply_overlay, load_overlay

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
ENV = os.environ.get


def shakespeare(clone: Path) -> tuple[str, dict]:
    src = SHARED / "tinyshakespeare"
    dest = clone / "data" / "shakespeare"
    dest.mkdir(parents=True)
    for split in ("train", "validation", "test"):
        (dest / f"{split}.txt").write_text((src / f"{split}.txt").read_text())
    # ~1.5M parameters: on 2 CPU cores a step of 32 x 128 tokens takes about a second.
    scratch = {"layers": int(ENV("LM_LAYERS", 4)), "heads": 4, "hidden": int(ENV("LM_HIDDEN", 128)),
               "context": 256, "vocab_size": 4096, "dropout": 0.1}
    return "lm_pretrain.yaml", {
        # Speeches are the documents; duplicates are real ("Ay, my lord."), not noise: keep them.
        "data": {"source": "data/shakespeare", "text_unit": "document",
                 "clean": {"drop_duplicates": False}},
        "validate": {"max_duplicate_share": None, "check_leakage": False},
        "model": {"scratch": scratch},
        "prepare": {"block_size": 128, "max_length": 256},
        "train": {"max_epochs": int(ENV("LM_EPOCHS", 12)), "batch_size": 32, "learning_rate": 1e-3,
                  "checkpoint_every_n_steps": 200},
        "evaluate": {"max_generations": 8, "prefix_tokens": 32, "batch_size": 32},
        "gate": {"floors": {"perplexity": {"max": 1e9}}},
    }


def multi30k(clone: Path) -> tuple[str, dict]:
    src, dest = SHARED / "multi30k_en_de", clone / "data" / "multi30k"
    dest.mkdir(parents=True)
    rows = int(ENV("LM_PAIRS", 5000))
    train = pd.read_csv(src / "train.csv").sample(n=rows, random_state=0)
    train.to_csv(dest / "train.csv", index=False)
    # Multi30k's own validation split repeats one train sentence; validate would (rightly) refuse it.
    val = pd.read_csv(src / "validation.csv")
    val[~val["source"].isin(train["source"])].to_csv(dest / "validation.csv", index=False)
    pd.read_csv(src / "test.csv").to_csv(dest / "test.csv", index=False)
    return "lm_instruct.yaml", {
        "data": {"source": "data/multi30k", "prompt_column": "source", "response_column": "target"},
        "model": {"scratch": {"layers": 4, "heads": 4, "hidden": int(ENV("LM_HIDDEN", 128)),
                              "context": 128, "vocab_size": 4096}},
        "prepare": {"max_length": 128, "template": "English: {prompt}\nGerman: "},
        "train": {"max_epochs": int(ENV("LM_EPOCHS", 6)), "batch_size": 32, "learning_rate": 1e-3,
                  "checkpoint_every_n_steps": 200},
        "evaluate": {"max_generations": int(ENV("LM_GENERATIONS", 300)), "batch_size": 32,
                     "generation": {"max_new_tokens": 48}},
        "gate": {"floors": {"bleu": {"min": 0}}},
    }


def multi30k_chat(clone: Path) -> tuple[str, dict]:
    """multi30k's rows, model and budget, as conversations: user the English sentence, assistant
    the German one, rendered with the default chat template instead of "English: ...\nGerman: "."""
    _, overrides = multi30k(clone)
    folder = clone / "data" / "multi30k"
    for split in ("train", "validation", "test"):
        pairs = pd.read_csv(folder / f"{split}.csv")
        rows = [{"messages": [{"role": "user", "content": en}, {"role": "assistant", "content": de}]}
                for en, de in zip(pairs["source"], pairs["target"], strict=True)]
        pd.DataFrame(rows).to_json(folder / f"{split}.jsonl", orient="records", lines=True,
                                   force_ascii=False)
        (folder / f"{split}.csv").unlink()
    overrides["data"] = {"source": "data/multi30k"}
    overrides["prepare"] = {"max_length": 128}
    overrides["gate"] = {"floors": {"bleu": {"min": 0}}}
    return "chat_sft.yaml", overrides


def apply(clone: Path, example: str, overrides: dict) -> None:
    """params.yaml := the clone's params.yaml + the example overlay + ``overrides`` (same merge)."""
    params = apply_overlay(yaml.safe_load((clone / "params.yaml").read_text()),
                           load_overlay(clone / "examples" / example))
    (clone / "params.yaml").write_text(yaml.safe_dump(apply_overlay(params, overrides), sort_keys=False))


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else ""
    setups = {"shakespeare": shakespeare, "multi30k": multi30k, "multi30k_chat": multi30k_chat}
    if which not in setups:
        sys.exit(f"usage: python -m benchmarks.lm {{{'|'.join(setups)}}}")
    if not SHARED.is_dir():
        sys.exit(f"error: {SHARED} not found (the shared datasets folder sits beside the repo)")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "repo"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        apply(clone, *setups[which](clone))
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "dvc", "repro", "evaluate"], cwd=clone, env=env,
                             capture_output=True, text=True)
        wall = time.perf_counter() - start
        if run.returncode != 0:
            sys.exit(f"dvc repro failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        read = lambda rel: json.loads((clone / rel).read_text())  # noqa: E731
        manifest, stats = read("metrics/data.json"), read("data/processed/stats.json")
        trained, ev = read("metrics/train.json"), read("metrics/eval.json")
        samples = pd.read_csv(clone / "reports/eval/generations.csv").head(3)
    print(f"{which}: rows {manifest['rows']}; tokens {({s: v.get('tokens') for s, v in stats.items()})}")
    print(f"train: {trained['epochs']} epochs, {trained['steps']} steps, "
          f"{trained['train_tokens_per_s']} tokens/s, best val perplexity "
          f"{trained.get('best_val_perplexity')}")
    print(f"test perplexity: start {ev['perplexity_start']} -> trained {ev['perplexity']} "
          f"(ratio {ev['perplexity_start'] / ev['perplexity']:.1f}x)")
    if "bleu" in ev:
        print(f"BLEU {ev['bleu']}, ROUGE-1 {ev['rouge1']}, ROUGE-2 {ev['rouge2']}, "
              f"ROUGE-L {ev['rougeL']} on {ev['generated']} test pairs")
    print(f"wall: {wall:.0f} s for `dvc repro evaluate`")
    print(samples.to_string(max_colwidth=70))


if __name__ == "__main__":
    main()
