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

import logging
import math
import re
import shutil
import statistics
import tempfile
import time
import warnings
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path

import numpy as np

from stages.common import PICKLED, UserError, read_json, run_main, write_json
from stages.params import EXPORT_METRICS, Params, Tolerance, load_params

MANIFEST = "export.json"  # in paths.export
FILES = {"onnx": "model.onnx", "onnx_int8": "model.int8.onnx"}
WEIGHTS = ("*.safetensors", "*.safetensors.index.json", *PICKLED)  # never copied into the export
LATENCY_BATCHES = (1, 32)
EVAL_MATCH = 1e-4  # export's PyTorch score vs evaluate's: the same rows and model give the same value
EXTERNAL_DATA_BYTES = 1_500_000_000  # protobuf caps a file at 2 GB: bigger weights go beside it


def logits_only(model, causal: bool):
    """The exported module: positional int64 inputs -> logits tensor (no cache, loss or dict)."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            extra = {"use_cache": False} if causal else {}
            if token_type_ids is not None:
                extra["token_type_ids"] = token_type_ids
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits

    return LogitsOnly().eval()


class Classification:
    """Logits (N, C) of the test rows, padded and batched as evaluate does; accuracy and f1_macro."""

    def __init__(self, params: Params) -> None:
        from stages import evaluate

        model, self.tokenizer = evaluate.load_model(params.paths.model)
        self.model = model.cpu()
        self.rows, data_labels = evaluate.load_test_split(params.paths.processed)
        self.labels = evaluate.model_labels(model.config, data_labels, params.paths.model)
        self.refs = np.array([r["labels"] for r in self.rows])
        typed = "token_type_ids" in self.tokenizer.model_input_names
        self.inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if typed else [])
        self.batch_size = params.export.batch_size
        self.manifest = {"max_length": params.prepare.max_length}

    def complete(self, batch) -> dict[str, np.ndarray]:
        """The graph's inputs from a padded batch; a missing token_type_ids is zeros, as BERT does."""
        ids = np.asarray(batch["input_ids"], dtype=np.int64)
        return {k: np.asarray(batch[k], dtype=np.int64) if k in batch else np.zeros_like(ids)
                for k in self.inputs}

    def feed(self, rows: list[dict]) -> dict[str, np.ndarray]:
        keys = [k for k in self.tokenizer.model_input_names if k in rows[0]]
        return self.complete(self.tokenizer.pad([{k: r[k] for k in keys} for r in rows],
                                                return_tensors="np"))

    def score(self, forward=None) -> tuple[dict, np.ndarray]:
        """Metrics and logits (N, C); forward None: the PyTorch model through evaluate's own code."""
        from stages import evaluate

        if forward is None:
            logits = evaluate.predict_logits(self.model, self.tokenizer, self.rows, self.batch_size)
        else:
            logits = evaluate.batched_logits(lambda b: forward(self.complete(b)), self.tokenizer,
                                             self.rows, self.batch_size, len(self.labels), "np")
        scores = evaluate.compute_metrics(logits.argmax(axis=1), self.refs, self.labels)
        return {k: scores[k] for k in EXPORT_METRICS["classification"]}, logits

    @staticmethod
    def compare(ref: np.ndarray, out: np.ndarray) -> dict:
        return {"agreement": float((ref.argmax(axis=1) == out.argmax(axis=1)).mean()),
                "max_abs_logit_diff": float(np.abs(out - ref).max())}


class CausalLm:
    """Per-row NLL of the test rows (prompt tokens of pairs masked, as evaluate_lm); perplexity.

    The logit difference is taken on the first ``export.batch_size`` rows (real tokens only): the
    logits of every row, (N, T, vocab), are too big to keep for a comparison.
    """

    def __init__(self, params: Params) -> None:
        from stages import evaluate_lm

        model, self.tokenizer, meta = evaluate_lm.load_causal_lm(params.paths.model)
        self.model = model.cpu()
        self.rows = evaluate_lm.load_test_rows(params.paths.processed, meta["format"] == "pairs")
        self.inputs = ["input_ids", "attention_mask"]
        self.batch_size = params.export.batch_size
        self.manifest = {}

    def feed(self, rows: list[dict]) -> dict[str, np.ndarray]:
        from stages.evaluate_lm import pad_right

        batch = pad_right(rows, self.tokenizer.pad_token_id)
        return {k: batch[k].numpy() for k in self.inputs}

    def score(self, forward=None) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
        """Perplexity, and the logits (B, T, V) and mask (B, T) of the first batch."""
        import torch

        from stages import evaluate_lm
        from stages.metrics import load_metric

        pad = self.tokenizer.pad_token_id
        if forward is None:
            nll, tokens = evaluate_lm.sequence_nll(self.model, self.rows, self.batch_size, pad)
            forward = torch_forward(logits_only(self.model, causal=True), self.inputs)
        else:
            nll, tokens = evaluate_lm.rows_nll(
                lambda ids, mask: torch.from_numpy(forward({"input_ids": ids.numpy(),
                                                            "attention_mask": mask.numpy()})),
                self.rows, self.batch_size, pad)
        ppl = load_metric("perplexity").compute(nll=nll.tolist(), tokens=tokens.tolist())
        first = self.feed(self.rows[: self.batch_size])
        return {"perplexity": ppl["perplexity"]}, (forward(first), first["attention_mask"])

    @staticmethod
    def compare(ref: tuple, out: tuple) -> dict:
        real = ref[1].astype(bool)  # padding positions are whatever the graph makes of them
        return {"max_abs_logit_diff": float(np.abs(out[0] - ref[0])[real].max())}


def torch_forward(module, inputs: list[str]):
    """feed (name -> int64 array) -> logits array, through the PyTorch module."""
    import torch

    def forward(feed: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return module(*(torch.from_numpy(feed[k]) for k in inputs)).float().numpy()

    return forward


def ort_forward(path: Path):
    """feed -> logits, through an onnxruntime CPU session of the exported file."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its graph-fusion notes are not the user's business
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda feed: session.run(["logits"], feed)[0]


@contextmanager
def quiet():
    """The exporter and quantizer log warnings that name nothing the user can act on."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def export_onnx(module, example: dict[str, np.ndarray], path: Path, opset: int, big: bool) -> None:
    """torch.onnx (dynamo) export with batch and sequence dynamic on every input."""
    import torch

    axes = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
    args = tuple(torch.from_numpy(v) for v in example.values())
    try:
        with quiet():
            torch.onnx.export(module, args, str(path), input_names=list(example),
                              output_names=["logits"], opset_version=opset, dynamo=True, verbose=False,
                              external_data=big, dynamic_shapes=tuple(axes for _ in args))
    except Exception as err:  # an op without an ONNX translation, a shape the tracer cannot follow
        cause = err.__cause__ or err  # torch.onnx wraps the tracer's error in three steps of advice
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(cause).strip().split("\n")[0])[:400]
        raise UserError(f"torch.onnx.export of the model failed ({type(cause).__name__}: {first}); "
                        "set export.enabled: false to skip this stage") from None


def quantize(src: Path, dst: Path, big: bool) -> None:
    """Dynamic int8: weights stored int8, activations quantized on the fly (no calibration data)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8,
                         use_external_data_format=big)


def size_mb(folder: Path, pattern: str) -> float:
    """Megabytes (10^6 bytes) of the files matching pattern (an ONNX file and its external data)."""
    return sum(f.stat().st_size for f in folder.glob(pattern) if f.is_file()) / 1e6


def median_ms(forward, feed: dict[str, np.ndarray], repeats: int) -> float:
    forward(feed)  # warm-up: the first call allocates buffers and picks kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward(feed)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def latencies(task, forward, repeats: int) -> dict[str, float]:
    """Median ms per call on the first test rows (cycled when the split is smaller than a batch)."""
    rows = task.rows
    return {f"latency_ms_batch{n}": median_ms(forward, task.feed([rows[i % len(rows)]
                                                                 for i in range(n)]), repeats)
            for n in LATENCY_BATCHES}


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
    from stages.compare import judge, tolerance_text

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


def rounded(entry: dict) -> dict:
    """Readable figures: metrics to 6 decimals, sizes and times to 3, a logit gap to 3 digits."""
    out = {}
    for key, value in entry.items():
        if isinstance(value, dict):
            out[key] = rounded(value)
        elif key == "max_abs_logit_diff":
            out[key] = float(f"{value:.3g}")
        elif isinstance(value, float):
            out[key] = round(value, 3 if key.startswith(("size_", "latency_")) else 6)
        else:
            out[key] = value
    return out


def build(params: Params, task, staging: Path) -> dict:
    """Score PyTorch, export (and quantize) into staging, score each ONNX model: the report."""
    cfg, paths = params.export, params.paths
    ref_scores, ref_out = task.score()
    check_against_eval(ref_scores, paths.eval_metrics)
    module = logits_only(task.model, causal=params.task == "causal_lm")
    weights = sum(f.stat().st_size for f in paths.model.glob("*.safetensors"))
    big = weights > EXTERNAL_DATA_BYTES
    # The two longest rows: an axis of size 1 in the example would be traced as a constant.
    example = task.feed(sorted(task.rows * 2, key=lambda r: len(r["input_ids"]))[-2:])
    export_onnx(module, example, staging / FILES["onnx"], cfg.opset, big)
    if cfg.quantize:
        quantize(staging / FILES["onnx"], staging / FILES["onnx_int8"], big)
    report = {"enabled": True, "task": params.task, "rows": len(task.rows), "passed": True,
              "failures": [],
              "torch": {**ref_scores, "size_mb": weights / 1e6,
                        **latencies(task, torch_forward(module, task.inputs), cfg.latency_repeats)}}
    for runtime, name in FILES.items():
        if (staging / name).exists():
            forward = ort_forward(staging / name)
            scores, out = task.score(forward)
            report[runtime] = {
                **scores, "size_mb": size_mb(staging, f"{name}*"),
                **latencies(task, forward, cfg.latency_repeats),
                "delta": {k: v - ref_scores[k] for k, v in scores.items()},
                **task.compare(ref_out, out)}
    report = rounded(report)
    report["failures"] = judge_drops(report, params.export_tolerances(), paths.export)
    report["passed"] = not report["failures"]
    fill_folder(params, task, staging)
    return report


def fill_folder(params: Params, task, folder: Path) -> None:
    """export.json and the model folder's other files: the folder alone is enough to serve."""
    for f in sorted(params.paths.model.iterdir()):
        if f.is_file() and not any(fnmatch(f.name, w) for w in WEIGHTS):
            shutil.copy2(f, folder / f.name)
    files = {k: v for k, v in FILES.items() if (folder / v).exists()}
    write_json(folder / MANIFEST, {"enabled": True, "task": params.task, "opset": params.export.opset,
                                   "inputs": task.inputs, "output": "logits", "files": files,
                                   **task.manifest})


def staging_for(target: Path) -> Path:
    """An empty folder beside target (same file system, so the final swap is a rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.new-"))
    staging.chmod(0o755)  # mkdtemp makes 0700; the service may run as another user
    return staging


def swap_in(staging: Path, target: Path) -> None:
    """Replace target by staging; the old folder goes only once the new one is in place."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        target.rename(old / target.name)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old)


def write_disabled(paths) -> dict:
    """export.enabled false: both DVC outputs still exist, saying the stage is off."""
    staging = staging_for(paths.export)
    write_json(staging / MANIFEST, {"enabled": False, "reason": "export.enabled is false in params"})
    swap_in(staging, paths.export)
    write_json(paths.export_report, {"enabled": False})
    print(f"export: off (export.enabled false) -> {paths.export_report}")
    return {"enabled": False}


def require_inputs(paths) -> None:
    """Name the missing input and the stage that makes it, before any slow import."""
    if not (paths.model / "config.json").is_file():
        raise UserError(f"{paths.model}: no trained model there (no config.json): run `dvc repro train`")
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
    keys = [k for k in (*EXPORT_METRICS[report["task"]], *COLUMNS)
            if any(k in report[name] for name in runtimes)]
    cells = [["runtime", *(COLUMNS.get(k, k) for k in keys)]]
    cells += [[name, *(f"{report[name][k]:.6g}" if k in report[name] else "-" for k in keys)]
              for name in runtimes]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


def main(params: Params | None = None) -> dict:
    """Export, score and judge (or record that export is off); returns the report."""
    params = params or load_params()
    paths = params.paths
    if not params.export.enabled:
        return write_disabled(paths)
    require_inputs(paths)
    start = time.perf_counter()
    task = Classification(params) if params.task == "classification" else CausalLm(params)
    staging = staging_for(paths.export)
    try:
        report = build(params, task, staging)
        write_json(paths.export_report, report)
        if report["passed"]:  # a failed export never replaces a good one
            swap_in(staging, paths.export)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
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
