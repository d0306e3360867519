"""Stage ingest: copy the source into data/raw, clean it, and write train/validation/test Parquet.

    python -m stages.ingest        # normally via `dvc repro ingest`; reads params section `data`

The source (``data.source``) is a .csv/.jsonl/.parquet file, a folder of ``train``/``validation``/
``test`` files of those formats, or ``hf:<dataset id>``; for task causal_lm also .txt files (one row
per document or line, ``data.text_unit``). Splits the source lacks are carved from train
(``data.split.method``: a seeded shuffle, stratified by label for classification, or a row hash).
``data.engine`` says what does the work: ``local`` streams the source in batches of
``data.batch_rows`` rows (lmforge/data/local.py), ``spark`` runs on Apache Spark
(lmforge/data/spark.py); either writes each split as a folder of Parquet parts
(lmforge/data/shards.py). The manifest (a DVC metric) records rows,
labels (causal_lm: characters), dropped rows and the source's content hash, so `dvc metrics diff`
shows data changes between branches.

Classification (docs/labelling.md): rows without a label (an empty label cell, or a folder source's
``unlabeled`` file) go to ``<interim>/unlabeled.parquet``, never to a split; Label Studio JSON
exports (the source itself, or a folder source's ``labelstudio/*.json``) add labels, resolved by
majority, and the manifest counts what they held (``label_studio``) and the pool (``unlabeled``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lmforge.common import SPLITS, run_main, sha256_of, write_aside, write_json
from lmforge.data.sources import LABEL_STUDIO_DIR, Table, label_studio_exports, load_source
from lmforge.params import Data, Params, load_params
from lmforge.tasks import CAUSAL_LM


def build_manifest(result: dict, data: Data, digest: str, task: str) -> dict:
    """The data manifest: numbers a reviewer diffs between branches (`dvc metrics diff`).

    Classification counts rows per label; causal_lm has no labels and counts characters per split
    (conversations also turns and source formats).
    """
    rows = {s: result["rows"].get(s, 0) for s in SPLITS}
    detail = result["detail"]
    for key in ("chars", "turns"):
        if key in detail:
            per_split = {s: detail[key].get(s, 0) for s in SPLITS}
            detail[key] = {**per_split, "total": sum(per_split.values())}
    if "formats" in detail:
        detail["formats"] = {s: dict(sorted(detail["formats"].get(s, {}).items())) for s in SPLITS}
    if "labels" in detail:  # most rows first, as value_counts orders them
        labels = detail["labels"]
        detail["labels"] = {s: dict(sorted(labels.get(s, {}).items(), key=lambda kv: -kv[1]))
                            for s in SPLITS}
    if task == CAUSAL_LM and data.chat is None and "chars" not in detail:
        detail["chars"] = {**dict.fromkeys(SPLITS, 0), "total": 0}
    return {"source": data.source, "source_sha256": digest,
            "rows": {**rows, "total": sum(rows.values())}, **detail, "dropped": result["dropped"],
            **result["extra"]}


def copy_raw(tables: dict[str, Table], exports: list[Path], data: Data, raw_dir: Path) -> None:
    """Keep an immutable copy of exactly what was read: bytes for files (Label Studio exports as
    they sit in the source), Parquet for hub data."""
    for name, table in tables.items():
        if table.path is None:
            table.frame.to_parquet(raw_dir / f"{name}.parquet", index=False)
        else:
            shutil.copy2(table.path, raw_dir / table.path.name)
    dest = raw_dir / LABEL_STUDIO_DIR if Path(data.source).is_dir() else raw_dir
    for path in exports:
        dest.mkdir(exist_ok=True)
        shutil.copy2(path, dest / path.name)


def read_tables(params: Params) -> dict[str, Table]:
    data = params.data
    if data.chat is None:
        return load_source(data, params.task)
    from lmforge.data.conversations import load_conversations

    return {name: Table.whole(name, df) for name, df in load_conversations(data).items()}


def main(params: Params | None = None) -> dict:
    params = params or load_params()
    data, paths = params.data, params.paths
    tables = read_tables(params)
    # Classification: rows without a label are kept aside for labelling (stage select), and Label
    # Studio exports add labels (lmforge/data/pool.py); neither changes a source without them.
    exports = label_studio_exports(data, params.task)
    # dvc.yaml persists these outputs, so a failed run leaves the last good ones in place; new ones
    # are written aside and swapped in only once complete.
    with write_aside(paths.raw, paths.interim, paths.manifest) as (raw, interim, manifest_file):
        raw.mkdir()
        interim.mkdir()
        if data.engine == "spark":
            from lmforge.data.spark import spark_ingest

            result = spark_ingest(tables, exports, params, interim)
        else:
            from lmforge.data.local import LocalIngest

            result = LocalIngest(data, params.task, interim).run(tables, exports)
        copy_raw(tables, exports, data, raw)
        manifest = build_manifest(result, data, sha256_of(raw), params.task)
        write_json(manifest_file, manifest)
    dropped = result["dropped"]
    n_dropped = sum(sum(d.values()) for d in dropped.values())
    print(f"ingest: {manifest['rows']} rows, {n_dropped} dropped {dropped} -> {paths.interim}")
    return manifest


if __name__ == "__main__":
    run_main(main)
