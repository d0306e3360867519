"""Rewards for the shipped instruction sample (data/sample/pairs.csv): partial credit, so GRPO has a
signal before whole answers come out right."""

from __future__ import annotations


def words_in_place(prompt: str, completion: str, reference: str) -> float:
    """Share of the reference's words the completion has at the same position, minus a share for
    each extra word: 1.0 only for the whole answer."""
    got, want = completion.split(), str(reference).split()
    if not want:
        return 0.0
    right = sum(g == w for g, w in zip(got, want, strict=False))
    return (right - max(0, len(got) - len(want))) / len(want)
