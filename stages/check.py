"""Stage check: all of params.yaml, and the files it names, checked before any stage can delete
anything.

    python -m stages.check         # normally via `dvc repro`: the first stage, ingest depends on it

DVC removes a stage's outputs just before it runs that stage. This stage depends on the whole of
params.yaml (every section, the ones only the service or tracking read too) and the schema, and
every other stage runs after it, so a typo anywhere stops `dvc repro` here with the key path and a
"did you mean", before any output is touched. It also names a missing ``data.source``,
``package.bentofile`` or ``package:`` model before DVC would report it as a bare path.

Writes ``paths.check``: the same bytes whenever params are valid, so passing it never makes a later
stage re-run.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.common import UserError, run_main, write_json
from lmforge.data.sources import HF_PREFIX
from lmforge.models import PACKAGE_PREFIX, resolve_model_source
from lmforge.params import Params, load_params

VERDICT = {"params": "valid", "sources": "present"}


def source_problems(params: Params) -> list[str]:
    """The files params name that are not there, each with its key (hub ids are not looked up)."""
    problems = []
    source = params.data.source
    if not source.startswith(HF_PREFIX) and not Path(source).exists():
        problems.append(f"data.source: {source} does not exist (a file, a folder of split files, "
                        f"or {HF_PREFIX}<dataset id>)")
    if not params.package.bentofile.is_file():
        problems.append(f"package.bentofile: {params.package.bentofile} does not exist")
    grpo = params.align.grpo.rewards if params.align.method == "grpo" else {}
    for name, reward in grpo.items():  # a user reward's module, before train spends minutes
        module = reward.function.partition(":")[0]
        if ":" in reward.function and not Path(*module.split(".")).with_suffix(".py").is_file():
            problems.append(f"align.grpo.rewards.{name}: {reward.function}: no file "
                            f"{Path(*module.split('.')).with_suffix('.py')}")
    if params.model.source.startswith(PACKAGE_PREFIX):
        try:
            resolve_model_source(params.model.source)
        except UserError as err:
            problems.append(str(err))
    return problems


def main(params: Params | None = None) -> dict:
    params = params or load_params()  # every section; a bad key fails here with its path
    problems = source_problems(params)
    if problems:
        raise UserError(f"params.yaml names {len(problems)} missing input(s):\n"
                        + "\n".join(f"  - {p}" for p in problems))
    write_json(params.paths.check, VERDICT)
    print(f"check: params.yaml valid, its inputs present -> {params.paths.check}")
    return VERDICT


if __name__ == "__main__":
    run_main(main)
