"""Benchmark: stage train in one process against DDP across processes, same data, params and seed.

    python -m benchmarks.bench_ddp                    # on CPU: 1 process, then 2 (gloo)
    BENCH_DEVICES=4 BENCH_ACCELERATOR=gpu python -m benchmarks.bench_ddp   # 1 GPU, then 4 (nccl)
    BENCH_SET='train.max_epochs=1 model.source=/path/to/tiny' python -m benchmarks.bench_ddp

In a temp copy of this repo (what git would clone), runs `dvc repro prepare` on the committed
params (BENCH_SET overrides any `section.key=value`), then `python -m stages.train` three times:
one process; BENCH_DEVICES processes with the same per-process batch (the global batch grows, the
optimizer steps shrink: what scaling out usually means); and BENCH_DEVICES processes with the
per-process batch divided so the global batch and the step count match the single process.
Prints metrics/train.json's figures per run: samples/s, training tokens/s where train reports it,
wall time, optimizer steps, best validation loss and accuracy (or perplexity).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEVICES = int(os.environ.get("BENCH_DEVICES", 2))
ACCELERATOR = os.environ.get("BENCH_ACCELERATOR", "cpu")
SHOWN = ("train_samples_per_s", "train_tokens_per_s", "wall_s", "steps", "best_val_loss",
         "best_val_accuracy", "best_val_perplexity")


def copy_repo(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)  # dvc wants a git repo
    return dest


def set_params(repo: Path, overrides: dict[str, object]) -> None:
    """Apply ``{"section.key": value}`` to params.yaml, as `dvc exp run -S` would."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for dotted, value in overrides.items():
        *parents, key = dotted.split(".")
        node = params
        for name in parents:
            node = node[name]
        node[key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run(repo: Path, *cmd: str) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the copy's own sqlite store
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


def main() -> None:
    overrides = {k: yaml.safe_load(v) for k, v in
                 (item.split("=", 1) for item in os.environ.get("BENCH_SET", "").split())}
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        repo = copy_repo(Path(tmp))
        set_params(repo, {**overrides, "train.accelerator": ACCELERATOR})
        run(repo, sys.executable, "-m", "dvc", "repro", "prepare")
        batch = yaml.safe_load((repo / "params.yaml").read_text())["train"]["batch_size"]
        runs = {"1 process": {"train.devices": 1, "train.strategy": "auto"},
                f"{DEVICES} x batch {batch}": {"train.devices": DEVICES, "train.strategy": "ddp"},
                f"{DEVICES} x batch {batch // DEVICES}": {"train.devices": DEVICES,
                                                          "train.strategy": "ddp",
                                                          "train.batch_size": batch // DEVICES}}
        print(f"{'run':<16}" + "".join(f"{k:>22}" for k in SHOWN))
        for name, knobs in runs.items():
            set_params(repo, {"train.batch_size": batch, **knobs})
            shutil.rmtree(repo / "models" / "checkpoints", ignore_errors=True)  # never resume
            run(repo, sys.executable, "-m", "stages.train")
            metrics = json.loads((repo / "metrics" / "train.json").read_text())
            print(f"{name:<16}" + "".join(f"{metrics.get(k, '-')!s:>22}" for k in SHOWN), flush=True)


if __name__ == "__main__":
    main()
