"""GRPO rewards: the built-ins and user functions named in ``align.grpo.rewards``.

A reward is called once per completion as ``fn(prompt, completion, reference) -> float``:
``prompt`` is the row's prompt (without the template), ``completion`` the generated text (special
tokens removed), ``reference`` the row's ``data.response_column`` value. User functions live in
the repo's ``rewards/`` package (a dependency of stages align and evaluate, so editing one re-runs
them) and are named ``rewards.<module>:<function>``.

A reward that raises, or returns anything but a finite int or float, stops the stage with a
UserError naming the function and the prompt.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from lmforge.common import UserError, is_number
from lmforge.params import Reward

NUMBER = re.compile(r"-?\d+(?:[.,]\d+)?")


def exact_match(prompt: str, completion: str, reference: str) -> float:
    """1.0 when the completion equals the reference, surrounding whitespace aside."""
    return float(completion.strip() == str(reference).strip())


def last_number(text: str) -> float | None:
    found = NUMBER.findall(str(text))
    return float(found[-1].replace(",", ".")) if found else None


def numeric(prompt: str, completion: str, reference: str, tolerance: float) -> float:
    """1.0 when the completion's last number is within ``tolerance`` of the reference's."""
    got, want = last_number(completion), last_number(reference)
    return float(got is not None and want is not None and abs(got - want) <= tolerance)


def regex(prompt: str, completion: str, reference: str, pattern: str) -> float:
    """1.0 when the stripped completion matches ``pattern`` whole."""
    return float(re.fullmatch(pattern, completion.strip()) is not None)


def length_penalty(prompt: str, completion: str, reference: str, max_chars: int) -> float:
    """0 up to ``max_chars`` characters, then -1/max_chars per character over."""
    return -max(0, len(completion.strip()) - max_chars) / max_chars


@dataclass(frozen=True)
class RewardFn:
    """One reward as the loop calls it: its name in params, its function (spelled as in params)
    and weight."""

    name: str
    function: str
    fn: Callable[[str, str, str], object]
    weight: float


def user_function(spec: str) -> Callable:
    """``rewards.<module>:<function>`` imported; a missing module or name is a UserError."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"align.grpo.rewards: {spec}: cannot import {module_name}: {err}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"align.grpo.rewards: {spec}: {module_name} has no function {attr}")
    return fn


def bound(spec: Reward) -> Callable[[str, str, str], object]:
    """The function of one reward, its option (pattern, tolerance, max_chars) bound."""
    name = spec.function
    if name == "exact_match":
        return exact_match
    if name == "regex":
        return lambda p, c, r: regex(p, c, r, spec.pattern)
    if name == "numeric":
        return lambda p, c, r: numeric(p, c, r, spec.tolerance)
    if name == "length_penalty":
        return lambda p, c, r: length_penalty(p, c, r, spec.max_chars)
    return user_function(name)


def load_rewards(specs: dict[str, Reward]) -> list[RewardFn]:
    """The rewards of ``align.grpo.rewards``, in params order."""
    return [RewardFn(name, spec.function, bound(spec), spec.weight) for name, spec in specs.items()]


def call(reward: RewardFn, prompt: str, completion: str, reference: str) -> float:
    """One reward value; anything but a finite number stops the stage, naming function and prompt."""
    try:
        value = reward.fn(prompt, completion, reference)
    except Exception as err:  # a user's function may raise anything: report it, never a traceback
        raise UserError(f"reward {reward.function} raised {type(err).__name__}: {err} on prompt "
                        f"{prompt!r} (completion {completion!r})") from None
    if not is_number(value) or not math.isfinite(value):
        raise UserError(f"reward {reward.function} returned {value!r}, not a finite number, on "
                        f"prompt {prompt!r} (completion {completion!r})")
    return float(value)


def score(rewards: list[RewardFn], prompts: list[str], completions: list[str],
          references: list[str]) -> tuple[list[float], dict[str, list[float]]]:
    """Per completion, the weighted sum of every reward, and each reward's raw values by name."""
    rows = list(zip(prompts, completions, references, strict=True))
    each = {r.name: [call(r, *row) for row in rows] for r in rewards}
    total = [sum(r.weight * each[r.name][i] for r in rewards) for i in range(len(rows))]
    return total, each
