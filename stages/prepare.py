"""Stage prepare: tokenize every split with the model's fast tokenizer (truncate, no padding).

    python -m stages.prepare       # normally via `dvc repro prepare`; reads `model` and `prepare`

Padding happens later, per batch, so short batches stay short. Writes under ``paths.processed``:
``datasets/`` (a DatasetDict on disk), ``tokenizer/``, ``labels.json`` (id <-> name) and
``stats.json`` (token lengths, truncated rows). Task causal_lm (lmforge/causal_lm/data.py) writes
``lm.json`` instead of ``labels.json``: plain text packed into ``prepare.block_size`` blocks, or
prompt/response rows with the prompt masked out of the loss; from scratch, the tokenizer is a
byte-level BPE trained on the train split.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lmforge.common import SPLITS, UserError, read_json, replace_dir, run_main, write_json
from lmforge.params import Params, load_params
from lmforge.tasks import CAUSAL_LM, task


def require_validated(path: Path) -> None:
    verdict = read_json(path, "run `dvc repro validate` first")
    if not verdict.get("success"):
        raise UserError(f"{path}: the data failed validation; fix it before preparing (see report)")


def main(params: Params | None = None) -> dict:
    import datasets

    params = params or load_params()
    paths = params.paths
    require_validated(paths.validation)
    frames = {s: pd.read_parquet(paths.interim / f"{s}.parquet") for s in SPLITS}
    datasets.disable_progress_bars()
    if params.task == CAUSAL_LM:
        from lmforge.causal_lm.data import encode_splits
    else:
        from lmforge.classification.data import encode_splits
    tokenizer, splits, meta, stats = encode_splits(params, frames)
    with replace_dir(paths.processed) as out:
        datasets.DatasetDict(splits).save_to_disk(str(out / "datasets"))
        tokenizer.save_pretrained(str(out / "tokenizer"))
        write_json(out / task(params.task).meta_file, meta)
        write_json(out / "stats.json", stats)
    print(f"prepare: {stats} -> {paths.processed}")
    return stats


if __name__ == "__main__":
    run_main(main)
