"""The packaged classifier as an HTTP service: POST /classify, POST /metadata.

    bentoml serve bento.service:Classifier              # from the repo root: newest packaged model
    bentoml serve bento.service:Classifier --arg model=lmforge-classifier:<version>
    bentoml serve lmforge-service:<version>              # a built Bento (tag in models/bento.json)

The service binds 127.0.0.1 (its ``http.host``): only this machine can call it. ``--host 0.0.0.0``
(or ``BENTOML_HOST``) exposes it, and then it refuses to start without API keys
(serve.api_key_env) unless serve.allow_anonymous is true (bento/auth.py, docs/serving.md "API
keys"). Request bodies larger than the biggest valid request are refused with 413 before parsing.

Request limits, batching, workers, timeouts, the truncation length and the runtime come from the
model's metadata (written by stages/package.py from params.serve), because a Bento carries no
params.yaml. Runtime ``torch`` serves the trained weights; ``onnx`` / ``onnx_int8`` serve stage
export's graph under onnxruntime (the stored model is then export's folder: graph, tokenizer,
config). A text over the model's length is cut (serve.truncate) or refused with 400.

Adaptive batching (bento/batching.py): the texts of concurrent /classify requests share forward
passes of up to serve.max_batch_size texts; an idle model starts at once. /metrics (Prometheus)
has, besides BentoML's request figures, ``lmforge_batch_requests`` and ``lmforge_batch_texts``:
requests and texts per batch (which probabilities() may run as several length-sorted passes).
"""

from pathlib import Path
from typing import Annotated

import bentoml
import numpy as np
from bentoml.exceptions import InvalidArgument
from pydantic import BaseModel, ConfigDict, Field

from bento.apidocs import ApiDocs, describe
from bento.auth import ApiKeyGuard, check_startup, check_worker, deploy_host
from bento.batching import Batcher, length_chunks
from bento.limits import RequestGuard, log_client_errors_as_warnings, max_body_bytes, traffic


class Args(BaseModel):
    """Bento arguments (`--arg key=value`); stages/package.py stores the exact model tag."""

    model: str = "lmforge-classifier:latest"  # params.package.model_name; pinned by package


ARGS = bentoml.use_arguments(Args)
MODEL = bentoml.models.BentoModel(ARGS.model)
if MODEL.stored is None:
    raise RuntimeError(
        f"model {ARGS.model} is not in the BentoML store ($BENTOML_HOME): run `dvc repro package`"
    )
INFO = MODEL.stored.info.metadata
if INFO.get("task", "classification") != "classification":  # models packaged before tasks: none
    raise RuntimeError(f"model {ARGS.model} is a {INFO['task']} model: serve it with "
                       "bento.generate:Generator")
LIMITS = INFO["serve"]
EXAMPLE = ["the kettle boils fast and looks great", "it broke after two days"]

Text = Annotated[str, Field(max_length=LIMITS["max_chars"])]
Texts = Annotated[list[Text], Field(min_length=1, max_length=LIMITS["max_texts"])]


# The request models are bentoml.IODescriptor: BentoML names them as they are (in the OpenAPI
# document and its 400 errors), not ClassifyRequestIODescriptor.
class ClassifyRequest(bentoml.IODescriptor):
    """Body of POST /classify. Unknown keys are refused: a misspelled option must not pass silently."""

    model_config = ConfigDict(extra="forbid",
                              json_schema_extra={"example": {"texts": EXAMPLE, "all_scores": False}})
    texts: Texts
    all_scores: bool = Field(False, description="Also return every class's probability.")


class NoInput(bentoml.IODescriptor):
    """Body of POST /metadata: none (an empty object)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {}})


class Prediction(BaseModel):
    label: str = Field(description="The most probable class.")
    score: float = Field(description="Its probability.")
    scores: dict[str, float] | None = Field(None, description="Every class (with all_scores).")


def to_prediction(probs: list[float], labels: list[str], all_scores: bool) -> Prediction:
    best = max(range(len(probs)), key=probs.__getitem__)
    scores = dict(zip(labels, probs, strict=True)) if all_scores else None
    return Prediction(label=labels[best], score=probs[best], scores=scores)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class TorchForward:
    """The trained PyTorch weights (serve.runtime torch): logits of a tokenized batch."""

    tensors = "pt"  # what the tokenizer returns for this runtime

    def __init__(self, path: Path, threads: int | None) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification

        if threads:
            torch.set_num_threads(threads)
        # Our own train output: plain data, never code, never pickle.
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, use_safetensors=True, trust_remote_code=False)
        self.model.eval()

    def __call__(self, batch) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(**batch).logits.float().numpy()  # (B, num_labels)


class OnnxForward:
    """Stage export's ONNX graph (serve.runtime onnx / onnx_int8) under onnxruntime: no torch."""

    tensors = "np"

    def __init__(self, path: Path, threads: int | None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path / INFO["onnx_file"]), options,
                                            providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, batch) -> np.ndarray:
        feed = {name: batch[name].astype(np.int64) for name in self.inputs}
        return self.session.run(["logits"], feed)[0]


def batch_metrics():
    """on_batch for the Batcher: Prometheus histograms of requests and texts per batch.

    prometheus_client is imported here, in the worker, after BentoML has pointed it at the
    multiprocess store that /metrics reads (an import at module load would miss it).
    """
    from prometheus_client import Histogram

    buckets = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    requests = Histogram("lmforge_batch_requests", "Requests per batch", buckets=buckets)
    texts = Histogram("lmforge_batch_texts", "Texts per batch", buckets=buckets)

    def observe(n_requests: int, n_texts: int) -> None:
        requests.observe(n_requests)
        texts.observe(n_texts)

    return observe


# http.host: bind only the loopback interface unless the user passes --host / BENTOML_HOST.
@bentoml.service(workers=LIMITS.get("workers", 1), traffic=traffic(LIMITS),
                 http={"host": "127.0.0.1"})
class Classifier:
    bento_model = MODEL  # a class attribute, so `bentoml build` puts the model into the Bento

    @bentoml.on_deployment
    def refuse_unsafe_start() -> None:
        """In `bentoml serve`'s own process, before it binds: exit (with why) when the key variable
        is missing, or a non-loopback host would serve without keys (bento/auth.py)."""
        check_startup(LIMITS, deploy_host())

    def __init__(self) -> None:
        from transformers import AutoConfig, AutoTokenizer

        check_worker(LIMITS)  # the same refusals against the socket this worker really serves
        path = Path(self.bento_model.path)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        runtime = OnnxForward if INFO.get("runtime", "torch") != "torch" else TorchForward
        self.forward = runtime(path, LIMITS.get("threads"))
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        self.labels = [config.id2label[i] for i in range(config.num_labels)]
        self.batcher = Batcher(self.probabilities, LIMITS["max_batch_size"],
                               LIMITS["max_latency_ms"] / 1000, batch_metrics())

    @bentoml.api(input_spec=ClassifyRequest)
    async def classify(self, texts: list[str], all_scores: bool = False) -> list[Prediction]:
        """Classify each text; results come in the order of `texts`. A text over the model's
        length is cut to it (serve.truncate true) or refused with 400 (false)."""
        if not LIMITS.get("truncate", True):
            self.refuse_long(texts)
        probs = await self.batcher(texts)
        return [to_prediction(p, self.labels, all_scores) for p in probs]

    def refuse_long(self, texts: list[str]) -> None:
        lengths = [len(ids) for ids in self.tokenizer(texts)["input_ids"]]
        over = [(i, n) for i, n in enumerate(lengths) if n > INFO["max_length"]]
        if over:
            listed = ", ".join(f"texts[{i}] has {n}" for i, n in over[:5])
            raise InvalidArgument(f"{listed} tokens; this model reads at most {INFO['max_length']} "
                                  "(serve.truncate is false)")

    def probabilities(self, texts: list[str]) -> list[list[float]]:
        """Class probabilities (label id order) per text, in forward passes of texts of similar
        length (bento/batching.py length_chunks); runs in the batcher's thread."""
        encode = {"truncation": True, "max_length": INFO["max_length"]}
        lengths = [len(ids) for ids in self.tokenizer(texts, **encode)["input_ids"]]
        rows: list = [None] * len(texts)
        for chunk in length_chunks(lengths, LIMITS["max_batch_size"]):
            batch = self.tokenizer([texts[i] for i in chunk], padding=True,
                                   return_tensors=self.forward.tensors, **encode)
            for i, probs in zip(chunk, softmax(self.forward(batch)), strict=True):
                rows[i] = probs.tolist()
        return rows

    @bentoml.api(route="/metadata", input_spec=NoInput)
    def metadata(self) -> dict:
        """The model tag, its classes, runtime, lineage labels and serving limits."""
        return metadata_answer(self.labels)


def metadata_answer(labels: list[str]) -> dict:
    """The answer of POST /metadata: read from the stored model, none of it from the weights."""
    return {"model_tag": str(MODEL.tag), "labels": labels, "runtime": INFO.get("runtime", "torch"),
            "lineage": dict(MODEL.stored.info.labels), "limits": LIMITS}


def answer_examples() -> dict[str, object]:
    """The 200 examples of the API description: /metadata's real answer, and /classify's for the
    request example with this model's classes (the scores are illustrative)."""
    labels = INFO.get("labels") or ["<class>"]  # packaged before the labels were stored: none
    guesses = [(labels[-1], 0.93), (labels[0], 0.88)]
    return {"/classify": [{"label": label, "score": score, "scores": None}
                          for label, score in guesses[:len(EXAMPLE)]],
            "/metadata": metadata_answer(labels)}


# The key check first (the outer one): a caller without a key gets 401 before a byte is read.
Classifier.add_asgi_middleware(ApiKeyGuard, key_env=LIMITS.get("api_key_env"))
Classifier.add_asgi_middleware(RequestGuard, max_bytes=max_body_bytes(LIMITS))
# GET / and /docs.json: the API description, with real examples and every status (bento/apidocs.py).
Classifier.add_asgi_middleware(ApiDocs, title="lmforge classifier", spec=lambda: describe(
    Classifier, LIMITS, answer_examples()))
log_client_errors_as_warnings()  # a client's 400 is a WARNING line, not an ERROR with a traceback
# BentoML works out the response's media type from the output model's JSON schema, built anew for
# every response of an API returning a list (a root model): ~10% of the event loop's time per
# request in a profile at concurrency 1. Naming it once skips that.
Classifier.apis["classify"].output_spec.media_type = "application/json"
