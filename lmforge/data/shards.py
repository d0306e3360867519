"""The interim splits on disk: ``<interim>/<split>.parquet``, a folder of Parquet part files.

Both engines write this layout (Spark names its parts ``part-<n>-<uuid>...``; the local engine
``part-<n>.parquet``), and every reader takes a folder or a single Parquet file alike (pandas and
pyarrow read a folder as one table, parts in name order), so nothing downstream cares which
engine ran. Readers that must not hold a split in memory use ``read_batches``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from lmforge.common import UserError


def split_path(interim: Path, split: str) -> Path:
    return Path(interim) / f"{split}.parquet"


def parquet_dataset(path: Path):
    import pyarrow.dataset as pads

    return pads.dataset(str(path), format="parquet")  # skips _SUCCESS, .crc and other hidden files


def count_rows(path: Path) -> int:
    return parquet_dataset(path).count_rows()


def read_batches(path: Path, batch_rows: int, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
    """A split in order, in batches of at most ``batch_rows`` rows; an empty split gives one empty
    frame with its columns, so a reader always sees them."""
    dataset = parquet_dataset(path)
    empty = True
    for batch in dataset.to_batches(columns=columns, batch_size=batch_rows, batch_readahead=0,
                                    fragment_readahead=0):
        if batch.num_rows:
            empty = False
            yield batch.to_pandas()
    if empty:
        yield dataset.to_table(columns=columns).to_pandas()


class ShardWriter:
    """Writes a split as ``<folder>/part-<n>.parquet``, a new part every ``part_rows`` rows.

    The first batch fixes the column types; a later batch is cast to them, and one that cannot be
    names the column. ``close`` writes an empty part when nothing came, so the split still reads.
    """

    def __init__(self, folder: Path, part_rows: int, where: str) -> None:
        self.folder, self.part_rows, self.where = Path(folder), part_rows, where
        self.schema, self.writer, self.parts, self.in_part, self.rows = None, None, 0, 0, 0

    def write(self, df: pd.DataFrame) -> None:
        import pyarrow as pa

        table = pa.Table.from_pandas(df, preserve_index=False)
        if self.schema is None:
            self.schema = table.schema
        try:
            table = table.cast(self.schema)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as err:
            raise UserError(f"{self.where}: a column's values change type between batches of "
                            f"{self.part_rows} rows ({str(err).splitlines()[0]}); give the column "
                            "one type throughout (e.g. quote numbers meant as text)") from None
        while table.num_rows:
            if self.writer is None:
                self.folder.mkdir(parents=True, exist_ok=True)
                self.writer = self._open()
            take = min(table.num_rows, self.part_rows - self.in_part)
            self.writer.write_table(table.slice(0, take))
            self.in_part, self.rows, table = self.in_part + take, self.rows + take, table.slice(take)
            if self.in_part >= self.part_rows:
                self.writer.close()
                self.writer, self.in_part = None, 0

    def _open(self):
        import pyarrow.parquet as pq

        path = self.folder / f"part-{self.parts:05d}.parquet"
        self.parts += 1
        return pq.ParquetWriter(str(path), self.schema)

    def close(self, empty: pd.DataFrame | None = None) -> int:
        """Finish the last part; with no rows written, write ``empty``'s columns with no rows."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.rows == 0 and self.parts == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            frame = empty.iloc[:0] if empty is not None else pd.DataFrame()
            frame.to_parquet(self.folder / "part-00000.parquet", index=False)
            self.parts = 1
        return self.rows
