"""Benchmark: the pipeline on real data, SST-2, within a CPU budget (train subset, eval on its dev set).

    python -m benchmarks.sst2            # SST2_TRAIN_ROWS=8000 SST2_EPOCHS=2 by default

Reads ../shared/datasets/sst2 (never copied into the repo). In a temp `git clone` of this repo it
writes a folder source: train = a seeded, stratified SST2_TRAIN_ROWS-row sample of SST-2 train
(validation is carved from it by ingest), test = the official SST-2 validation split (872 rows),
then runs `dvc repro evaluate` with the default params otherwise (MiniLM) and prints the figures.
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

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "datasets" / "sst2"
ROWS = int(os.environ.get("SST2_TRAIN_ROWS", 8000))
EPOCHS = int(os.environ.get("SST2_EPOCHS", 2))


def write_source(dest: Path) -> None:
    train = pd.read_csv(SST2 / "train.csv")
    share = ROWS / len(train)
    sample = train.groupby("label", group_keys=False).sample(frac=share, random_state=0)
    dest.mkdir(parents=True)
    sample.sample(frac=1.0, random_state=0).to_csv(dest / "train.csv", index=False)
    pd.read_csv(SST2 / "validation.csv").to_csv(dest / "test.csv", index=False)


def main() -> None:
    if not SST2.is_dir():
        sys.exit(f"error: {SST2} not found (the shared datasets folder sits beside the repo)")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "repo"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        write_source(clone / "data" / "sst2")
        params = yaml.safe_load((clone / "params.yaml").read_text())
        params["data"]["source"] = "data/sst2"
        params["train"]["max_epochs"] = EPOCHS
        (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "dvc", "repro", "evaluate"], cwd=clone, env=env,
                             capture_output=True, text=True)
        wall = time.perf_counter() - start
        if run.returncode != 0:
            sys.exit(f"dvc repro failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
        manifest = json.loads((clone / "metrics/data.json").read_text())
        trained = json.loads((clone / "metrics/train.json").read_text())
        evaluation = json.loads((clone / "metrics/eval.json").read_text())
    print(f"SST-2: train {manifest['rows']['train']} / validation {manifest['rows']['validation']} "
          f"(sampled from {ROWS} SST-2 train rows), test = SST-2 dev {manifest['rows']['test']}")
    print(f"settings: MiniLM, {EPOCHS} epochs, batch {params['train']['batch_size']}, "
          f"lr {params['train']['learning_rate']}, group_by_length {params['train']['group_by_length']}")
    print(f"train: {trained['train_samples_per_s']} samples/s, {trained['wall_s']} s; "
          f"best val accuracy {trained['best_val_accuracy']}")
    print(f"SST-2 dev: accuracy {evaluation['accuracy']}, macro-F1 {evaluation['f1_macro']}")
    print(f"dvc repro evaluate wall time: {wall:.0f} s")


if __name__ == "__main__":
    main()
