"""Row hashes: duplicates, leakage and the hash split without holding the rows in memory.

A row's hash is 8 bytes of BLAKE2b over its key columns (each value length-prefixed, a null marked
apart from ""), so it is the same on every run, machine and engine: the Spark engine calls these
functions in its pandas UDFs. Two different rows share a hash with probability about n^2 / 2^65
(1 in 15,000 for 50 million rows), and would then count as duplicates.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pandas as pd


def value_bytes(value: object) -> bytes:
    if value is None or value is pd.NA or (isinstance(value, float) and value != value):
        return b"\x00"
    data = str(value).encode("utf-8", "surrogatepass")
    return b"\x01" + len(data).to_bytes(8, "little") + data


def row_hashes(df: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """One uint64 per row over ``columns`` (in that order)."""
    out = np.empty(len(df), dtype=np.uint64)
    for i, values in enumerate(zip(*(df[c].tolist() for c in columns), strict=True)):
        h = hashlib.blake2b(digest_size=8)
        for v in values:
            h.update(value_bytes(v))
        out[i] = int.from_bytes(h.digest(), "little")
    return out


def first_in_batch(hashes: np.ndarray) -> np.ndarray:
    """True where a hash appears for the first time within the batch."""
    first = np.zeros(len(hashes), dtype=bool)
    first[np.unique(hashes, return_index=True)[1]] = True
    return first


class SeenRows:
    """The hashes seen so far, in pandas' khash table: about 34 MB per million distinct rows."""

    def __init__(self) -> None:
        from pandas._libs.hashtable import UInt64HashTable

        self.table = UInt64HashTable()

    def __len__(self) -> int:
        return len(self.table)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        return self.table.lookup(hashes) != -1

    def add(self, hashes: np.ndarray) -> None:
        self.table.map_locations(hashes)

    def first_seen(self, hashes: np.ndarray) -> np.ndarray:
        """True for rows whose hash was not seen before (in earlier batches or earlier in this one);
        remembers them all."""
        new = ~self.contains(hashes) & first_in_batch(hashes)
        self.add(hashes[new])
        return new


def mix(hashes: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of hash + seed: a seeded, uniform position for each row (wraps mod 2^64)."""
    with np.errstate(over="ignore"):
        z = hashes + np.uint64(seed % 2**64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def unit_interval(hashes: np.ndarray, seed: int) -> np.ndarray:
    """Each row's seeded position in [0, 1): the hash split compares it with the fractions."""
    return (mix(hashes, seed) >> np.uint64(11)).astype(np.float64) / float(2**53)
