"""The packaged classifier as an HTTP service: POST /classify, POST /metadata.

    bentoml serve bento.service:Classifier              # from the repo root: newest packaged model
    bentoml serve bento.service:Classifier --arg model=lmforge-classifier:<version>
    bentoml serve lmforge-service:<version>              # a built Bento (tag in models/bento.json)

The service binds 127.0.0.1 (its ``http.host``): only this machine can call it. ``--host 0.0.0.0``
(or ``BENTOML_HOST``) exposes it; put authentication in front first (README, "Serving securely").
Request bodies larger than the biggest valid request are refused with 413 before parsing.

Request limits, batching settings and the truncation length come from the model's metadata (written
by stages/package.py from params.yaml), because a Bento carries no params.yaml.

Adaptive batching: BentoML merges concurrent calls of a ``batchable`` API by concatenating their one
input along its batch dimension. Requests here carry a list of texts plus an option, so the public
``classify`` validates the request and sends only the texts to ``predict_batch`` through the
service's own client (``self.to_async``): inside the server that client calls the app in-process
(no socket) through its HTTP route, where the batching dispatcher concatenates the texts of
concurrent requests (splitting at max_batch_size texts) into one forward pass and hands each
request its own rows back. A direct ``self.predict_batch.local(...)`` call would bypass batching.
``/predict_batch`` is thus reachable too; it enforces the same limits.
"""

from typing import Annotated

import bentoml
from pydantic import BaseModel, ConfigDict, Field

from bento.limits import BodyLimit, max_body_bytes


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

Text = Annotated[str, Field(max_length=LIMITS["max_chars"])]
Texts = Annotated[list[Text], Field(min_length=1, max_length=LIMITS["max_texts"])]


class ClassifyRequest(BaseModel):
    """Body of POST /classify. Unknown keys are refused: a misspelled option must not pass silently."""

    model_config = ConfigDict(extra="forbid")
    texts: Texts
    all_scores: bool = Field(False, description="Also return every class's probability.")


class Prediction(BaseModel):
    label: str = Field(description="The most probable class.")
    score: float = Field(description="Its probability.")
    scores: dict[str, float] | None = Field(None, description="Every class (with all_scores).")


def to_prediction(probs: list[float], labels: list[str], all_scores: bool) -> Prediction:
    best = max(range(len(probs)), key=probs.__getitem__)
    scores = dict(zip(labels, probs, strict=True)) if all_scores else None
    return Prediction(label=labels[best], score=probs[best], scores=scores)


# http.host: bind only the loopback interface unless the user passes --host / BENTOML_HOST.
@bentoml.service(traffic={"timeout": 30}, http={"host": "127.0.0.1"})
class Classifier:
    bento_model = MODEL  # a class attribute, so `bentoml build` puts the model into the Bento

    def __init__(self) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = self.bento_model.path
        # Our own train output: plain data, never code, never pickle.
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, use_safetensors=True, trust_remote_code=False)
        self.model.eval()
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]

    @bentoml.api(input_spec=ClassifyRequest)
    async def classify(self, texts: list[str], all_scores: bool = False) -> list[Prediction]:
        """Classify each text; results come in the order of `texts`."""
        probs = await self.to_async.predict_batch(texts=texts)
        return [to_prediction(p, self.labels, all_scores) for p in probs]

    @bentoml.api(
        batchable=True,
        max_batch_size=LIMITS["max_batch_size"],
        max_latency_ms=LIMITS["max_latency_ms"],
    )
    def predict_batch(self, texts: Texts) -> list[list[float]]:
        """Class probabilities (label id order) per text; concurrent calls share a forward pass."""
        import torch

        batch = self.tokenizer(
            texts, truncation=True, max_length=INFO["max_length"], padding=True,
            return_tensors="pt",
        )
        with torch.inference_mode():
            logits = self.model(**batch).logits  # (B, num_labels)
        return logits.softmax(dim=-1).tolist()

    @bentoml.api(route="/metadata")
    def metadata(self) -> dict:
        """The model tag, its classes, lineage labels and serving limits."""
        stored = self.bento_model
        return {"model_tag": str(stored.tag), "labels": self.labels,
                "lineage": dict(stored.info.labels), "limits": LIMITS}


Classifier.add_asgi_middleware(BodyLimit, max_bytes=max_body_bytes(LIMITS))
