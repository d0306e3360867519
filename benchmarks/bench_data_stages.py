"""Benchmark: wall time of the data stages on the sample, and of a no-op `dvc repro`.

    python -m benchmarks.bench_data_stages      # or `make bench`

Works on a fresh `git clone` of this repo in a temp folder (committed state, default params), so
the working tree is left alone. Targets from the issue: data stages < 60 s, no-op repro < 3 s.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], cwd: Path) -> float:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    dvc = [sys.executable, "-m", "dvc"]
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "repo"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        stages = {s: timed([*dvc, "repro", "--single-item", s], clone)
                  for s in ("ingest", "validate", "prepare")}
        noop = [timed([*dvc, "repro", "prepare"], clone) for _ in range(3)]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    for stage, secs in stages.items():
        print(f"dvc repro {stage:<9} {secs:6.1f} s")
    total = sum(stages.values())
    print(f"data stages total    {total:6.1f} s  (target < 60 s: {total / 60:.2f} of budget)")
    print(f"no-op dvc repro      {statistics.median(noop):6.2f} s  median of 3 (target < 3 s)")


if __name__ == "__main__":
    main()
