"""Benchmark: how the data stages' cost grows with the source (issue 19's baseline, today's engine).

    python -m benchmarks.bench_data_scale                 # 10^4 and 10^5 rows
    python -m benchmarks.bench_data_scale 10000 1000000   # any row counts

The source is data/sample/reviews.csv repeated, each copy's texts given a unique suffix so that
deduplication keeps every row. In a temp `git clone` of this repo (default params otherwise), each
size runs ingest, validate and prepare one after the other as `python -m stages.<name>`, and prints
wall time, rows/s and peak memory: the largest resident set of the stage and its children (the
stage runs under a small wrapper whose RUSAGE_CHILDREN is that stage's alone).
"""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "reviews.csv"
STAGES = ("ingest", "validate", "prepare")
# Runs one stage and prints its peak RSS (KiB on Linux) last: the stage is the wrapper's only child.
WRAPPER = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def write_source(dest: Path, rows: int) -> None:
    """``rows`` labelled rows: the sample's, repeated with a copy number appended to each text."""
    with SAMPLE.open(newline="") as f:
        sample = list(csv.DictReader(f))
    with dest.open("w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=["text", "label"])
        out.writeheader()
        for i in range(rows):
            row = sample[i % len(sample)]
            out.writerow({"text": f"{row['text']} (copy {i // len(sample)})", "label": row["label"]})


def run_stage(stage: str, clone: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of ``python -m stages.<stage>`` in ``clone``."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", WRAPPER, sys.executable, "-m", f"stages.{stage}"],
                          cwd=clone, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"stage {stage} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return wall, int(done.stdout.split()[-1]) / 1024


def measure(rows: int) -> tuple[int, dict[str, tuple[float, float]]]:
    """(rows ingest kept, each stage's (wall, peak RSS)) on a ``rows``-row source. The sample's
    own repeated texts are dropped once per copy, so about 1% fewer rows are kept."""
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "repo"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        source = clone / "data" / "scale.csv"
        write_source(source, rows)
        params = clone / "params.yaml"
        params.write_text(params.read_text().replace(
            "source: data/sample/reviews.csv", "source: data/scale.csv", 1))
        costs = {stage: run_stage(stage, clone) for stage in STAGES}
        return json.loads((clone / "metrics" / "data.json").read_text())["rows"]["total"], costs


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [10_000, 100_000]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")
    print("| source rows | kept | stage | wall s | rows/s | peak RSS MB |\n|---:|---:|---|---:|---:|---:|")
    for rows in sizes:
        kept, costs = measure(rows)
        for stage, (wall, rss) in costs.items():
            print(f"| {rows:,} | {kept:,} | {stage} | {wall:.1f} | {rows / wall:,.0f} | {rss:,.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
