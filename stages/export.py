"""Stage export: the trained model as ONNX (fp32, and dynamic int8) for edge devices, scored against
the PyTorch model on the test split.

    python -m stages.export        # normally via `dvc repro export`; reads task, paths, prepare, export

Writes ``paths.export`` (model.onnx, model.int8.onnx, every non-weight file of ``paths.model``,
export.json: what a server needs to run the graph) and ``paths.export_report`` (per runtime: the
metrics evaluate reports, size on disk, median latency at batch 1 and 32; per ONNX model: deltas
against PyTorch, prediction agreement, largest logit difference). Everything runs on the CPU, where
an edge model runs. A metric that drops beyond ``export.tolerances`` fails the stage after the report
is written, and the previous export stays in place. The graph is input_ids + attention_mask
(+ token_type_ids) -> logits: classification (batch, labels); causal_lm (batch, seq, vocab), without
KV cache, so it is scored by perplexity and not used for generation.
"""

from __future__ import annotations

import math
import shutil
import time
from fnmatch import fnmatch
from pathlib import Path

from lmforge.alignment import with_scored_model
from lmforge.common import UserError, read_json, run_main, write_aside, write_json
from lmforge.compare import judge, tolerance_text
from lmforge.models import PICKLED, require_trained
from lmforge.onnx import (
    EXTERNAL_DATA_BYTES,
    export_onnx,
    latencies,
    logits_only,
    ort_forward,
    quantize,
    readable,
    size_mb,
    torch_forward,
)
from lmforge.params import Params, Tolerance, load_params
from lmforge.tasks import CAUSAL_LM, task

MANIFEST = "export.json"  # in paths.export
FILES = {"onnx": "model.onnx", "onnx_int8": "model.int8.onnx"}
WEIGHTS = ("*.safetensors", "*.safetensors.index.json", *PICKLED)  # never copied into the export
EVAL_MATCH = 1e-4  # export's PyTorch score vs evaluate's: the same rows and model give the same value


def check_against_eval(scores: dict, eval_file: Path) -> None:
    """export's PyTorch scores must be evaluate's: else the rows or the model changed since."""
    saved = read_json(eval_file, "run `dvc repro evaluate` first")
    for key, value in scores.items():
        if not (isinstance(saved.get(key), int | float)
                and math.isclose(value, saved[key], rel_tol=EVAL_MATCH, abs_tol=EVAL_MATCH)):
            raise UserError(
                f"{key}: the PyTorch model scores {value:.6g} on the test split here, {eval_file} "
                f"says {saved.get(key)}: the test split or the model changed since evaluate; "
                "run `dvc repro evaluate` (or `dvc repro export`, which runs it first)")


def judge_drops(report: dict, tolerances: dict[str, Tolerance], folder: Path) -> list[str]:
    """One message per ONNX model and metric worse than PyTorch beyond its tolerance (as compare)."""

    failures = []
    for runtime in (name for name in FILES if name in report):
        for metric, tol in tolerances.items():
            old, new = report["torch"][metric], report[runtime][metric]
            if judge(old, new, tol) == "regressed":
                failures.append(
                    f"{runtime} ({folder / FILES[runtime]}): {metric} {old:.6g} -> {new:.6g} "
                    f"({new - old:+.4g}) is beyond the tolerance {tolerance_text(tol, old)} "
                    f"(export.tolerances.{metric})")
    return failures


def say(what: str) -> None:
    """A phase line, flushed: a log file (DVC, CI, a queue worker) shows where export is."""
    print(f"export: {what}", flush=True)


def build(params: Params, scorer, staging: Path) -> dict:
    """Score PyTorch, export (and quantize) into staging, score each ONNX model: the report."""
    cfg, paths = params.export, params.paths
    say(f"scoring the PyTorch model on {len(scorer.rows)} test rows")
    ref_scores, ref_out = scorer.score()
    check_against_eval(ref_scores, paths.eval_metrics)
    module = logits_only(scorer.model, causal=params.task == CAUSAL_LM)
    weights = sum(f.stat().st_size for f in paths.model.glob("*.safetensors"))
    big = weights > EXTERNAL_DATA_BYTES
    # The two longest rows: an axis of size 1 in the example would be traced as a constant.
    example = scorer.feed(sorted(scorer.rows * 2, key=lambda r: len(r["input_ids"]))[-2:])
    say(f"exporting {FILES['onnx']} (opset {cfg.opset})")
    export_onnx(module, example, staging / FILES["onnx"], cfg.opset, big)
    if cfg.quantize:
        say(f"quantizing to {FILES['onnx_int8']}")
        quantize(staging / FILES["onnx"], staging / FILES["onnx_int8"], big)
    report = {"enabled": True, "task": params.task, "rows": len(scorer.rows), "passed": True,
              "failures": [],
              "torch": {**ref_scores, "size_mb": weights / 1e6,
                        **latencies(scorer, torch_forward(module, scorer.inputs), cfg.latency_repeats)}}
    for runtime, name in FILES.items():
        if (staging / name).exists():
            say(f"scoring {name} with onnxruntime")
            forward = ort_forward(staging / name)
            scores, out = scorer.score(forward)
            report[runtime] = {
                **scores, "size_mb": size_mb(staging, f"{name}*"),
                **latencies(scorer, forward, cfg.latency_repeats),
                "delta": {k: v - ref_scores[k] for k, v in scores.items()},
                **scorer.compare(ref_out, out)}
    report = readable(report)
    report["failures"] = judge_drops(report, params.export_tolerances(), paths.export)
    report["passed"] = not report["failures"]
    fill_folder(params, scorer, staging)
    return report


def fill_folder(params: Params, scorer, folder: Path) -> None:
    """export.json and the model folder's other files: the folder alone is enough to serve."""
    for f in sorted(params.paths.model.iterdir()):
        if f.is_file() and not any(fnmatch(f.name, w) for w in WEIGHTS):
            shutil.copy2(f, folder / f.name)
    files = {k: v for k, v in FILES.items() if (folder / v).exists()}
    write_json(folder / MANIFEST, {"enabled": True, "task": params.task, "opset": params.export.opset,
                                   "inputs": scorer.inputs, "output": "logits", "files": files,
                                   **scorer.manifest})


def write_disabled(paths) -> dict:
    """export.enabled false: both DVC outputs still exist, saying the stage is off."""
    with write_aside(paths.export, paths.export_report) as (folder, report):
        folder.mkdir()
        write_json(folder / MANIFEST, {"enabled": False, "reason": "export.enabled is false in params"})
        write_json(report, {"enabled": False})
    print(f"export: off (export.enabled false) -> {paths.export_report}")
    return {"enabled": False}


def require_inputs(paths) -> None:
    """Name the missing input and the stage that makes it, before any slow import."""
    require_trained(paths.model)
    if not (paths.processed / "datasets" / "test").is_dir():
        raise UserError(f"{paths.processed / 'datasets' / 'test'}: no processed test split: run "
                        "`dvc repro prepare`")
    if not paths.eval_metrics.is_file():
        raise UserError(f"{paths.eval_metrics} not found: run `dvc repro evaluate` first")


COLUMNS = {"size_mb": "MB", "latency_ms_batch1": "ms b1", "latency_ms_batch32": "ms b32",
           "agreement": "agreement", "max_abs_logit_diff": "max logit diff"}


def table(report: dict) -> str:
    """The stdout summary: one line per runtime."""
    runtimes = [name for name in ("torch", *FILES) if name in report]
    keys = [k for k in (*task(report["task"]).export_metrics, *COLUMNS)
            if any(k in report[name] for name in runtimes)]
    cells = [["runtime", *(COLUMNS.get(k, k) for k in keys)]]
    cells += [[name, *(f"{report[name][k]:.6g}" if k in report[name] else "-" for k in keys)]
              for name in runtimes]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


def main(params: Params | None = None) -> dict:
    """Export, score and judge (or record that export is off); returns the report."""
    params = with_scored_model(params or load_params())  # align's model, when it wrote one
    paths = params.paths
    if not params.export.enabled:
        return write_disabled(paths)
    require_inputs(paths)
    start = time.perf_counter()
    if params.task == CAUSAL_LM:
        from lmforge.causal_lm.export import ExportScorer
    else:
        from lmforge.classification.export import ExportScorer
    say("loading the model and the test split")
    scorer = ExportScorer(params)
    # Written aside, swapped in together. Beyond tolerance, the report (the verdict) still lands
    # but the export folder does not: a failed export never replaces a good one.
    with write_aside(paths.export, paths.export_report) as (folder, report_file):
        folder.mkdir()
        report = build(params, scorer, folder)
        if not report["passed"]:
            shutil.rmtree(folder)
        write_json(report_file, report)
    print(f"export: {params.task}, {report['rows']} test rows, {time.perf_counter() - start:.1f} s "
          f"-> {paths.export}, {paths.export_report}")
    print(table(report))
    if not report["passed"]:
        raise UserError(f"export: {len(report['failures'])} drop(s) beyond export.tolerances "
                        f"(report: {paths.export_report}; {paths.export} left as it was):\n"
                        + "\n".join(f"  - {f}" for f in report["failures"]))
    return report


if __name__ == "__main__":
    run_main(main)
