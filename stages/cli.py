"""The `lmforge` command: what DVC and MLflow leave to awk and spreadsheets.

    lmforge gate --against main      # compare workspace metrics to a revision; non-zero on regression
    lmforge lineage                  # where the current model comes from: commit, data, run, Bento

Run from the repo root (it reads params.yaml and the metrics files there).
"""

from __future__ import annotations

import argparse
import sys

from stages.common import run_main


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="lmforge", description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="command", required=True)
    gate = sub.add_parser("gate", help="compare metrics to a git revision with tolerances")
    gate.add_argument("--against", default="main", help="git revision to compare to (default: main)")
    gate.add_argument("--report", default=None, help="Markdown report path (default: paths.gate_report)")
    lineage = sub.add_parser("lineage", help="show where the current model comes from")
    lineage.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.command == "gate":
        from stages.compare import run
    else:
        from stages.lineage import run
    run_main(lambda: sys.exit(run(args)))  # run returns the exit status: 1 on a regression


if __name__ == "__main__":
    main()
