"""Benchmark: how the data stages' cost grows with the source, per engine (docs/scaling.md).

    python -m benchmarks.bench_data_scale                            # 10^4 and 10^5 rows, local
    python -m benchmarks.bench_data_scale 10000 100000 1000000 --engines local spark
    python -m benchmarks.bench_data_scale 5000000 --row-chars 1000 --stages ingest validate  # ~5 GB

The source is data/sample/reviews.csv repeated, each copy's texts given a unique suffix so that
deduplication keeps every row (``--row-chars N``: each row joins sample texts up to N characters,
for a source of N bytes a row). In a temp `git clone` of this repo's last commit (default params
otherwise, ``data.engine`` set per run), each size runs the stages one after the other as
`python -m stages.<name>`, and prints wall time, rows/s and peak memory: the largest resident set
of the stage and its children (the stage runs under a small wrapper whose RUSAGE_CHILDREN is that
stage's alone; Spark's JVM is a child, so it counts).
"""

from __future__ import annotations

import argparse
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
SAMPLE_S = 0.1  # how often the process tree's memory is summed (Spark's JVM is not waited for,
# so RUSAGE_CHILDREN misses it: the tree's sum, sampled, catches it)


def tree_rss_mb(root) -> float:
    """The memory of a process and all its descendants, in MB: their PSS, which shares each page
    among the processes that map it (a plain RSS sum counts a forked child's shared pages twice)."""
    import psutil

    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except psutil.Error:  # ended between listing and reading
            pass
    return total / 2**20


def write_source(dest: Path, rows: int, row_chars: int = 0) -> None:
    """``rows`` labelled rows: the sample's, repeated with a copy number appended to each text;
    with ``row_chars``, each text continues with the next sample texts up to that length."""
    with SAMPLE.open(newline="") as f:
        sample = list(csv.DictReader(f))
    with dest.open("w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=["text", "label"])
        out.writeheader()
        for i in range(rows):
            row = sample[i % len(sample)]
            text, j = f"{row['text']} (copy {i // len(sample)})", i
            while len(text) < row_chars:
                j += 1
                text += " " + sample[j % len(sample)]["text"]
            out.writerow({"text": text[:row_chars] if row_chars else text, "label": row["label"]})


def run_stage(stage: str, clone: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of ``python -m stages.<stage>`` in ``clone``: the larger of the
    stage's own peak (exact) and the sampled peak of its process tree (Spark's JVM, workers)."""
    import psutil

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = psutil.Popen([sys.executable, "-c", WRAPPER, sys.executable, "-m", f"stages.{stage}"],
                            cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        tree_peak = 0.0
        while proc.poll() is None:
            tree_peak = max(tree_peak, tree_rss_mb(proc))
            time.sleep(SAMPLE_S)
        wall = time.perf_counter() - start
        out.seek(0)
        log = out.read()
    if proc.returncode != 0:
        sys.exit(f"stage {stage} failed:\n{log[-4000:]}")
    return wall, max(int(log.split()[-1]) / 1024, tree_peak)


def measure(rows: int, engine: str, stages: list[str], row_chars: int,
            tmp_root: str | None) -> tuple[int, float, dict[str, tuple[float, float]]]:
    """(rows ingest kept, source GB, each stage's (wall, peak RSS)) on a ``rows``-row source. The
    sample's own repeated texts are dropped once per copy, so about 1% fewer rows are kept."""
    with tempfile.TemporaryDirectory(dir=tmp_root) as tmp:
        clone = Path(tmp) / "repo"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        source = clone / "data" / "scale.csv"
        write_source(source, rows, row_chars)
        params = clone / "params.yaml"
        text = params.read_text().replace("source: data/sample/reviews.csv", "source: data/scale.csv", 1)
        params.write_text(text.replace("engine: local", f"engine: {engine}", 1))
        costs = {stage: run_stage(stage, clone) for stage in stages}
        kept = json.loads((clone / "metrics" / "data.json").read_text())["rows"]["total"]
        return kept, source.stat().st_size / 1e9, costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[10_000, 100_000])
    parser.add_argument("--engines", nargs="+", default=["local"], choices=["local", "spark"])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--row-chars", type=int, default=0, help="characters per row's text")
    parser.add_argument("--tmp", default=None, help="folder for the clone (needs ~3x the source)")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
          f"Python {platform.python_version()}; {time.strftime('%Y-%m-%d')}")
    print("| engine | source rows | source GB | kept | stage | wall s | rows/s | us/row | peak RSS MB |\n"
          "|---|---:|---:|---:|---|---:|---:|---:|---:|")
    for engine in args.engines:
        for rows in args.sizes:
            kept, gb, costs = measure(rows, engine, args.stages, args.row_chars, args.tmp)
            for stage, (wall, rss) in costs.items():
                print(f"| {engine} | {rows:,} | {gb:.3f} | {kept:,} | {stage} | {wall:.1f} | "
                      f"{rows / wall:,.0f} | {wall / rows * 1e6:.1f} | {rss:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
