"""Stage align's library: DPO-family preference optimization and GRPO after train.

``data.py`` (preference and prompt rows), ``dpo.py`` (losses and metrics), ``grpo.py`` (sampling,
advantages, the clipped objective), ``rewards.py`` (built-in and user reward functions),
``loop.py`` (the resumable optimizer loop), ``evaluate.py`` (evaluate's before/after section).

The stage always writes ``paths.aligned``: with ``align.method: none`` only ``align.json``, and the
later stages read train's model; else a whole model, which they read instead (``scored_model``).
"""

from __future__ import annotations

from pathlib import Path

ALIGN_FILE = "align.json"  # in paths.aligned: the method and what evaluate needs to score it
NONE = "none"


def scored_model(paths) -> Path:
    """The model evaluate, export and package read: align's when it wrote one, else train's."""
    return paths.aligned if (paths.aligned / "config.json").is_file() else paths.model


def with_scored_model(params):
    """``params`` with ``paths.model`` pointing at ``scored_model``: the later stages' hook."""
    model = scored_model(params.paths)
    return params.model_copy(update={"paths": params.paths.model_copy(update={"model": model})})
