"""The baseline bench_serve.py compares BentoML with: the FastAPI app users write by hand.

    python -m benchmarks.naive_app [--model models/model] [--port 8000]   # NAIVE_MODEL sets the default

A ``transformers`` text-classification pipeline loaded from a model folder, behind POST /classify
{"texts": [...]} -> the pipeline's [{"label", "score"}], served by uvicorn on 127.0.0.1. Deliberately
plain: no batching across requests, no input limits, no workers. It is ready when GET /openapi.json
answers (uvicorn only listens once the model is loaded).
"""

from __future__ import annotations

import argparse
import os

from fastapi import FastAPI
from pydantic import BaseModel


class ClassifyRequest(BaseModel):
    texts: list[str]


def create_app(model_dir: str) -> FastAPI:
    from transformers import pipeline

    classifier = pipeline("text-classification", model=model_dir, tokenizer=model_dir, device=-1)
    app = FastAPI(title="naive classifier")

    # One request at a time: an `async def` endpoint that calls the pipeline directly blocks the event
    # loop for the whole forward pass, so requests queue and run one after another (the usual naive
    # pattern). A plain `def` endpoint would instead run overlapping forward passes in threads, which
    # fight over the same cores.
    @app.post("/classify")
    async def classify(req: ClassifyRequest) -> list[dict]:
        return classifier(req.texts, truncation=True)

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("NAIVE_MODEL", "models/model"),
                        help="model folder (train's output); default $NAIVE_MODEL or models/model")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    uvicorn.run(create_app(args.model), host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
