"""The packaged causal LM as an HTTP service: POST /generate, POST /generate_stream, POST /metadata,
and the OpenAI-compatible API under /v1 (bento/openai_api.py: chat/completions, completions, models).

    bentoml serve bento.generate:Generator               # from the repo root: newest lmforge-lm model
    bentoml serve bento.generate:Generator --arg model=<package.model_name>:<version>
    bentoml serve lmforge-service:<version>              # a built Bento (tag in models/bento.json)

Like bento/service.py: binds 127.0.0.1 unless told otherwise (``--host``), requires API keys when
serve.api_key_env names their variable (and refuses a non-loopback host without them unless
serve.allow_anonymous; bento/auth.py), refuses bodies over the largest valid request with 413
before parsing, and reads its limits, the prompt template and the context length from the model's
metadata (stages/package.py), because a Bento has no params.yaml.

A prompt is formatted as in training (pairs: inside ``prepare.template``; conversations: as one
user message in the chat template), tokenized without special tokens and cut from the left so that
prompt + ``max_new_tokens`` fit the model's context. Each answer holds only the new text.
``temperature`` 0 is greedy decoding: the same prompt gives the same text every time.

Every generation, of every endpoint, goes through one decoding engine per worker
(bento/decoding.py): the prompts of concurrent requests are decoded together, one forward pass per
token for the whole batch, up to serve.max_batch_size rows.
"""

import asyncio
from collections.abc import AsyncGenerator
from typing import Annotated, Literal

import bentoml
from bentoml.exceptions import InvalidArgument
from pydantic import BaseModel, ConfigDict, Field

from bento.apidocs import ApiDocs, describe
from bento.auth import ApiKeyGuard, check_startup, check_worker, deploy_host
from bento.decoding import Delta, Engine, Sampling
from bento.limits import RequestGuard, log_client_errors_as_warnings, max_body_bytes, traffic
from bento.openai_api import create_app, openai_examples
from bento.prompts import drop_oldest_exchange, fit_context, format_prompt, stop_id_set


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


# The request models are bentoml.IODescriptor: BentoML names them as they are (in the OpenAPI
# document and its 400 errors), not GenerateRequestIODescriptor.
class Options(bentoml.IODescriptor):
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


class NoInput(bentoml.IODescriptor):
    """Body of POST /metadata: none (an empty object)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {}})


class Generation(BaseModel):
    text: str = Field(description="The generated continuation only, without the prompt.")
    tokens: int = Field(description="Tokens generated (the stopping EOS included).")
    finish_reason: Literal["eos", "length"] = Field(
        description="eos: the model ended the text; length: max_new_tokens ran out.")


# /v1: the OpenAI-compatible API, served by the same worker, engine and limits (messages count
# against serve.max_texts, each of serve.max_chars).
OPENAI = create_app(bentoml.get_current_service, ARGS.model.removesuffix(":latest"),
                    LIMITS["max_texts"], LIMITS["max_chars"], MAX_NEW_TOKENS)


# http.host: bind only the loopback interface unless the user passes --host / BENTOML_HOST.
@bentoml.asgi_app(OPENAI, path="/v1")
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
        self.engine = Engine(self.model, tok, self.stop_ids, self.pad_id, LIMITS["max_batch_size"])

    def formatted(self, prompt: str) -> str:
        """A /generate prompt as the model was trained to see it: inside the pairs template, or as
        one user message of a conversation; plain text as it is."""
        if INFO["format"] == "chat":
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return format_prompt(prompt, INFO["template"] if INFO["format"] == "pairs" else None)

    def fit(self, ids: list[int], max_new_tokens: int, what: str) -> list[int]:
        """Prompt ids cut from the left to leave max_new_tokens room in the context
        (serve.truncate true), or refused with 400 when over it (false)."""
        budget = INFO["context"] - max_new_tokens
        if len(ids) > budget and not LIMITS.get("truncate", True):
            raise InvalidArgument(f"{what} has {len(ids)} tokens; with max_new_tokens "
                                  f"{max_new_tokens} the context ({INFO['context']}) leaves {budget} "
                                  "(serve.truncate is false)")
        return fit_context(ids, budget, self.start_id)

    def encode(self, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
        """The formatted prompts' token ids, each fitted to the context (``fit``)."""
        rows = self.tokenizer([self.formatted(p) for p in prompts], add_special_tokens=False)
        over = [(i, len(r)) for i, r in enumerate(rows["input_ids"])
                if len(r) > INFO["context"] - max_new_tokens]
        if over and not LIMITS.get("truncate", True):  # name every prompt over, not the first
            listed = ", ".join(f"prompt {i} has {n}" for i, n in over[:5])
            raise InvalidArgument(f"{listed} tokens; with max_new_tokens {max_new_tokens} the "
                                  f"context ({INFO['context']}) leaves "
                                  f"{INFO['context'] - max_new_tokens} (serve.truncate is false)")
        return [self.fit(r, max_new_tokens, "") for r in rows["input_ids"]]

    def text_ids(self, prompt: str, max_new_tokens: int) -> list[int]:
        """/v1/completions: the prompt as raw text (no template), fitted to the context."""
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return self.fit(ids, max_new_tokens, "the prompt")

    def chat_ids(self, messages: list[dict], max_new_tokens: int) -> list[int]:
        """/v1/chat/completions: the conversation rendered with the chat template and a generation
        prompt. Over the context, its oldest exchanges go (the system message stays), then the
        rest is cut from the left (serve.truncate true), or it is refused (false). A pairs model
        without a chat template answers the last user message inside its template."""
        if not self.tokenizer.chat_template:
            users = [m["content"] for m in messages if m["role"] == "user"]
            if INFO["format"] != "pairs" or not users:
                raise InvalidArgument("this model has no chat template (trained on plain text): "
                                      "use /v1/completions" if INFO["format"] != "pairs" else
                                      "messages: a user message is needed")
            return self.encode([users[-1]], max_new_tokens)[0]
        budget, kept = INFO["context"] - max_new_tokens, messages
        while True:
            try:
                text = self.tokenizer.apply_chat_template(kept, tokenize=False,
                                                          add_generation_prompt=True)
            except Exception as err:  # the template's own refusal (jinja2 raise_exception)
                raise InvalidArgument(f"messages: the chat template refuses them: {err}") from None
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            shorter = drop_oldest_exchange(kept) if LIMITS.get("truncate", True) else None
            if len(ids) <= budget or shorter is None:
                return self.fit(ids, max_new_tokens, "the conversation")
            kept = shorter

    @staticmethod
    def sampling(max_new_tokens: int, temperature: float, top_p: float) -> Sampling:
        return Sampling(max_new_tokens, temperature, top_p)

    @bentoml.api(input_spec=GenerateRequest)
    async def generate(self, prompts: list[str], max_new_tokens: int, temperature: float,
                       top_p: float) -> list[Generation]:
        """Continue each prompt; answers come in the order of `prompts`."""
        sampling = self.sampling(max_new_tokens, temperature, top_p)
        done = await asyncio.gather(*(self.engine.complete(ids, sampling)
                                      for ids in self.encode(prompts, max_new_tokens)))
        return [Generation(text=d.text, tokens=d.tokens,
                           finish_reason="length" if d.finish_reason == "length" else "eos")
                for d in done]

    @bentoml.api(input_spec=StreamRequest)
    async def generate_stream(self, prompt: str, max_new_tokens: int, temperature: float,
                              top_p: float) -> AsyncGenerator[str, None]:
        """Continue one prompt, sending the new text in chunks as it is generated."""
        [ids] = self.encode([prompt], max_new_tokens)
        async for event in self.engine.stream(ids, self.sampling(max_new_tokens, temperature, top_p)):
            if isinstance(event, Delta) and event.text:
                yield event.text

    @bentoml.api(route="/metadata", input_spec=NoInput)
    def metadata(self) -> dict:
        """The model tag, its prompt format, lineage labels and serving limits."""
        return metadata_answer()


def metadata_answer() -> dict:
    """The answer of POST /metadata: read from the stored model, none of it from the weights."""
    return {"model_tag": str(MODEL.tag), "task": INFO["task"], "format": INFO["format"],
            "template": INFO["template"], "context": INFO["context"],
            "lineage": dict(MODEL.stored.info.labels),
            "limits": {**LIMITS, "max_new_tokens": MAX_NEW_TOKENS}}


def answer_examples() -> dict[str, object]:
    """The 200 examples of the API description: /metadata's real answer; for the others, answers
    in their exact format to their request examples (the text is illustrative)."""
    text = " there was a kettle that boiled water fast."
    return {"/generate": [{"text": text, "tokens": 11, "finish_reason": "eos"}],
            "/generate_stream": text, "/metadata": metadata_answer(),
            **openai_examples(ARGS.model.removesuffix(":latest"), text)}


# As the classifier's: the key check outermost, then the body bound (max_texts prompts of
# max_chars, plus a few small options).
Generator.add_asgi_middleware(ApiKeyGuard, key_env=LIMITS.get("api_key_env"))
Generator.add_asgi_middleware(RequestGuard, max_bytes=max_body_bytes(LIMITS))
Generator.add_asgi_middleware(ApiDocs, title="lmforge language model", spec=lambda: describe(
    Generator, {**LIMITS, "timeout_s": TIMEOUT_S}, answer_examples()))
log_client_errors_as_warnings()
# As in bento/service.py: name the list response's media type once instead of BentoML deriving it
# from a freshly built JSON schema on every response.
Generator.apis["generate"].output_spec.media_type = "application/json"
