"""Our `evaluate` metrics, loaded from this folder so no metric ever comes from the Hugging Face hub.

    from lmforge.metrics import load_metric
    load_metric("f1").compute(predictions=[0, 1], references=[0, 0], average="macro")

Each metric is ``<name>/<name>.py`` here, the layout ``evaluate.load`` accepts for a local script
(``evaluate.load("accuracy")`` would download the hub's copy, and fails offline). A new metric is a
new folder; nothing to register.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.common import UserError

METRICS_DIR = Path(__file__).resolve().parent


def available() -> list[str]:
    """Names of the metrics in this folder."""
    return sorted(p.parent.name for p in METRICS_DIR.glob("*/*.py") if p.stem == p.parent.name)


def load_metric(name: str, **kwargs):
    """``evaluate.load`` of the local metric ``name``; kwargs go to ``evaluate.load`` (config_name).

    Predictions are kept in memory: the default would write an Arrow file per compute under
    ~/.cache/huggingface/metrics. `evaluate` still copies the script into its modules cache
    (~/.cache/huggingface/modules) to import it, and creates an empty folder per metric name in
    the metrics cache.
    """
    import evaluate

    script = METRICS_DIR / name / f"{name}.py"
    if not script.is_file():
        raise UserError(f"metric '{name}': no script {script} (local metrics: {available()})")
    return evaluate.load(str(script), keep_in_memory=True, **kwargs)
