"""ONNX for stage export: the logits-only module that is exported, the exporter and dynamic int8
quantizer, the two runners (PyTorch, onnxruntime) behind one ``forward(feed) -> logits``, and the
figures of the report (size, latency, readable rounding). Task-free: the task scorers
(lmforge/<task>/evaluate.py ``ExportScorer``) feed these.
"""

from __future__ import annotations

import logging
import re
import statistics
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from lmforge.common import UserError

LATENCY_BATCHES = (1, 32)
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


def readable(entry: dict) -> dict:
    """Readable figures: metrics to 6 decimals, sizes and times to 3, a logit gap to 3 digits."""
    out = {}
    for key, value in entry.items():
        if isinstance(value, dict):
            out[key] = readable(value)
        elif key == "max_abs_logit_diff":
            out[key] = float(f"{value:.3g}")
        elif isinstance(value, float):
            out[key] = round(value, 3 if key.startswith(("size_", "latency_")) else 6)
        else:
            out[key] = value
    return out
