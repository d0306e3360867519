"""The `lmforge` command: what DVC and MLflow leave to awk and spreadsheets.

    lmforge gate --against main      # compare workspace metrics to a revision; non-zero on regression
    lmforge lineage                  # where the current model comes from: commit, data, run, Bento
    lmforge params use examples/lm_instruct.yaml   # merge an overlay into params.yaml, validated
    lmforge params show              # the resolved params.yaml, every default filled in

Run from the repo root (it reads params.yaml and the metrics files there).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmforge.common import run_main


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="lmforge", description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="command", required=True)
    gate = sub.add_parser("gate", help="compare metrics to a git revision with tolerances")
    gate.add_argument("--against", default="main", help="git revision to compare to (default: main)")
    gate.add_argument("--report", default=None, help="Markdown report path (default: paths.gate_report)")
    lineage = sub.add_parser("lineage", help="show where the current model comes from")
    lineage.add_argument("--json", action="store_true", help="print JSON instead of a table")
    params = sub.add_parser(
        "params", help="apply an overlay to params.yaml, or show the resolved params (one-off "
        "changes: dvc exp run -S key=value)",
        description="Overlays (examples/*.yaml) hold only the keys that differ from params.yaml. "
        "For a one-off change without editing params.yaml: dvc exp run -S key=value.")
    action = params.add_subparsers(dest="action", required=True)
    use = action.add_parser(
        "use", help="merge an overlay into params.yaml, validate the result and write it",
        description="A mapping merges key by key; any other value, or a mapping tagged !replace, "
        "replaces params.yaml's. Nothing is written when the result does not validate. For a one-off "
        "change without editing params.yaml: dvc exp run -S key=value.")
    use.add_argument("overlay", type=Path, help="the overlay file, e.g. examples/lm_instruct.yaml")
    show = action.add_parser("show", help="print the resolved, validated params (defaults filled in)")
    for p in (use, show):
        p.add_argument("--params", type=Path, default=Path("params.yaml"),
                       help="the params file (default: params.yaml)")
    return top


def params_command(args: argparse.Namespace) -> int:
    """`lmforge params use|show`; 0 on success (a bad overlay raises UserError: exit 2)."""
    import yaml

    if args.action == "show":
        from lmforge.params import load_params

        params = load_params(args.params)
        print(yaml.safe_dump(params.model_dump(mode="json", by_alias=True), sort_keys=False))
        return 0
    from lmforge.overlay import load_overlay, settings, use_overlay

    params = use_overlay(args.overlay, args.params)
    keys = [".".join(path) for path in settings(load_overlay(args.overlay))]
    print(f"{args.params}: {args.overlay} applied (task {params.task}; "
          f"{len(keys)} setting(s): {', '.join(keys)})")
    print("`lmforge params show` prints every resolved value; `git diff params.yaml` what changed.")
    return 0


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.command == "params":
        run = params_command
    elif args.command == "gate":
        from lmforge.compare import run
    else:
        from lmforge.lineage import run
    run_main(lambda: sys.exit(run(args)))  # run returns the exit status: 1 on a regression


if __name__ == "__main__":
    main()
