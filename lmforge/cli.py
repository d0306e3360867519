"""The `lmforge` command: what DVC and MLflow leave to awk and spreadsheets.

    lmforge compare --against main   # compare workspace metrics to a revision; non-zero on regression
    lmforge exp                      # the experiments: name, key params, headline test metrics
    lmforge lineage                  # where the current model comes from: commit, data, run, Bento
    lmforge params use examples/lm_instruct.yaml   # merge an overlay into params.yaml, validated
    lmforge params show              # the resolved params.yaml, every default filled in
    lmforge plots template           # rewrite the offline page `dvc plots show` fills
    lmforge --version

Run from the repo root (it reads params.yaml and the metrics files there). `lmforge gate` is the old
name of `lmforge compare` ("gate" names the pipeline stage with the floors): it still works, with a
notice.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmforge.common import run_main
from lmforge.plots import TEMPLATE


def add_views(sub) -> None:
    """compare (and gate, its old name), exp, plots template: the commands that show results."""
    compare = sub.add_parser("compare", help="compare metrics to a git revision with tolerances")
    gate = sub.add_parser("gate", help="the old name of compare (deprecated)")
    for p in (compare, gate):
        p.add_argument("--against", default="main", help="git revision to compare to (default: main)")
        p.add_argument("--report", default=None,
                       help="Markdown report path (default: paths.gate_report)")
    exp = sub.add_parser("exp", help="the experiments table: name, key params, headline metrics",
                         description="`dvc exp show`, cut to the columns that tell experiments apart.")
    exp.add_argument("-A", "--all-commits", action="store_true",
                     help="experiments of every commit, not only the workspace's (dvc exp show -A)")
    plots = sub.add_parser("plots", help="the page `dvc plots show` fills, for offline viewing")
    template = plots.add_subparsers(dest="action", required=True).add_parser(
        "template", help="write the HTML template with vega, vega-lite and vega-embed inline")
    template.add_argument("--output", default=str(TEMPLATE),
                          help=f"where to write it (default: {TEMPLATE}, which .dvc/config names)")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="lmforge", description=__doc__.splitlines()[0])
    top.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = top.add_subparsers(dest="command", required=True)
    add_views(sub)
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


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lmforge")
    except PackageNotFoundError:  # run from a source tree without `pip install -e .`
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.command == "params":
        run = params_command
    elif args.command in ("compare", "gate"):
        if args.command == "gate":
            print("lmforge: `lmforge gate` is now `lmforge compare` (the old name will go)",
                  file=sys.stderr)
        from lmforge.compare import run
    elif args.command == "exp":
        from lmforge.experiments import run
    elif args.command == "plots":
        from lmforge.plots import run
    else:
        from lmforge.lineage import run
    run_main(lambda: sys.exit(run(args)))  # run returns the exit status: 1 on a regression


if __name__ == "__main__":
    main()
