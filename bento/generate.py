"""The packaged causal LM as an HTTP service: POST /generate, POST /generate_stream, POST /metadata.

    bentoml serve bento.generate:Generator               # from the repo root: newest lmforge-lm model
    bentoml serve bento.generate:Generator --arg model=<package.model_name>:<version>
    bentoml serve lmforge-service:<version>              # a built Bento (tag in models/bento.json)

Like bento/service.py: binds 127.0.0.1 unless told otherwise (``--host``), requires API keys when
serve.api_key_env names their variable (and refuses a non-loopback host without them unless
serve.allow_anonymous; bento/auth.py), refuses bodies over the largest valid request with 413
before parsing, and reads its limits, the prompt template and the context length from the model's
metadata (stages/package.py), because a Bento has no params.yaml.

A prompt is formatted as in training (pairs: inside ``prepare.template``), tokenized without special
tokens and cut from the left so that prompt + ``max_new_tokens`` fit the model's context. The
prompts of one request are generated together in one left-padded batch; each answer holds only the
new text. ``temperature`` 0 is greedy decoding: the same prompt gives the same text every time.
"""

import threading
from collections.abc import Generator as Stream
from typing import Annotated, Literal

import bentoml
from bentoml.exceptions import InvalidArgument
from pydantic import BaseModel, ConfigDict, Field

from bento.auth import ApiKeyGuard, check_startup, check_worker, deploy_host
from bento.limits import RequestGuard, max_body_bytes, traffic
from bento.prompts import fit_context, format_prompt, left_pad, stop_id_set, until_stop


class Args(BaseModel):
    """Bento arguments (`--arg key=value`); stages/package.py stores the exact model tag."""

    model: str = "lmforge-lm:latest"  # params.package.model_name; pinned by package


ARGS = bentoml.use_arguments(Args)
MODEL = bentoml.models.BentoModel(ARGS.model)
if MODEL.stored is None:
    raise RuntimeError(
        f"model {ARGS.model} is not in the BentoML store ($BENTOML_HOME): run `dvc repro package`"
    )
INFO = MODEL.stored.info.metadata
if INFO.get("task") != "causal_lm":
    raise RuntimeError(f"model {ARGS.model} is a {INFO.get('task', 'classification')} model: "
                       "serve it with bento.service:Classifier")
LIMITS = INFO["serve"]
# At least one prompt token must fit next to the new ones: a cap at the context would leave none.
MAX_NEW_TOKENS = min(LIMITS["max_new_tokens"], INFO["context"] - 1)
TIMEOUT_S = LIMITS.get("timeout_s", 120)  # serve.timeout_s: also bounds a stream's silences
EXAMPLE = "Once upon a time"

Prompt = Annotated[str, Field(max_length=LIMITS["max_chars"])]


class Options(BaseModel):
    """Decoding options shared by both endpoints. Types are strict ("5" is not 5); unknown keys
    are refused: a misspelled option must not pass silently."""

    model_config = ConfigDict(extra="forbid", strict=True)
    max_new_tokens: int = Field(min(64, MAX_NEW_TOKENS), ge=1, le=MAX_NEW_TOKENS,
                                description="Most tokens generated per prompt.")
    temperature: float = Field(0.0, ge=0, le=2, description="0: greedy, the same text every "
                               "time; above 0: sampling, more random as it grows.")
    top_p: float = Field(1.0, gt=0, le=1, description="Sampling: draw only from the most probable "
                         "tokens that together hold this probability.")


class GenerateRequest(Options):
    """Body of POST /generate."""

    model_config = ConfigDict(json_schema_extra={"example": {
        "prompts": [EXAMPLE], "max_new_tokens": min(32, MAX_NEW_TOKENS), "temperature": 0.0}})

    prompts: Annotated[list[Prompt], Field(min_length=1, max_length=LIMITS["max_texts"])]


class StreamRequest(Options):
    """Body of POST /generate_stream."""

    model_config = ConfigDict(json_schema_extra={"example": {
        "prompt": EXAMPLE, "max_new_tokens": min(32, MAX_NEW_TOKENS), "temperature": 0.7}})

    prompt: Prompt


class NoInput(BaseModel):
    """Body of POST /metadata: none (an empty object)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {}})


class Generation(BaseModel):
    text: str = Field(description="The generated continuation only, without the prompt.")
    tokens: int = Field(description="Tokens generated (the stopping EOS included).")
    finish_reason: Literal["eos", "length"] = Field(
        description="eos: the model ended the text; length: max_new_tokens ran out.")


# http.host: bind only the loopback interface unless the user passes --host / BENTOML_HOST.
@bentoml.service(workers=LIMITS.get("workers", 1), traffic=traffic({**LIMITS, "timeout_s": TIMEOUT_S}),
                 http={"host": "127.0.0.1"})
class Generator:
    bento_model = MODEL  # a class attribute, so `bentoml build` puts the model into the Bento

    @bentoml.on_deployment
    def refuse_unsafe_start() -> None:
        """As the classifier's: in `bentoml serve`'s process, before it binds (bento/auth.py)."""
        check_startup(LIMITS, deploy_host())

    def __init__(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        check_worker(LIMITS)
        if LIMITS.get("threads"):
            torch.set_num_threads(LIMITS["threads"])
        path = self.bento_model.path
        # Our own train output: plain data, never code, never pickle.
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        self.model = AutoModelForCausalLM.from_pretrained(
            path, use_safetensors=True, trust_remote_code=False)
        self.model.eval()
        tok = self.tokenizer
        self.stop_ids = stop_id_set(self.model.generation_config.eos_token_id, tok.eos_token_id)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.start_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def encode(self, prompts: list[str], max_new_tokens: int) -> dict:
        """One left-padded batch of the formatted prompts, each cut from the left to leave
        max_new_tokens room (serve.truncate true) or refused with 400 when over it (false)."""
        import torch

        template = INFO["template"] if INFO["format"] == "pairs" else None
        texts = [format_prompt(p, template) for p in prompts]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        budget = INFO["context"] - max_new_tokens
        over = [(i, len(r)) for i, r in enumerate(ids) if len(r) > budget]
        if over and not LIMITS.get("truncate", True):
            listed = ", ".join(f"prompt {i} has {n}" for i, n in over[:5])
            raise InvalidArgument(f"{listed} tokens; with max_new_tokens {max_new_tokens} the "
                                  f"context ({INFO['context']}) leaves {budget} (serve.truncate "
                                  "is false)")
        rows, mask = left_pad([fit_context(r, budget, self.start_id) for r in ids], self.pad_id)
        return {"input_ids": torch.tensor(rows), "attention_mask": torch.tensor(mask)}  # (B, T)

    def decoding(self, max_new_tokens: int, temperature: float, top_p: float) -> dict:
        """generate() keywords; they override the model's generation_config, which could otherwise
        add its own sampling filters (top_k) to what the request asked for."""
        sample = temperature > 0
        sampling = {"temperature": temperature, "top_p": top_p, "top_k": 0} if sample else {}
        return {"max_new_tokens": max_new_tokens, "do_sample": sample, **sampling,
                "eos_token_id": sorted(self.stop_ids), "pad_token_id": self.pad_id}

    @bentoml.api(input_spec=GenerateRequest)
    def generate(self, prompts: list[str], max_new_tokens: int, temperature: float,
                 top_p: float) -> list[Generation]:
        """Continue each prompt; answers come in the order of `prompts`."""
        import torch

        batch = self.encode(prompts, max_new_tokens)
        with torch.inference_mode():
            out = self.model.generate(**batch, **self.decoding(max_new_tokens, temperature, top_p))
        answers = []
        for row in out[:, batch["input_ids"].shape[1]:].tolist():  # (B, new) after the prompts
            ids, stopped = until_stop(row, self.stop_ids)
            answers.append(Generation(
                text=self.tokenizer.decode(ids, skip_special_tokens=True), tokens=len(ids),
                finish_reason="eos" if stopped else "length"))
        return answers

    @bentoml.api(input_spec=StreamRequest)
    def generate_stream(self, prompt: str, max_new_tokens: int, temperature: float,
                        top_p: float) -> Stream[str, None, None]:
        """Continue one prompt, sending the new text in chunks as it is generated."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, timeout=TIMEOUT_S,
                                        skip_special_tokens=True)
        kwargs = {**self.encode([prompt], max_new_tokens),
                  **self.decoding(max_new_tokens, temperature, top_p), "streamer": streamer}
        failed: list[BaseException] = []
        worker = threading.Thread(target=self._generate_into, args=(kwargs, failed), daemon=True)
        worker.start()
        yield from (chunk for chunk in streamer if chunk)
        worker.join()
        if failed:
            raise failed[0]

    def _generate_into(self, kwargs: dict, failed: list) -> None:
        """generate() feeding a streamer, in a thread; a failure ends the stream instead of
        leaving its reader waiting."""
        import torch

        try:
            with torch.inference_mode():
                self.model.generate(**kwargs)
        except Exception as err:
            failed.append(err)
            kwargs["streamer"].end()

    @bentoml.api(route="/metadata", input_spec=NoInput)
    def metadata(self) -> dict:
        """The model tag, its prompt format, lineage labels and serving limits."""
        stored = self.bento_model
        return {"model_tag": str(stored.tag), "task": INFO["task"], "format": INFO["format"],
                "template": INFO["template"], "context": INFO["context"],
                "lineage": dict(stored.info.labels),
                "limits": {**LIMITS, "max_new_tokens": MAX_NEW_TOKENS}}


# As the classifier's: the key check outermost, then the body bound (max_texts prompts of
# max_chars, plus a few small options).
Generator.add_asgi_middleware(ApiKeyGuard, key_env=LIMITS.get("api_key_env"))
Generator.add_asgi_middleware(RequestGuard, max_bytes=max_body_bytes(LIMITS))
# As in bento/service.py: name the list response's media type once instead of BentoML deriving it
# from a freshly built JSON schema on every response.
Generator.apis["generate"].output_spec.media_type = "application/json"
