"""The OpenAI-compatible HTTP server (``gpt2 serve``): request models, validation, errors and SSE.

It only translates between HTTP and the engine (``engine.py``: continuous batching over KV-cache
slots, sampling, cancellation); text comes out of generate.py's ``TextStream`` (the one place that
knows stop strings and UTF-8 hold-back). The anchors are vLLM's OpenAI server (request and
response shapes, ``/tokenize``) and llama.cpp's server (``/health``, ``/metrics``).

Endpoints (see the README's "Serving" section for every field):

* ``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming with server-sent events),
  ``GET /v1/models``, ``GET /v1/models/{id}``;
* ``GET /health``: 503 until the engine has warmed up (and again while shutting down), then 200;
* ``GET /metrics``: Prometheus text (requests running and queued, tokens, TTFT and inter-token
  latency histograms);
* ``POST /tokenize``, ``POST /detokenize``.

Every GET endpoint answers HEAD; a wrong method is a 405 with ``Allow``; a compressed body a 415; an
unknown path a 404 naming the path meant (a base_url without ``/v1``) or the endpoints. Responses carry
``system_fingerprint`` (:func:`system_fingerprint`) and an ``x-request-id`` header, as OpenAI's do.

Every error has OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``. A field we do not
support is a 400 naming it (never silently ignored); OpenAI fields whose value changes nothing
(``best_of: 1`` ...) are accepted, since many clients always send them. ``logit_bias``,
``presence_penalty`` and ``frequency_penalty`` work as OpenAI's, ``repetition_penalty`` and ``min_p``
as vLLM's (see ``engine.SamplingParams``).

The web stack (FastAPI, uvicorn, prometheus_client) is the optional extra ``gpt2model[serve]``;
nothing else in the package imports this module.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
import hashlib
import hmac
import json
import math
import re
import secrets
import signal
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

import prometheus_client
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError
from starlette.requests import ClientDisconnect

from . import __version__
from .engine import Engine, FinishEvent, PromptEvent, QueueFullError, SamplingParams, TokenEvent
from .generate import TextStream
from .model import KVCache
from .tokenizer import split_special

if TYPE_CHECKING:
    from .engine import Request as EngineRequest

# A plain transcript: GPT-2 has no chat format of its own. Jinja2, as HF chat templates are
# (``--chat-template FILE`` replaces it); it gets ``messages`` and ``add_generation_prompt``.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'system' %}{{ m.content }}\n\n"
    "{% elif m.role == 'user' %}User: {{ m.content }}\n"
    "{% else %}Assistant: {{ m.content }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
# With the default template a reply ends where the model starts the user's next turn.
DEFAULT_CHAT_STOP = ("\nUser:",)
MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any prompt that fits a GPT-2 context
MAX_N = 16
# OpenAI takes 4 stop strings, vLLM and llama-server any number; editor and agent clients (Continue's
# autocomplete ...) send more than 4 to local servers. Bounded, as each is looked for after every token.
MAX_STOP = 32
MAX_STOP_TOKEN_IDS = 64  # vLLM extension: end-of-text and these end a choice
MAX_LOGPROBS = 20  # completions: vLLM's default limit (OpenAI's legacy API: 5), as chat's top_logprobs
MAX_TOP_LOGPROBS = 20  # chat: as OpenAI


# --- errors --------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _validation_error(e: ValidationError, body: dict[str, Any]) -> APIError:
    """The first pydantic error as one 400 naming the field (``messages.0.role``)."""
    errors = e.errors()
    # What names the problem best: our own sentence (a tool role, an image part), else a field we do
    # not implement wherever it sits (a text part's "cache_control": the other branch of the union,
    # "a valid string", would say nothing), else the first error.
    err = next((x for x in errors if x["type"].startswith("unsupported_")), None) \
        or next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])

    def where(loc: tuple) -> str:
        # pydantic puts the branch of a union into locations ("list[int]"): not part of the field's path.
        return ".".join(str(p) for p in loc if isinstance(p, int) or p in _FIELD_NAMES)

    loc = where(err["loc"])
    if err["type"] == "extra_forbidden":
        loc = ".".join(filter(None, [where(err["loc"][:-1]), str(err["loc"][-1])]))
        return APIError(400, f"unsupported field {loc!r}: this server does not implement it (remove it from "
                             f"the request)", param=loc, code="unsupported_field")
    if err["type"] == "missing":
        return APIError(400, f"missing required field {loc!r}", param=loc, code="missing_field")
    value: Any = body
    for p in loc.split("."):
        try:
            value = value[int(p)] if isinstance(value, list) else value[p]
        except (KeyError, IndexError, ValueError, TypeError):
            break
    shown = json.dumps(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    # A union (prompt: string | strings | ids ...) fails once per branch: say what each wanted (the
    # errors at the field or inside it, not those of its neighbours: messages.0.role's, not .tool_call_id's).
    msgs = list(dict.fromkeys(f"{where(x['loc'])!r} is required" if x["type"] == "missing"
                              else x["msg"].removeprefix("Value error, ")
                              for x in errors if f"{where(x['loc'])}.".startswith(f"{loc}.")
                              or where(x["loc"]).startswith(f"{loc}.")))
    if loc.split(".")[0] == "prompt" and "prompt" in body:  # its four shapes, rather than each branch's complaint
        msgs = ["prompt must be a string, a list of strings, a list of token ids (integers) or a list of lists of "
                "token ids"]
        loc = "prompt"
    if loc.split(".")[0] == "stop" and "stop" in body:
        msgs = [f"stop must be a non-empty string or a list of at most {MAX_STOP} non-empty strings"]
        loc = "stop"
    return APIError(400, f"invalid value for {loc!r} (got {shown}): {'; or '.join(msgs[:4])}", param=loc,
                    code="invalid_value")


# --- request models -----------------------------------------------------------------------------
def _float32_positive(x: float) -> float:
    if not 1.1754943508222875e-38 <= x <= 3.4028234663852886e38:
        raise ValueError("must be a number > 0 within float32's range (1.2e-38 to 3.4e38; 1 = off)")
    return x


class _Strict(BaseModel):
    # strict: "0.5" is not a number and true is not 1 (OpenAI rejects them too); forbid: an unknown
    # field is an error that names it, never silently ignored.
    model_config = ConfigDict(strict=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # OpenAI's spec marks its optional fields nullable and clients send null for "not set"
        # (openai-python sends `temperature=None` as null; vLLM's fields are Optional): an optional
        # field given null takes its default. Fields where null means something (max_tokens: up to
        # the context) and required fields keep it. A field we do not implement given null asks for
        # nothing either (SDKs that write every field: "tools": null, "store": null; a message
        # copied from an OpenAI reply: "refusal": null, "tool_calls": null): dropped, not a 400.
        if isinstance(data, dict):
            fields = cls.model_fields
            return {k: v for k, v in data.items()
                    if v is not None or (k in fields and (fields[k].is_required()
                                                          or type(None) in get_args(fields[k].annotation)))}
        return data


class StreamOptions(_Strict):
    include_usage: bool = False
    # OpenAI's: each chunk carries an "obfuscation" field of random length, so that a network
    # observer cannot infer the tokens from the chunks' sizes (OpenAI's default is true; ours false)
    include_obfuscation: bool = False


PositiveInt = Annotated[int, Field(ge=1)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
# 0 keeps only the most likely token (greedy), as OpenAI's API and llama.cpp accept it (vLLM refuses it)
TopP = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]  # OpenAI's range
StopString = Annotated[str, Field(min_length=1)]


class _Sampling(_Strict):
    """Fields both endpoints share, with OpenAI's meanings."""

    model: str | None = None
    temperature: Temperature = 1.0  # 0 = greedy (argmax), exactly
    top_p: TopP = 1.0
    # Extension (vLLM, llama.cpp); 0 and -1 mean no top-k filter, as in vLLM (whose clients send -1).
    top_k: Annotated[int, Field(ge=-1)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as OpenAI's docs allow
    # OpenAI's successors of ``user``: an end-user id for abuse monitoring (ignored, as user) and a
    # prompt-cache routing key (this server has no prompt cache to route to).
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    presence_penalty: Penalty = 0.0  # engine.SamplingParams: OpenAI's penalties, over the generated tokens
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]] | None = None
    # vLLM's extensions (its benchmark client sends ignore_eos): stop tokens beside end-of-text, none
    # before min_tokens, or end-of-text not a stop at all.
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0)] = 0
    # vLLM's default: a special token that is not a stop (end-of-text with ignore_eos) adds no text.
    skip_special_tokens: bool = True
    # vLLM's: the stop string that ended a choice ends its text too (default: dropped, as OpenAI)
    include_stop_str_in_output: bool = False
    # vLLM's: logprobs name tokens "token_id:{id}" (exact, where a part of a character reads U+FFFD)
    return_tokens_as_token_ids: bool = False
    # vLLM's (a BOS added to the prompt where the tokenizer asks for one): GPT-2's tokenizers add none
    # either way, as HF's GPT-2 tokenizer (add_bos_token false), so both values ask for nothing.
    add_special_tokens: bool | None = None
    # vLLM's (and HF's, llama.cpp's) sampling extensions: over the prompt and the generated tokens; 1 / 0 = off.
    # float32's range: the factor multiplies fp32 logits (1e300 overflowed into a 500)
    repetition_penalty: Annotated[float, Field(allow_inf_nan=False), AfterValidator(_float32_positive)] = 1.0
    min_p: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.0
    # {"type": "text"} is OpenAI's default (clients send it); JSON modes are a 400 (_check_noops).
    response_format: dict[str, Any] | None = None
    # OpenAI fields some clients always send, accepted at the values that ask for nothing here
    # (_check_noops): store=false (we store nothing), metadata (tags for stored completions),
    # service_tier "auto"/"default", modalities ["text"].
    store: bool = False
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    # OpenAI's default for completions; 0 (with echo) scores the prompt only, as OpenAI's legacy API and vLLM allow
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    best_of: PositiveInt | None = None
    suffix: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None
    name: str | None = None

    # What a client sends for what GPT-2 cannot do, said in one sentence (pydantic's own words for
    # these list every branch of the union: "valid string; or 'text'; or Field required ...").
    @field_validator("role", mode="before")
    @classmethod
    def _no_tool_roles(cls, role: Any) -> Any:
        if role in ("tool", "function", "ipython"):
            raise PydanticCustomError("unsupported_role", f"role {role!r} is not supported: this server has no tool "
                                      f"calling (roles: system, developer, user, assistant)")
        return role

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise PydanticCustomError(
                        "unsupported_part", f"content parts of type {kind!r} are not supported: this model reads "
                        f"text only (send a string, or parts {{'type': 'text', 'text': ...}})")
        return content


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None  # None: up to the end of the context
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    # vLLM's (and transformers' apply_chat_template's): open the assistant's turn, or continue the
    # last message (e.g. an assistant reply begun by the client) where it ends.
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = True  # vLLM's field; GPT-2 adds no special tokens either way


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


_FIELD_NAMES = {name for m in (CompletionRequest, ChatRequest, ChatMessage, TextPart, StreamOptions, TokenizeRequest,
                                DetokenizeRequest) for name in m.model_fields}


def _logit_bias(req: _Sampling, vocab_size: int) -> dict[int, float] | None:
    """``logit_bias`` with OpenAI's token-id string keys as ids (a 400 naming it otherwise)."""
    if not req.logit_bias:
        return None
    bias = {}
    for key, value in req.logit_bias.items():
        token = int(key) if key.isascii() and key.isdigit() else -1  # not "١" (int() reads any digits)
        if not 0 <= token < vocab_size:
            raise APIError(400, f"logit_bias keys must be token ids in [0, {vocab_size}) written as strings, "
                           f"got {key!r}", param="logit_bias")
        bias[token] = float(value)
    return bias


def _check_noops(req: _Sampling) -> None:
    """OpenAI fields we accept only where they change nothing: anything else is a 400 naming it."""
    if isinstance(req, CompletionRequest):
        if req.best_of not in (None, req.n):
            raise APIError(400, "best_of is not supported by this server (only best_of == n)", param="best_of",
                           code="unsupported_value")
        if req.suffix:
            raise APIError(400, "suffix (insertion) is not supported by GPT-2", param="suffix",
                           code="unsupported_value")
    if req.response_format is not None and req.response_format.get("type") != "text":
        kind = req.response_format.get("type")
        raise APIError(400, f"response_format {{'type': {kind!r}}} is not supported: this server cannot constrain "
                            f"the output (only {{'type': 'text'}}, the default)", param="response_format",
                       code="unsupported_value")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")
    if req.store:
        raise APIError(400, "store=true is not supported: this server stores no completions (send store=false or "
                            "leave it out)", param="store", code="unsupported_value")
    if req.service_tier not in (None, "auto", "default"):
        raise APIError(400, f"service_tier {req.service_tier!r} is not supported (only 'auto' or 'default')",
                       param="service_tier", code="unsupported_value")
    if req.modalities not in (None, ["text"]):
        raise APIError(400, f"modalities {req.modalities!r} are not supported: this model writes text only "
                            f"(['text'])", param="modalities", code="unsupported_value")


# --- the server's state -------------------------------------------------------------------------
def system_fingerprint(model: Any) -> str:
    """OpenAI's ``system_fingerprint``: names the backend configuration that decides which tokens a
    seed gives (this package's and torch's versions, the device, the model's shape, its modules as
    ``repr`` describes them (int8 weight-only vs int8 activations too: same tensors, other numbers),
    dtypes and weights), so that a client can tell when the same request and seed may stop repeating.

    The weights enter as an evenly spaced sample of each tensor's values in logical order (the same
    whatever the memory layout; cheap for any size): a fine-tune or another quantization changes it."""
    modules = [(name, type(m).__name__, m.extra_repr()) for name, m in model.named_modules()
               if not isinstance(m, KVCache)]  # (a cache comes and goes with the engine)
    h = hashlib.sha256(f"gpt2model {__version__}|torch {torch.__version__}|{model.device.type}|"
                       f"{model.config}|{modules}".encode())
    with torch.no_grad():
        for name, t in model.state_dict().items():
            flat = t.detach().reshape(-1)
            sample = flat[::max(1, flat.numel() // 4096)].cpu().contiguous()
            h.update(f"|{name}{tuple(t.shape)}{t.dtype}|".encode())
            h.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return f"fp_{h.hexdigest()[:12]}"


@dataclass
class ServerConfig:
    """What ``create_app`` needs besides the engine and tokenizer."""

    model_name: str
    api_key: str | None = None
    chat_template: str = DEFAULT_CHAT_TEMPLATE
    chat_stop: Sequence[str] = DEFAULT_CHAT_STOP
    max_body_bytes: int = MAX_BODY_BYTES
    request_timeout: float = 30.0
    # CORS (browsers' cross-origin requests, e.g. a web UI on another port): vLLM's default, any
    # origin; () sends no CORS headers (browsers then refuse cross-origin calls).
    allowed_origins: Sequence[str] = ("*",)
    # The model's end-of-sequence ids beside end-of-text (a ChatML fine-tune's <|im_end|>: its
    # generation_config.json, see find_eos_ids): they end a choice with "stop" too, as in vLLM.
    eos_token_ids: Sequence[int] = ()
    created: int = field(default_factory=lambda: int(time.time()))


class _Metrics:
    """Prometheus metrics: the engine's counters read at scrape time, latencies observed here."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        buckets = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96)
        self.ttft = Histogram("gpt2model_time_to_first_token_seconds", "Time from request arrival to the first "
                              "generated token", registry=self.registry, buckets=buckets)
        self.itl = Histogram("gpt2model_inter_token_latency_seconds", "Time between consecutive tokens of one "
                             "choice", registry=self.registry, buckets=buckets)
        self.e2e = Histogram("gpt2model_request_duration_seconds", "Time from arrival to the last token",
                             registry=self.registry, buckets=buckets)
        self.responses = Counter("gpt2model_http_responses", "HTTP responses by endpoint and status",
                                 ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("gpt2model_prompt_tokens", "Prompt tokens of accepted requests",
                                     registry=self.registry)


class _EngineCollector:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self):  # noqa: ANN201 - prometheus collector protocol
        s = self.engine.stats()
        yield GaugeMetricFamily("gpt2model_requests_running", "Requests in a KV-cache slot", value=s["running"])
        yield GaugeMetricFamily("gpt2model_requests_queued", "Requests waiting for a slot", value=s["queued"])
        yield CounterMetricFamily("gpt2model_generation_tokens", "Tokens generated", value=s["tokens_generated"])
        finished = CounterMetricFamily("gpt2model_requests_finished", "Requests finished, by finish reason",
                                       labels=["reason"])
        for reason, count in s["finished"].items():
            finished.add_metric([reason], count)
        yield finished
        for key, value in s.items():
            if key in ("running", "queued", "tokens_generated") or isinstance(value, bool) \
                    or not isinstance(value, (int, float)):
                continue
            # The batch and queue limits are settings (gauges); every other stat only grows (counters:
            # Prometheus' rate() and the scrape's _total suffix rely on the type).
            family = GaugeMetricFamily if key in ("max_batch", "max_queue") else CounterMetricFamily
            yield family(f"gpt2model_engine_{key}", f"engine.stats()['{key}']", value=value)


@dataclass
class _Choice:
    """One generated sequence: an engine request and the text it has produced so far."""

    index: int
    prompt_index: int
    request: EngineRequest
    stream: TextStream
    stop_ids: tuple[int, ...]
    hidden_ids: tuple[int, ...] = ()  # generated, counted, but adding no text (skip_special_tokens)
    include_stop: bool = False  # include_stop_str_in_output
    as_token_ids: bool = False  # return_tokens_as_token_ids
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenEvent] = field(default_factory=list)
    # Where each of ``logprobs``' tokens begins in ``text`` (a token holding the later bytes of a
    # character split across tokens: where that character begins), for ``text_offset``.
    offsets: list[int] = field(default_factory=list)
    last_token_at: float | None = None
    prompt_logprobs: list[TokenEvent] | None = None  # echo + logprobs: the prompt's, from the engine


class _Server:
    """Request handling: validation -> engine requests -> OpenAI responses."""

    def __init__(self, engine: Engine, tokenizer: Any, config: ServerConfig) -> None:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox

        self.engine, self.tokenizer, self.config = engine, tokenizer, config
        self.context_length: int = engine.model.config.context_length
        # The ids a request may name and the engine may draw: those the tokenizer decodes too.
        self.vocab_size: int = engine.vocab
        if tokenizer.vocab_size < engine.vocab:
            raise ValueError(f"the model has {engine.vocab} token rows but its tokenizer only {tokenizer.vocab_size} "
                             f"tokens: make the engine with Engine(model, vocab_limit=tokenizer.vocab_size) so that "
                             f"it never draws an id the tokenizer cannot decode")
        self.metrics = _Metrics(engine)
        self.fingerprint = system_fingerprint(engine.model)
        self.shutting_down = False
        self.start_error: str | None = None
        # HF's chat-template environment (transformers' _compile_jinja_template), so that a template
        # written for HF (or vLLM, which renders with HF) gives the same prompt here: trim_blocks and
        # lstrip_blocks, loop controls, raise_exception, strftime_now, a tojson that keeps non-ASCII
        # text, and the tokenizer's special tokens as variables (see chat_ids).
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                           extensions=[jinja2.ext.loopcontrols])

        def raise_exception(message: str) -> None:
            raise jinja2.TemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
                   sort_keys: bool = False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
        # What stands in for a special token's text inside a message while the template renders
        # (see chat_ids): digits and NULs, which no filter (trim, upper ...) changes.
        self._nonce = str(uuid.uuid4().int)
        try:
            self.template = env.from_string(config.chat_template)
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template is not valid Jinja2: {e}") from None

    # --- input ----------------------------------------------------------------------------------
    async def read_json(self, request: Request) -> dict[str, Any]:
        """The body as a JSON object: size-limited, strict UTF-8, no NaN/Infinity."""
        limit = self.config.max_body_bytes
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):  # else "not valid UTF-8 (byte 1)", which names neither problem nor fix
            raise APIError(415, f"Content-Encoding {encoding!r} is not supported: send the JSON body uncompressed",
                           code="unsupported_content_encoding")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise APIError(413, f"request body of {int(length)} bytes is larger than the limit of {limit} bytes",
                           code="request_too_large")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise APIError(413, f"request body is larger than the limit of {limit} bytes",
                                   code="request_too_large")
                chunks.append(chunk)
        except ClientDisconnect:  # (else uvicorn logs "Exception in ASGI application" and a traceback)
            raise APIError(499, "the client closed the connection while sending the request body",
                           code="client_closed_request") from None
        raw = b"".join(chunks)
        # Any Content-Type is read as JSON (curl -d sends form-urlencoded; llama-server reads it too),
        # but a body that is not JSON says how it was sent (curl -F: multipart form data).
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        sent_as = "" if not ctype or ctype == "application/json" or ctype.endswith("+json") else \
            f" (it was sent as {ctype}: send a JSON object with Content-Type: application/json)"
        if not raw.strip():
            raise APIError(400, "the request body is empty: send a JSON object", code="invalid_json")
        try:
            text = raw.decode("utf-8").removeprefix("\ufeff")  # a BOM, which RFC 8259 lets parsers ignore
        except UnicodeDecodeError as e:
            raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start}): send JSON encoded as "
                                f"UTF-8{sent_as}", code="invalid_json") from None

        def no_constants(name: str) -> Any:
            raise ValueError(f"{name} is not a valid JSON number")

        try:
            body = json.loads(text, parse_constant=no_constants)
        except (json.JSONDecodeError, ValueError, RecursionError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}{sent_as}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, f"the request body must be a JSON object, got a JSON {type(body).__name__}",
                           code="invalid_json")
        return body

    def parse(self, model_type: type[BaseModel], body: dict[str, Any]) -> Any:
        try:
            req = model_type.model_validate(body)
        except ValidationError as e:
            raise _validation_error(e, body) from None
        if getattr(req, "model", None) not in (None, self.config.model_name):
            raise APIError(404, f"the model {req.model!r} does not exist: this server serves "
                                f"{self.config.model_name!r} (see GET /v1/models)", param="model",
                           code="model_not_found")
        return req

    def encode_prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
        if isinstance(prompt, str):
            prompts: list[str | list[int]] = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [prompt]  # type: ignore[list-item]
        else:
            prompts = list(prompt)  # type: ignore[arg-type]
        if not prompts:
            raise APIError(400, "prompt is an empty list: give a string, strings, or token ids", param="prompt")
        out = []
        for p in prompts:
            ids = self.encode(p, "prompt", special=True) if isinstance(p, str) else list(p)
            if not ids and not isinstance(p, str):
                raise APIError(400, "a prompt of token ids is empty: give at least one id", param="prompt")
            if not ids:
                if self.tokenizer.eot is None:
                    raise APIError(400, "the prompt is empty and this model's tokenizer has no end-of-text token to "
                                        "start from: give some text", param="prompt")
                ids = [self.tokenizer.eot]  # as OpenAI: an empty prompt starts a new document
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise APIError(400, f"token id {bad} is out of range: ids must be in [0, {self.vocab_size})",
                               param="prompt")
            out.append(ids)
        return out

    def encode(self, text: str, param: str, special: bool = False) -> list[int]:
        """Text -> ids; text the tokenizer cannot encode (a character outside a char vocabulary, or an
        unpaired UTF-16 surrogate such as "\\ud800", which JSON can spell but no text contains) is a 400.

        ``special``: "<|endoftext|>" written in the text is the end-of-text token, as vLLM (HF's
        tokenizer) and nanoGPT's sample.py read a prompt: the completions ``prompt`` (and /tokenize's),
        which its sender writes whole. Chat messages keep it as text: a message is someone's text
        wrapped by the template, and must not end the document or forge a turn."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise APIError(400, f"{param} is not valid Unicode text: it holds an unpaired surrogate "
                                f"{text[e.start]!r} at character {e.start} (send UTF-8 text)", param=param) from None
        try:
            return self.tokenizer.encode(text, allowed_special="all" if special else frozenset())
        except ValueError as e:
            raise APIError(400, f"{param} cannot be tokenized for this model: {e}", param=param) from None

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                    protect: Callable[[str], str] = lambda s: s) -> str:
        """The messages through the chat template; ``protect`` rewrites each message's text first."""
        import jinja2

        msgs = []
        for m in messages:
            content = m.content if isinstance(m.content, str) or m.content is None \
                else "\n".join(p.text for p in m.content)  # vLLM's join of text parts
            role = "system" if m.role == "developer" else m.role
            msgs.append({"role": role, "content": protect(content or ""),
                         **({"name": protect(m.name)} if m.name is not None else {})})
        # HF's values for GPT-2 (bos, eos and unk are all end-of-text)
        special = {} if self.tokenizer.eot is None else dict.fromkeys(("bos_token", "eos_token", "unk_token"),
                                                                      self.tokenizer.decode([self.tokenizer.eot]))
        try:
            return self.template.render(messages=msgs, add_generation_prompt=add_generation_prompt, tools=None,
                                        documents=None, **special)
        except jinja2.TemplateError as e:
            raise APIError(400, f"the chat template failed on these messages: {e}", param="messages") from None

    def chat_ids(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                 continue_final_message: bool = False) -> list[int]:
        """The messages through the chat template, as token ids, as transformers' apply_chat_template
        tokenizes them: the special tokens the template writes ({{ eos_token }}, a fine-tune's
        "<|im_start|>" ...) are their ids, the text between them is encoded piece by piece. One
        difference, on purpose: a special token's text written inside a message stays text, so that
        a message cannot end the document or forge a turn (HF would read it as the token)."""
        specials = getattr(self.tokenizer, "special_tokens", {})
        originals: list[str] = []

        @functools.cache  # the same text, the same placeholders (continue_final_message looks for it)
        def protect(text: str) -> str:
            def hide(piece: str | int) -> str:
                if isinstance(piece, str):
                    return piece
                originals.append(self.tokenizer.decode([piece]))
                return f"\x00{self._nonce}:{len(originals) - 1}\x00"

            return "".join(hide(p) for p in split_special(text, specials))

        if continue_final_message and add_generation_prompt:
            raise APIError(400, "continue_final_message and add_generation_prompt cannot both be true: set "
                                "add_generation_prompt to false to continue the last message",
                           param="continue_final_message")
        rendered = self.render_chat(messages, add_generation_prompt, protect)
        if continue_final_message:
            # transformers' rule: cut after the last occurrence of the final message's text (stripped,
            # if the template trimmed it), dropping the end-of-turn the template wrote after it
            last = messages[-1].content
            final = protect(last if isinstance(last, str) else "\n".join(p.text for p in last or []))
            at = rendered.rfind(final) if final in rendered else rendered.rfind(final.strip())
            if not final.strip() or at < 0:
                raise APIError(400, "continue_final_message: the last message's text is empty or the chat "
                                    "template does not write it", param="messages")
            rendered = rendered[:at + len(final if final in rendered else final.strip())]
        placeholder = re.compile(f"\x00{self._nonce}:(\\d+)\x00")
        ids: list[int] = []
        for piece in split_special(rendered, specials):  # the template's own special tokens
            if isinstance(piece, int):
                ids.append(piece)
            elif piece:
                ids += self.encode(placeholder.sub(lambda m: originals[int(m.group(1))], piece), "messages")
        return ids

    def max_tokens_for(self, prompt_len: int, asked: int | None, param: str, prompt_param: str) -> int:
        room = self.context_length - prompt_len
        if asked == 0 and room >= 0:
            return 0  # scoring the prompt (echo): it may fill the whole context
        if room < 1:
            raise APIError(400, f"this model's maximum context length is {self.context_length} tokens, and the "
                                f"prompt has {prompt_len}: shorten the prompt (no room for a single new token)",
                           param=prompt_param, code="context_length_exceeded")
        if asked is None:
            return room
        if prompt_len + asked > self.context_length:
            raise APIError(400, f"this model's maximum context length is {self.context_length} tokens, but "
                                f"{prompt_len + asked} were requested ({prompt_len} in the prompt, {asked} for the "
                                f"completion): lower {param} to at most {room} or shorten the prompt",
                           param=param, code="context_length_exceeded")
        return asked

    # --- engine -------------------------------------------------------------------------------------
    def submit(self, prompts: list[list[int]], req: _Sampling, max_tokens: list[int], stop: list[str],
               logprobs: int | None, prompt_logprobs: int | None = None) -> list[_Choice]:
        """One engine request per (prompt, n); all or none (a full queue cancels what got in)."""
        if self.shutting_down:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        eos = (self.tokenizer.eot,) if self.tokenizer.eot is not None else ()
        eos += tuple(t for t in self.config.eos_token_ids if t not in eos and 0 <= t < self.vocab_size)
        stop_ids = () if req.ignore_eos else eos
        for t in req.stop_token_ids or []:
            if t >= self.vocab_size:
                raise APIError(400, f"stop_token_ids: token id {t} is out of range: ids must be in "
                                    f"[0, {self.vocab_size})", param="stop_token_ids")
            stop_ids += (t,) if t not in stop_ids else ()
        if req.min_tokens > min(max_tokens):
            raise APIError(400, f"min_tokens ({req.min_tokens}) must not exceed max_tokens ({min(max_tokens)})",
                           param="min_tokens")
        logit_bias = _logit_bias(req, self.vocab_size)
        # Every choice is one engine request: more than the engine ever holds (slots + queue) would be
        # a 429 on every retry, forever.
        most = self.engine.max_batch + self.engine.max_queue
        if len(prompts) * req.n > most:
            raise APIError(400, f"this request asks for {len(prompts) * req.n} completions ({len(prompts)} prompt(s) x "
                                f"n={req.n}) but this server holds at most {most} at once (--max-batch + "
                                f"--max-queue): send fewer prompts per request or a smaller n",
                           param="n" if req.n > 1 else "prompt")
        # vLLM's skip_special_tokens: no special token adds text (end-of-text, a fine-tune's <|im_start|> ...)
        hidden_ids = tuple({*eos, *getattr(self.tokenizer, "special_tokens", {}).values()}) \
            if req.skip_special_tokens else ()
        choices: list[_Choice] = []
        try:
            for i, ids in enumerate(prompts):
                for j in range(req.n):
                    # n > 1 with a seed: choice j uses seed + j, so the choices differ yet repeat.
                    params = SamplingParams(
                        max_tokens=max_tokens[i], temperature=0.0 if req.top_p == 0 else float(req.temperature),
                        top_k=req.top_k if req.top_k is not None and req.top_k > 0 else None,
                        top_p=None if req.top_p >= 1.0 or req.top_p == 0 else float(req.top_p),
                        seed=None if req.seed is None else req.seed + j, logprobs=logprobs,
                        stop_token_ids=stop_ids, prompt_logprobs=prompt_logprobs, logit_bias=logit_bias,
                        presence_penalty=float(req.presence_penalty), frequency_penalty=float(req.frequency_penalty),
                        min_tokens=req.min_tokens, repetition_penalty=float(req.repetition_penalty),
                        min_p=float(req.min_p))
                    r = self.engine.submit(ids, params)
                    # vLLM's min_tokens holds back the stop strings too (its detokenizer looks for them
                    # only after min_tokens tokens), not only the stop tokens.
                    text = TextStream(self.tokenizer, stop, min_tokens=req.min_tokens)
                    choices.append(_Choice(len(choices), i, r, text, stop_ids, hidden_ids,
                                           req.include_stop_str_in_output, req.return_tokens_as_token_ids))
        except QueueFullError as e:
            for c in choices:
                c.request.cancel()
            raise APIError(429, f"the server is busy: {e}", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except ValueError as e:
            for c in choices:
                c.request.cancel()
            raise APIError(400, str(e), param="prompt") from None
        except RuntimeError as e:  # the engine is shutting down (or failed)
            for c in choices:
                c.request.cancel()
            raise APIError(503, f"the server cannot take requests now: {e}", type="server_error",
                           code="unavailable") from None
        return choices

    async def events(self, choices: list[_Choice], arrived: float, ready: asyncio.Event | None = None,
                     gone: Callable[[], bool] | None = None) -> AsyncIterator[tuple[_Choice, str, bool]]:
        """Merge the choices' engine events into ``(choice, new text, finished)``, step by step and
        choice by choice (``(choice, "", False)`` when the prompt's logprobs arrive:
        ``choice.prompt_logprobs``).

        Updates each choice (text, tokens, finish_reason, logprobs) and the latency metrics. A stop
        string or an end-of-text ends the choice with ``stop``; reaching ``max_tokens``, ``length``.
        One coroutine follows all the choices (``Request.watch`` with one ``ready`` event, woken
        once per engine step): no task, queue or ``asyncio.wait`` per token. The caller may pass
        ``ready`` and set it itself, e.g. when the client disconnects, with ``gone()`` then true:
        the iteration ends at once (its ``finally`` cancels the engine requests).
        """
        ready = ready or asyncio.Event()
        for c in choices:
            c.request.watch(ready)
        try:
            pending = len(choices)
            while pending:
                ready.clear()  # before taking, so events posted after the take set it again
                batch = [(c, ev) for c in choices for ev in c.request.take_events()]
                if not batch:
                    if gone is not None and gone():
                        return
                    await ready.wait()
                    continue
                for c, ev in batch:
                    if isinstance(ev, FinishEvent):
                        pending -= 1
                        tail = c.stream.flush()  # "" once a stop string ended it
                        if c.finish_reason is None:
                            if ev.reason == "error":
                                raise APIError(500, f"generation failed: {ev.error}", type="server_error",
                                               code="engine_error")
                            if ev.reason == "cancelled":
                                raise APIError(503, "the request was cancelled: the server is shutting down "
                                                    "(retry on another replica or once it is back)",
                                               type="server_error", code="cancelled")
                            c.finish_reason = ev.reason
                        now = time.perf_counter()
                        self.metrics.e2e.observe(now - arrived)
                        c.text += tail
                        yield c, tail, True
                        continue
                    if isinstance(ev, PromptEvent):
                        c.prompt_logprobs = ev.tokens
                        yield c, "", False
                        continue
                    if c.finish_reason is not None:
                        continue  # a stop string ended it; the engine's cancel is on its way
                    now = time.perf_counter()
                    if c.last_token_at is None:
                        self.metrics.ttft.observe(now - arrived)
                    else:
                        self.metrics.itl.observe(now - c.last_token_at)
                    c.last_token_at = now
                    c.tokens += 1
                    if ev.logprob is not None:
                        c.logprobs.append(ev)
                        c.offsets.append(len(c.text) + c.stream.held_chars)
                    if ev.token in c.stop_ids:
                        c.finish_reason = "stop"  # the engine ends the request itself
                        continue
                    if ev.token in c.hidden_ids:
                        c.stream.skip()  # no text, but a token for min_tokens
                        continue
                    piece = c.stream.push(ev.token)
                    if c.stream.stopped:
                        c.finish_reason = "stop"
                        c.request.cancel("stop")  # finished by its stop string (/metrics: reason "stop")
                        piece += c.stream.stop_string if c.include_stop else ""
                    c.text += piece
                    if piece:
                        yield c, piece, False
        finally:
            for c in choices:
                c.request.cancel()  # a no-op for finished requests; frees the slot of any other
                c.request.unwatch(ready)

    # --- responses ------------------------------------------------------------------------------
    def token_text(self, token: int, as_id: bool = False) -> str:
        return f"token_id:{token}" if as_id else self.tokenizer.decode([token])

    def echo_text(self, prompt: list[int]) -> tuple[str, list[int]]:
        """The prompt's text (``echo``: its decode, as vLLM echoes token ids) and where each of its
        tokens begins in it: the characters an incremental UTF-8 decoder has given before the
        token's bytes, which is how the whole decode (errors="replace") reads them too."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        offsets, chars = [], 0
        for t in prompt:
            offsets.append(chars)
            chars += len(decoder.decode(self.tokenizer.token_bytes(t)))
        return self.tokenizer.decode(prompt), offsets

    def completion_logprobs(self, c: _Choice, start: int, prompt: list[int] | None = None) -> dict[str, Any] | None:
        """The legacy ``logprobs`` object of the choice's tokens so far (then forgotten: a stream
        sends each once), their ``text_offset`` indexing into the returned text, whose generated part
        begins at ``start``; with ``prompt`` (echo), the prompt's tokens first, the first one with
        null logprob and top_logprobs (nothing comes before it), as OpenAI's API gives them.

        ``top_logprobs`` holds the ``logprobs`` most likely tokens and the chosen one (OpenAI: "up to
        logprobs+1 elements"; vLLM does the same). A token holding only part of a UTF-8 character
        reads U+FFFD in ``tokens`` and ``top_logprobs`` (as vLLM shows it: such tokens share one key
        there), and its offset is where that character begins."""
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

        def add(token: int, logprob: float | None, top: list[tuple[int, float]] | None, offset: int) -> None:
            out["tokens"].append(self.token_text(token, c.as_token_ids))
            out["token_logprobs"].append(logprob)
            if top is not None:  # the chosen token last: its entry wins over another token of the same text
                top = [*top, (token, logprob)]  # (U+FFFD: parts of characters)
            out["top_logprobs"].append(None if top is None else {self.token_text(t, c.as_token_ids): lp
                                                                 for t, lp in top})
            out["text_offset"].append(offset)

        if prompt is not None:
            _, offsets = self.echo_text(prompt)
            add(prompt[0], None, None, offsets[0])
            for ev, offset in zip(c.prompt_logprobs or [], offsets[1:], strict=False):
                add(ev.token, ev.logprob, ev.top_logprobs or [], offset)
        for ev, offset in zip(c.logprobs, c.offsets, strict=True):
            add(ev.token, ev.logprob, ev.top_logprobs or [], start + offset)
        c.logprobs, c.offsets = [], []
        return out if out["tokens"] else None

    def chat_logprobs(self, evs: list[TokenEvent], as_token_ids: bool = False) -> dict[str, Any]:
        def entry(token: int, lp: float) -> dict[str, Any]:
            text = self.token_text(token, as_token_ids)
            # The token's own bytes (part of a character for some byte-level tokens, whose text is then
            # U+FFFD), as OpenAI gives them, so a client can join a split character back.
            return {"token": text, "logprob": lp, "bytes": list(self.tokenizer.token_bytes(token))}

        return {"content": [{**entry(ev.token, ev.logprob), "top_logprobs": [entry(t, lp) for t, lp in
                                                                             (ev.top_logprobs or [])]}
                            for ev in evs if ev.logprob is not None]}

    def usage(self, prompts: list[list[int]], choices: list[_Choice]) -> dict[str, int]:
        p = sum(len(ids) for ids in prompts)
        c = sum(ch.tokens for ch in choices)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


# Characters that JSON leaves raw (ensure_ascii=False) but Python's str.splitlines() reads as line
# ends: httpx's iter_lines() (openai's with_streaming_response ... iter_lines(), and clients built on
# it) and requests' iter_lines(decode_unicode=True) cut a "data:" line there, so its JSON no longer
# parses. Escaped (valid JSON, the same string once parsed), every SSE line holds one whole event.
_SSE_ESCAPES = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False).translate(_SSE_ESCAPES)}\n\n".encode()


async def _wait_disconnect(request: Request) -> None:
    """Return when the client has gone away (the body is read already, so the next message is that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _collect(server: _Server, request: Request, choices: list[_Choice], arrived: float) -> None:
    """Run the choices to the end, cancelling them all if the client disconnects first."""

    async def drain() -> None:
        async for _ in server.events(choices, arrived):
            pass

    work = asyncio.create_task(drain())
    gone = asyncio.create_task(_wait_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()  # the client left: events()'s finally cancels the engine requests
            with contextlib.suppress(asyncio.CancelledError):
                await work
    if work.cancelled():
        # Nobody reads an answer now; nginx's 499 ("client closed request") is what /metrics counts.
        # (work.result() raised CancelledError out of the handler: uvicorn logged "Exception in ASGI
        # application" and a 50-line traceback for every client that timed out.)
        raise APIError(499, "the client closed the connection before the answer was ready",
                       code="client_closed_request")
    work.result()


def _stream(server: _Server, request: Request, choices: list[_Choice], arrived: float,
            make_chunk: Callable[[_Choice, str, str | None], dict[str, Any]],
            first_chunks: list[dict[str, Any]], usage: Callable[[], dict[str, int]] | None,
            usage_chunk: Callable[[dict[str, int]], dict[str, Any]], obfuscate: bool = False) -> StreamingResponse:
    """An SSE response: ``first_chunks``, one chunk per piece of text, a final chunk per choice
    with its finish_reason, the usage chunk (``stream_options.include_usage``), ``[DONE]``;
    ``obfuscate`` (``stream_options.include_obfuscation``): each chunk padded by a random string."""
    def sse(obj: dict[str, Any]) -> bytes:
        return _sse({**obj, "obfuscation": secrets.token_urlsafe(1 + secrets.randbelow(24))} if obfuscate else obj)

    async def body() -> AsyncIterator[bytes]:
        # A client that leaves wakes the event loop of server.events, which then ends at once
        # (freeing the slots); checked once per wake-up, not raced against every token.
        ready = asyncio.Event()
        gone = asyncio.create_task(_wait_disconnect(request))
        gone.add_done_callback(lambda _: ready.set())
        gen = server.events(choices, arrived, ready, gone.done)
        try:
            for chunk in first_chunks:
                yield sse(chunk)
            try:
                async for c, piece, finished in gen:
                    if gone.done():
                        return
                    if piece or not finished:  # text, or the prompt's logprobs (echo)
                        yield sse(make_chunk(c, piece, None))
                    if finished:
                        yield sse(make_chunk(c, "", c.finish_reason))
            except APIError as e:
                yield _sse(e.body())
            if gone.done():
                return  # the client left: nobody reads the rest
            if usage is not None:
                yield sse(usage_chunk(usage()))
            yield b"data: [DONE]\n\n"
        finally:
            gone.cancel()
            for c in choices:  # first, without awaiting: anyio re-cancels every await in a cancelled scope
                c.request.cancel()
            await gen.aclose()  # (a no-op when it ended) cancels every engine request still running

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# --- the app ------------------------------------------------------------------------------------
def create_app(engine: Engine, tokenizer: Any, config: ServerConfig) -> FastAPI:
    """The FastAPI app over a started (or starting) ``engine``; ``tokenizer`` turns text into ids."""
    server = _Server(engine, tokenizer, config)
    prometheus_client.disable_created_metrics()  # no *_created series: they only clutter a scrape
    app = FastAPI(title="gpt2model", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error",
                        code="internal_error").response()

    app.add_middleware(_AuthAndCount, server=server)
    if config.allowed_origins:
        # Outermost (added last), as vLLM's: a browser's preflight OPTIONS carries no API key, and the
        # CORS headers go on every answer, errors included (else the page cannot read them).
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins), allow_credentials=False,
                           allow_methods=["*"], allow_headers=["*"],
                           # what a page's script may read besides the CORS-safelisted headers: the
                           # request id to report and the 429's back-off
                           expose_headers=["x-request-id", "retry-after"])

    @app.exception_handler(404)
    async def _not_found(request: Request, e: Exception) -> JSONResponse:
        # Name the fix: a client whose base_url lacks /v1 (POST /chat/completions) or repeats it
        # (/v1/v1/...) is told the path it meant; any other path gets the list of endpoints.
        path = request.url.path
        routes = {r.path: r.methods for r in app.routes if getattr(r, "methods", None)}
        meant = next((p for p in ("/v1" + path, re.sub(r"^(/v1)+/", "/v1/", path)) if p != path and p in routes), None)
        if meant is not None:
            hint = f": did you mean {meant}? (the OpenAI client's base_url is http://HOST:PORT/v1)"
        else:
            hint = " (endpoints: " + ", ".join(f"{m} {re.sub(r'{[^}]*}', '{id}', p)}" for p, ms in routes.items()
                                              for m in sorted(ms) if m != "HEAD") + ")"
        return APIError(404, f"no such endpoint: {request.method} {path}{hint}", code="not_found").response()

    @app.exception_handler(405)
    async def _bad_method(request: Request, e: Exception) -> JSONResponse:
        # RFC 9110: a 405 lists the methods the resource has (Starlette's exception carries them)
        allow = (getattr(e, "headers", None) or {}).get("Allow")
        return APIError(405, f"{request.method} is not allowed on {request.url.path}"
                             + (f" (allowed: {allow})" if allow else ""), code="method_not_allowed",
                        headers={"Allow": allow} if allow else None).response()

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: load balancers' and uptime checkers' probe
    async def health() -> JSONResponse:
        if server.shutting_down:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        error = server.start_error or engine.stats().get("error")
        if error is not None:
            return JSONResponse({"status": "error", "error": error}, status_code=503)
        if not engine.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    # GET resources answer HEAD too (RFC 9110: general-purpose servers MUST support both; uvicorn sends no body)
    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": config.created,
                                             "owned_by": "gpt2model", "max_model_len": server.context_length}]}

    @app.api_route("/v1/models/{model_id:path}", methods=["GET", "HEAD"])
    async def model_info(model_id: str) -> dict[str, Any]:
        if model_id == "":  # "/v1/models/" (a base URL with a trailing slash): the list
            return await models()
        if model_id != config.model_name:
            raise APIError(404, f"the model {model_id!r} does not exist: this server serves {config.model_name!r}",
                           param="model", code="model_not_found")
        return (await models())["data"][0]

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        req: TokenizeRequest = server.parse(TokenizeRequest, await server.read_json(request))
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of 'prompt' or 'messages'", param="prompt")
        ids = server.encode(req.prompt, "prompt", special=True) if req.prompt is not None \
            else server.chat_ids(req.messages, req.add_generation_prompt, req.continue_final_message)
        return {"tokens": ids, "count": len(ids), "max_model_len": server.context_length}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        req: DetokenizeRequest = server.parse(DetokenizeRequest, await server.read_json(request))
        bad = next((t for t in req.tokens if not 0 <= t < server.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is out of range: ids must be in [0, {server.vocab_size})",
                           param="tokens")
        return {"prompt": tokenizer.decode(req.tokens)}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        arrived = time.perf_counter()
        req: CompletionRequest = server.parse(CompletionRequest, await server.read_json(request))
        _check_noops(req)
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens=0 generates nothing: it is only allowed with echo=true (to score the "
                                "prompt, with logprobs); ask for at least 1 token", param="max_tokens",
                           code="invalid_value")
        prompts = server.encode_prompts(req.prompt)
        max_tokens = [server.max_tokens_for(len(ids), req.max_tokens, "max_tokens", "prompt") for ids in prompts]
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        # echo + logprobs: the prompt's logprobs too, from the same prefill (the head at every position).
        echo_logprobs = req.echo and req.logprobs is not None
        choices = server.submit(prompts, req, max_tokens, stop, req.logprobs,
                                req.logprobs if echo_logprobs else None)
        server.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo = [server.echo_text(ids)[0] if req.echo else "" for ids in prompts]
        base = {"id": rid, "object": "text_completion", "created": created, "model": config.model_name,
                "system_fingerprint": server.fingerprint}

        if req.stream:
            def chunk(c: _Choice, piece: str, finish: str | None) -> dict[str, Any]:
                lp = None
                if not piece and finish is None:  # the prompt's logprobs arrived: the echo chunk carries them
                    piece, lp = echo[c.prompt_index], server.completion_logprobs(c, 0, prompts[c.prompt_index])
                elif req.logprobs is not None:  # the final chunk: of tokens that added no text (a stop)
                    lp = server.completion_logprobs(c, len(echo[c.prompt_index]))
                out = {**base, "choices": [{"index": c.index, "text": piece, "logprobs": lp, "finish_reason": finish}]}
                if include_usage:
                    out["usage"] = None
                return out

            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            first = [{**base, "choices": [{"index": c.index, "text": echo[c.prompt_index], "logprobs": None,
                                           "finish_reason": None}], **({"usage": None} if include_usage else {})}
                     for c in choices if req.echo and not echo_logprobs]  # with logprobs, it waits for the prompt's
            return _stream(server, request, choices, arrived, chunk, first,
                           (lambda: server.usage(prompts, choices)) if include_usage else None,
                           lambda u: {**base, "choices": [], "usage": u},
                           bool(req.stream_options and req.stream_options.include_obfuscation))

        await _collect(server, request, choices, arrived)
        return JSONResponse({**base, "choices": [
            {"index": c.index, "text": echo[c.prompt_index] + c.text,
             "logprobs": server.completion_logprobs(c, len(echo[c.prompt_index]),
                                                    prompts[c.prompt_index] if req.echo else None)
             if req.logprobs is not None else None,
             "finish_reason": c.finish_reason} for c in choices], "usage": server.usage(prompts, choices)})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        arrived = time.perf_counter()
        req: ChatRequest = server.parse(ChatRequest, await server.read_json(request))
        _check_noops(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        if req.max_tokens is not None and req.max_completion_tokens is not None \
                and req.max_tokens != req.max_completion_tokens:
            raise APIError(400, "max_tokens and max_completion_tokens disagree: give one", param="max_tokens")
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        prompts = [server.chat_ids(req.messages, req.add_generation_prompt, req.continue_final_message)]
        if not prompts[0]:
            raise APIError(400, "the messages render to an empty prompt", param="messages")
        max_tokens = [server.max_tokens_for(len(prompts[0]), asked, param, "messages")]
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if config.chat_template == DEFAULT_CHAT_TEMPLATE:
            stop += [s for s in config.chat_stop if s not in stop]
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        choices = server.submit(prompts, req, max_tokens, stop, logprobs)
        server.metrics.prompt_tokens.inc(len(prompts[0]))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "chat.completion.chunk" if req.stream else "chat.completion",
                "created": created, "model": config.model_name, "system_fingerprint": server.fingerprint}

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(c: _Choice, piece: str, finish: str | None) -> dict[str, Any]:
                lp = None
                if req.logprobs and (finish is None or c.logprobs):  # (the final chunk: tokens without text)
                    lp = server.chat_logprobs(c.logprobs, c.as_token_ids)
                    c.logprobs, c.offsets = [], []
                delta = {"content": piece} if finish is None else {}
                out = {**base, "choices": [{"index": c.index, "delta": delta, "logprobs": lp,
                                            "finish_reason": finish}]}
                if include_usage:
                    out["usage"] = None
                return out

            first = [{**base, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}],
                      **({"usage": None} if include_usage else {})} for c in choices]
            return _stream(server, request, choices, arrived, chunk, first,
                           (lambda: server.usage(prompts, choices)) if include_usage else None,
                           lambda u: {**base, "choices": [], "usage": u},
                           bool(req.stream_options and req.stream_options.include_obfuscation))

        await _collect(server, request, choices, arrived)
        return JSONResponse({**base, "choices": [
            {"index": c.index, "message": {"role": "assistant", "content": c.text},
             "logprobs": server.chat_logprobs(c.logprobs, c.as_token_ids) if req.logprobs else None,
             "finish_reason": c.finish_reason} for c in choices], "usage": server.usage(prompts, choices)})

    return app


class _AuthAndCount:
    """ASGI middleware: the API key check (the OpenAI API under /v1, as vLLM does: /health, /metrics
    and /tokenize stay open to probes and scrapers), response counts by status, and an
    ``x-request-id`` header on every response, as OpenAI's API sends (openai-python's
    ``_request_id``): the client's own ``X-Request-Id`` when it sent a plain one (vLLM's rule), else
    a fresh id, for matching a client's log line to the server's.

    Plain ASGI rather than ``@app.middleware``: Starlette's BaseHTTPMiddleware wraps ``receive``,
    which hides client disconnects from streaming responses."""

    def __init__(self, app: Any, server: _Server) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        label = path if path in _ROUTES else "other"
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"")
        request_id = given if 0 < len(given) <= 128 and all(33 <= c <= 126 for c in given) \
            else f"req_{uuid.uuid4().hex}".encode()

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.server.metrics.responses.labels(label, str(message["status"])).inc()
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id)]}
            await send(message)

        key = self.server.config.api_key
        if key is not None and (path == "/v1" or path.startswith("/v1/")):
            auth = headers.get(b"authorization", b"")
            scheme, _, given_key = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given_key.strip(), key.encode()):
                response = APIError(401, "missing or incorrect API key: send the header 'Authorization: Bearer "
                                         "KEY'", code="invalid_api_key",
                                    # RFC 9110: a 401 names the scheme it wants
                                    headers={"WWW-Authenticate": "Bearer"}).response()
                return await response(scope, receive, counting_send)

        await self.app(scope, receive, counting_send)


_ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/tokenize",
           "/detokenize"}


# --- running it ----------------------------------------------------------------------------------
def read_chat_template(path: str | Path) -> str:
    """A ``--chat-template`` file's text. A byte-order mark at its start (Windows editors write one)
    is dropped: else it would be text the template puts before every prompt."""
    return Path(path).read_text(encoding="utf-8-sig")


def base_url(host: str, port: int) -> str:
    """The URL of a server listening on ``host``:``port`` (an IPv6 address in brackets, RFC 3986:
    "http://::1:8000" is no URL a client can open)."""
    return f"http://[{host}]:{port}" if ":" in host and not host.startswith("[") else f"http://{host}:{port}"


# The server process's GIL switch interval (Python's default: 5 ms). The inference thread releases
# the GIL inside every torch op and needs it back after each one (hundreds per decode step); while
# the HTTP thread runs Python (parsing, SSE chunks) it waits until that thread yields, at the
# latest after the switch interval. 0.5 ms measured +3% tokens/s and -10% TTFT p50 at 8 streaming
# clients (6x384 BPE, 1 compute thread, interleaved x3, both fp32 and f16 weights).
GIL_SWITCH_INTERVAL = 0.0005
# At shutdown, how long after the requests' deadline (--request-timeout) uvicorn waits for the
# answers of the requests the engine cancelled then, before it cuts connections.
SHUTDOWN_GRACE_SECONDS = 3

def serve(model: Any, tokenizer: Any, *, host: str = "127.0.0.1", port: int = 8000, model_name: str = "gpt2",
          api_key: str | None = None, chat_template: str | Path | None = None, max_batch: int = 8,
          max_queue: int = 64, compile: bool = False, request_timeout: float = 30.0,
          max_prefill_tokens: int | None = None, allowed_origins: Sequence[str] = ("*",),
          chat_template_text: str | None = None, eos_token_ids: Sequence[int] = (),
          ready: Callable[[str], None] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; returns 0 after a graceful shutdown.

    ``chat_template`` is a template file, ``chat_template_text`` a template itself (one of them at
    most; neither: the built-in transcript). ``eos_token_ids``: ids beside end-of-text that end a
    choice (``find_eos_ids``). Shutdown: stop accepting connections, let running
    requests finish for up to ``request_timeout`` seconds, then cancel the rest; exit 0."""
    if isinstance(request_timeout, bool) or not isinstance(request_timeout, (int, float)) \
            or not math.isfinite(request_timeout) or request_timeout < 0:
        raise ValueError(f"request_timeout (--request-timeout) must be a finite number of seconds >= 0, "
                         f"got {request_timeout!r}")
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    if chat_template is not None and chat_template_text is not None:
        raise ValueError("give chat_template (a file) or chat_template_text, not both")
    template = chat_template_text if chat_template_text is not None else \
        DEFAULT_CHAT_TEMPLATE if chat_template is None else read_chat_template(chat_template)
    engine = Engine(model, max_batch=max_batch, max_queue=max_queue, compile=compile,
                    max_prefill_tokens=max_prefill_tokens, vocab_limit=tokenizer.vocab_size)
    config = ServerConfig(model_name=model_name, api_key=api_key, chat_template=template,
                          request_timeout=request_timeout, allowed_origins=tuple(allowed_origins),
                          eos_token_ids=tuple(eos_token_ids))
    app = create_app(engine, tokenizer, config)
    state: _Server = app.state.server

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Warm up off the event loop, so /health answers 503 meanwhile.
        def start() -> None:
            try:
                engine.start()
            except Exception as e:  # shown by /health; the server cannot generate
                state.start_error = f"{type(e).__name__}: {e}"
                print(f"gpt2 serve: the engine failed to start: {state.start_error}", file=sys.stderr)

        threading.Thread(target=start, name="gpt2-engine-start", daemon=True).start()
        yield
        state.shutting_down = True
        await asyncio.to_thread(engine.shutdown, 1.0)

    app.router.lifespan_context = lifespan
    # uvicorn's own deadline comes after ours (see _GracefulServer.shutdown): a request the engine
    # cancels at request_timeout still gets its answer written; uvicorn cuts only what is stuck
    # beyond that (a client that stopped reading).
    uv_config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                               timeout_graceful_shutdown=math.ceil(request_timeout) + SHUTDOWN_GRACE_SECONDS,
                               lifespan="on")
    server = _GracefulServer(uv_config, state)
    if ready is not None:
        server.on_started = lambda: ready(base_url(host, port))
    server.run()
    return 0


class _GracefulServer(uvicorn.Server):
    """uvicorn, but a SIGTERM ends in a normal exit (status 0) instead of re-raising the signal."""

    def __init__(self, config: uvicorn.Config, state: _Server) -> None:
        super().__init__(config)
        self.state = state
        self.on_started: Callable[[], None] | None = None

    @contextlib.contextmanager
    def capture_signals(self):  # noqa: ANN202 - a context manager
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _on_signal(self, sig: int, frame: Any) -> None:
        self.state.shutting_down = True  # /health -> 503 and no new requests
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting
        self.should_exit = True

    async def shutdown(self, sockets: Any = None) -> None:
        # Running and queued requests get request_timeout seconds; then the ENGINE cancels what is
        # left, so each handler answers while its connection is open (a 503 in OpenAI's shape, or an
        # error event and [DONE] in a stream). Left to uvicorn's deadline alone, the requests were
        # cut mid-way: a bare "500 Internal Server Error", a stream broken without [DONE], and a
        # traceback per request in the log.
        # (A daemon thread: after a second Ctrl-C nobody waits for it.)
        threading.Thread(target=self.state.engine.shutdown, args=(self.state.config.request_timeout,),
                         name="gpt2-engine-drain", daemon=True).start()
        await super().shutdown(sockets)

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.on_started is not None and self.started:
            self.on_started()
