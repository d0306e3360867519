"""Carving the splits a source lacks (data.split) from the rows it has, by row number.

Ingest's engines hand over what each method needs, never the rows: ``shuffle`` a label per row
(classification) or just the row count, ``hash`` each row's hash (lmforge/data/hashing.py). Each
returns, per split, the row numbers it gets, in source order, so rows keep their order in a split.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from lmforge.data.hashing import unit_interval


def stratified_indices(labels: pd.Series, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """A seeded permutation per class (classes in name order); each class keeps a train row."""
    rng = np.random.default_rng(seed)
    picked: dict[str, list[np.ndarray]] = {name: [] for name in ["train", *fractions]}
    groups = labels.reset_index(drop=True).groupby(labels.to_numpy(), dropna=False, sort=True).indices
    for _, idx in sorted(groups.items(), key=lambda kv: str(kv[0])):
        idx = rng.permutation(idx)
        start = 0
        for name, frac in fractions.items():
            n = min(int(round(len(idx) * frac)), max(len(idx) - start - 1, 0))
            picked[name].append(idx[start : start + n])
            start += n
        picked["train"].append(idx[start:])
    return {name: np.sort(np.concatenate(parts or [np.array([], int)])) for name, parts in picked.items()}


def random_indices(n_rows: int, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """A seeded permutation of all rows (no labels to stratify by); train keeps at least a row."""
    idx = np.random.default_rng(seed).permutation(n_rows)
    picked, start = {}, 0
    for name, frac in fractions.items():
        n = min(int(round(len(idx) * frac)), max(len(idx) - start - 1, 0))
        picked[name], start = idx[start : start + n], start + n
    return {name: np.sort(i) for name, i in {"train": idx[start:], **picked}.items()}


def hash_codes(hashes: np.ndarray, fractions: dict[str, float], seed: int) -> np.ndarray:
    """Per row, the position in ``["train", *fractions]`` of its split: fractions take the low end
    of each row's seeded position in [0, 1), in order; train the rest. Needs only the row itself."""
    position, codes, low = unit_interval(hashes, seed), np.zeros(len(hashes), dtype=np.int8), 0.0
    for code, frac in enumerate(fractions.values(), start=1):
        codes[(position >= low) & (position < low + frac)] = code
        low += frac
    return codes


def hash_indices(hashes: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    codes = hash_codes(hashes, fractions, seed)
    return {name: np.flatnonzero(codes == code) for code, name in enumerate(["train", *fractions])}


def carve(method: str, fractions: dict[str, float], seed: int, n_rows: int,
          labels: pd.Series | None = None, hashes: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Row numbers per split (train first) for data.split.method; labels: classification only."""
    if method == "hash":
        return hash_indices(hashes, fractions, seed)
    if labels is not None:
        return stratified_indices(labels, fractions, seed)
    return random_indices(n_rows, fractions, seed)
