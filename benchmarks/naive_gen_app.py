"""The baseline bench_generate.py compares the causal LM service with: the generation app users write
by hand around a ``transformers`` pipeline.

    python -m benchmarks.naive_gen_app --model <model folder> [--port 8001] [--threads 1]

POST /v1/completions {"prompt", "max_tokens", "stream": true} streams server-sent events in the
shape of OpenAI's (``choices[0].text``, then a last chunk with ``usage``), so the benchmark reads
both servers with one client. Each request runs the pipeline in a thread of its own with a
TextIteratorStreamer (the pattern of the transformers docs): concurrent requests decode side by
side, each its own forward pass per token, with no batching across requests. Greedy decoding.
Ready when GET /openapi.json answers (uvicorn listens once the model is loaded).
"""

from __future__ import annotations

import argparse
import json
import threading

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel


class CompletionRequest(BaseModel):
    prompt: str
    max_tokens: int = 16
    stream: bool = True


def create_app(model_dir: str) -> FastAPI:
    from transformers import TextIteratorStreamer, pipeline

    generator = pipeline("text-generation", model=model_dir, tokenizer=model_dir, device=-1)
    tokenizer = generator.tokenizer
    app = FastAPI(title="naive generator")

    @app.post("/v1/completions")
    def completions(req: CompletionRequest) -> StreamingResponse:
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        counted: list[int] = []

        def run() -> None:
            out = generator(req.prompt, max_new_tokens=req.max_tokens, do_sample=False,
                            streamer=streamer, return_tensors=True)
            counted.append(len(out[0]["generated_token_ids"]) - len(tokenizer(req.prompt)["input_ids"]))

        worker = threading.Thread(target=run, daemon=True)
        worker.start()

        def events():
            for text in streamer:
                if text:
                    yield f"data: {json.dumps({'choices': [{'text': text}]})}\n\n"
            worker.join()
            yield f"data: {json.dumps({'choices': [], 'usage': {'completion_tokens': counted[0]}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a causal LM folder")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    uvicorn.run(create_app(args.model), host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
