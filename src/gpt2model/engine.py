"""The serving engine: continuous batching over the rows ("slots") of one static KV cache.

One inference thread owns the model and a KV cache of ``max_batch`` rows. Requests wait in a
bounded queue (:class:`QueueFullError` past ``max_queue``); a waiting request takes the lowest
free slot, and every engine iteration then runs (1) at most one prefill forward and (2) one
decode step:

1. The prefill forward takes the prompts that wait in their slots, oldest first, up to
   ``max_prefill_tokens`` padded tokens (rows x longest chunk), all in ONE forward: each row
   writes its own cache row at its own positions (rows left-padded to a common length; the
   padding writes only slots past the row's own tokens, which nothing reads before they are
   written again). A prompt longer than the budget is prefilled in chunks over several
   iterations (chunked prefill, as vLLM and llama.cpp do), so the running streams get a token
   between two chunks instead of waiting for a whole long prompt. A row whose prompt is complete
   draws its first token from the forward's last logits.
2. The decode step advances every row that has its first token, each at its own cache position,
   with its own sampling settings and seed. A finished or cancelled row frees its slot at once.

When rows are decoding and prompts wait, (1) and (2) are ONE forward (eager mode; a "mixed"
step, as llama.cpp and vLLM batch them: :class:`gpt2model.model.Part`): the decode rows' tokens
and the prefill chunks go through each linear layer together, reading its weights once, and a
new prompt's first token comes out with the running rows' next ones. Traced at 8 closed-loop
clients (6x384 BPE, 1 thread): a request's time to first token is ~3 ms of HTTP, the wait for
the forward under way (~30-45 ms p50) and its own forward (~45-55 ms); the engine adds <1 ms.

The engine knows nothing of HTTP or of text: token ids in, :class:`TokenEvent` /
:class:`FinishEvent` out (stop strings are :class:`gpt2model.generate.TextStream`'s job, in the
caller, which cancels the request when its text stops).

It runs the same decode step (:func:`gpt2model.generate.decode_step`), prefill and sampling
function as :func:`gpt2model.generate.generate`, so a request gives exactly the tokens that
``model.generate(prompt, seed=S, ...)`` gives for it alone (greedy or seeded), however many
requests run or are prefilled beside it: every row draws from its own seed and token index,
never from shared generator state.

Decode shapes: eagerly, a step runs over cache rows ``0 .. highest decoding row`` (free slots are
taken lowest first) and attends to the filled cache positions only; with ``compile=True`` the
step always runs over all ``max_batch`` rows and the whole cache, so one graph (on CUDA: one
CUDA graph) serves every step.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .generate import (
    GREEDY_TEMPERATURE,
    check_sampling_args,
    check_vocab_limit,
    decode_step,
    limit_vocab,
    new_seed,
    note_compile_failure,
    prefill,
    run_compiled_step,
    sample_logits,
    seed_tensor,
    step_for,
)
from .model import Part, check_token_ids

if TYPE_CHECKING:
    from .model import GPT

_Waiter = tuple[asyncio.AbstractEventLoop, asyncio.Event]  # an asyncio reader: its loop and its wake-up
MAX_LOGPROBS = 20  # top-k logprobs per token at most (vLLM's default limit)
CPU_MAX_PREFILL_TOKENS = 64  # Engine's default prefill budget off CUDA (see Engine.__init__)


@dataclass
class SamplingParams:
    """How one request is sampled. ``temperature=0`` is greedy (exact argmax). ``seed=None``: the
    engine draws one; the same seed gives the same tokens alone or batched (and the tokens
    ``model.generate(prompt, seed=seed)`` gives). ``logprobs=k``: each token comes with its
    log-probability under the model (log-softmax of the raw logits, before temperature and
    filters) and the ``k`` most likely tokens with theirs. ``prompt_logprobs=k``: the same for
    every prompt token after the first, in one :class:`PromptEvent` before the first token (the
    prefill then applies the LM head at every prompt position). ``max_tokens=0`` only prefills
    (to score the prompt with ``prompt_logprobs``; the prompt may then fill the whole context) and
    finishes with ``"length"``. Generating one of ``stop_token_ids`` (e.g. end-of-text) ends the
    request with reason ``"stop"``; that token is emitted first (with its logprobs), as vLLM
    counts and lists it. ``logit_bias`` ({token id: bias in [-100, 100]}), ``presence_penalty`` and
    ``frequency_penalty`` (in [-2, 2]) have OpenAI's meanings: before every draw the logit of
    token ``j`` becomes ``logit + logit_bias[j] - presence_penalty * (c[j] > 0) -
    frequency_penalty * c[j]``, ``c[j]`` counting ``j`` among the tokens this request generated so
    far (the prompt does not count, as in vLLM); greedy rows too. Logprobs stay those of the raw
    logits. ``min_tokens`` (vLLM's): the ``stop_token_ids`` cannot be drawn before that many tokens.
    ``repetition_penalty`` (> 0, 1 = off) and ``min_p`` (in [0, 1], 0 = off) are HF's and vLLM's:
    the raw logit of every token in the prompt or generated so far is divided by the penalty when
    positive, multiplied when negative (greedy rows too); after temperature, top-k and top-p only
    tokens at least ``min_p`` times as likely as the most likely one stay (see
    :func:`gpt2model.generate.sample_logits`)."""

    max_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    logprobs: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    min_p: float | None = 0.0

    def penalized(self) -> bool:
        """Whether the logits get a bias (``logit_bias``, a penalty, ``min_tokens``) before each draw."""
        return (bool(self.logit_bias) or self.presence_penalty != 0 or self.frequency_penalty != 0
                or (self.min_tokens > 0 and bool(self.stop_token_ids)))


class QueueFullError(RuntimeError):
    """``submit`` found ``max_queue`` requests already waiting (HTTP 429: retry later)."""


@dataclass
class TokenEvent:
    """One generated token (with its logprob and top logprobs when the request asked for them)."""

    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class PromptEvent:
    """The prompt's logprobs (``SamplingParams.prompt_logprobs``): ``tokens[i]`` is prompt token
    ``i + 1`` with its logprob given the tokens before it (the first prompt token has none)."""

    tokens: list[TokenEvent]


@dataclass
class FinishEvent:
    """The last event of every request: ``reason`` is ``"stop"`` (a stop token), ``"length"``
    (``max_tokens`` reached), ``"cancelled"`` or ``"error"`` (then ``error`` says what)."""

    reason: str
    error: str | None = None


class Request:
    """A submitted request: read its events (``events()`` from a thread or ``aevents()`` from
    asyncio; one reader), ``cancel()`` it from anywhere. Ends with exactly one FinishEvent."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, wake: threading.Condition) -> None:
        self.id = uuid.uuid4().hex
        self.prompt_ids = prompt_ids
        self.params = params
        self.submitted = time.monotonic()
        self.finish_reason: str | None = None
        self._engine_wake = wake
        self._cancelled = threading.Event()
        self._cancel_reason = "cancelled"  # the FinishEvent's reason once cancelled (see cancel)
        self._cond = threading.Condition()
        self._events: deque[TokenEvent | PromptEvent | FinishEvent] = deque()
        self._waiters: list[_Waiter] = []

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the engine to stop this request (thread-safe); its slot is freed at the next step.
        ``reason="stop"``: the caller's own stop rule ended it (a stop string in its text): it
        finishes, and is counted in ``stats()["finished"]``, as ``"stop"``, not ``"cancelled"``."""
        if reason not in ("cancelled", "stop"):
            raise ValueError(f"reason must be 'cancelled' or 'stop', got {reason!r}")
        if not self._cancelled.is_set():
            self._cancel_reason = reason
        self._cancelled.set()
        with self._engine_wake:
            self._engine_wake.notify_all()

    def _emit(self, event: TokenEvent | PromptEvent | FinishEvent) -> list[_Waiter]:
        """Queue ``event`` and wake blocking readers; returns the asyncio readers to wake (the
        engine wakes each event loop once per step, not once per token and request)."""
        with self._cond:
            if self.finish_reason is not None:
                return []  # exactly one FinishEvent, nothing after it
            if isinstance(event, FinishEvent):
                self.finish_reason = event.reason
            self._events.append(event)
            self._cond.notify_all()
            return list(self._waiters)

    def events(self) -> Iterator[TokenEvent | PromptEvent | FinishEvent]:
        """Blocking iterator over the events, ending after the FinishEvent."""
        while True:
            with self._cond:
                while not self._events:
                    self._cond.wait()
                event = self._events.popleft()
            yield event
            if isinstance(event, FinishEvent):
                return

    async def aevents(self) -> AsyncIterator[TokenEvent | PromptEvent | FinishEvent]:
        """The events for asyncio, woken from the engine thread with ``call_soon_threadsafe``."""
        ready = asyncio.Event()
        self.watch(ready)
        try:
            while True:
                ready.clear()  # before looking, so an event emitted after the look sets it again
                batch = self.take_events()
                if not batch:
                    await ready.wait()
                    continue
                for event in batch:
                    yield event
                    if isinstance(event, FinishEvent):
                        return
        finally:
            self.unwatch(ready)

    def watch(self, ready: asyncio.Event) -> None:
        """Have the engine set ``ready`` (in the calling event loop) after it posts events for this
        request; several requests may share one ``ready``, so one coroutine can follow them all
        without a task per request (read with :meth:`take_events`; clear ``ready`` before taking,
        so an event posted after the take sets it again). End with :meth:`unwatch`."""
        with self._cond:
            self._waiters.append((asyncio.get_running_loop(), ready))

    def unwatch(self, ready: asyncio.Event) -> None:
        with self._cond:
            self._waiters = [w for w in self._waiters if w[1] is not ready]

    def take_events(self) -> list[TokenEvent | PromptEvent | FinishEvent]:
        """The events posted since the last take, oldest first, without blocking (for a reader
        that :meth:`watch`-es this request; the FinishEvent is the last there will be)."""
        with self._cond:
            batch = list(self._events)
            self._events.clear()
        return batch


def _logprob_events(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[TokenEvent]:
    """``tokens[i]`` with its logprob under ``logits[i]`` (log-softmax of the raw logits) and the
    ``k`` most likely tokens with theirs."""
    logp = logits.float().log_softmax(dim=-1)
    chosen = logp.gather(1, tokens.to(logp.device).view(-1, 1))[:, 0].tolist()
    k = min(k, logp.size(-1))  # a vocabulary smaller than k (a tiny char model) has fewer to list
    top = logp.topk(k, dim=-1) if k else None
    values, ids = (top.values.tolist(), top.indices.tolist()) if top is not None else ([[]] * len(chosen),) * 2
    return [TokenEvent(int(t), lp, list(zip(i, v, strict=True)))
            for t, lp, v, i in zip(tokens.tolist(), chosen, values, ids, strict=True)]


def _plain(value: Any) -> Any:
    """``value`` with numpy integers and floats (inside tuples, lists and dict keys and values too) as
    Python's int and float; numpy bools stay (an error where a number is asked for)."""
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    return value


def _set_all(events: list[asyncio.Event]) -> None:
    for event in events:
        event.set()


@dataclass
class _Slot:
    """A request's cache row: ``pos`` is the next cache position to write (= tokens in the row;
    while ``decoding`` is False, the prompt tokens prefilled so far). ``sampled`` / ``top_k`` /
    ``top_p`` / ``min_p``: the row's settings, also in the engine's per-slot tensors once it decodes."""

    request: Request
    pos: int = 0
    decoding: bool = False  # the prompt is in the cache and the first token was drawn
    seed: int = 0  # the request's seed, or one the engine drew for it
    generated: int = 0
    sampled: bool = False
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    prompt_events: list[TokenEvent] | None = None  # prompt logprobs gathered chunk by chunk
    seen: set[int] | None = None  # tokens generated so far, for the presence penalty


def _rows_in_use(table: torch.Tensor | None, in_use: set[int], rows: Sequence[int] | slice) -> torch.Tensor | None:
    """Rows ``rows`` (a slice ``:hi`` or indices) of a per-slot ``table`` whose rows ``in_use`` hold
    something, or None when none of ``rows`` is in use (the sampling path, and graph, without it)."""
    if not in_use or table is None:
        return None
    if isinstance(rows, slice):
        return table[rows] if any(b < rows.stop for b in in_use) else None
    return table[list(rows)] if in_use.intersection(rows) else None

class Engine:
    """Continuous batching for one model (see the module docstring). ``start()`` spawns the
    inference thread; ``ready`` is set once it has warmed up."""

    def __init__(self, model: GPT, *, max_batch: int = 8, max_queue: int = 64, compile: bool = False,
                 max_prefill_tokens: int | None = None, vocab_limit: int | None = None) -> None:
        """``vocab_limit`` (the tokenizer's ``vocab_size``): ids the engine may draw, list in
        logprobs and take in prompts, stop ids and logit_bias are those below it (and below the
        model's ``vocab_size``): a model with more rows than its tokenizer (a nanoGPT export padded
        to 50,304 rows for GPT-2's 50,257 tokens) never emits an id nobody can decode
        (:func:`gpt2model.generate.limit_vocab`).

        ``max_prefill_tokens``: the most prompt tokens one prefill forward takes (rows times the
        longest chunk, padding included); longer prompts are prefilled in chunks of that size, one
        chunk per engine iteration, so running streams wait at most one such forward per token.
        Default: 2048 on CUDA (vLLM's default budget: a prefill there costs little), 64 elsewhere
        (a CPU prefill is compute-bound, 40 prompt tokens cost about one 8-row decode step of the
        6x384 BPE model, so batching prompts saves little; one ~40-token prompt per (mixed) forward
        spreads the arrivals out and keeps each forward short: 8 clients, 1 thread, interleaved x2,
        64 vs 128: TTFT p50 63-73 vs 87-92 ms, inter-token p99 37-43 vs 52-58 ms, same tokens/s
        (+-2%), TTFT p99 ~10% higher; 128 vs 512 before the mixed step: TTFT p50 159 vs 269 ms)."""
        if max_prefill_tokens is None:
            max_prefill_tokens = 2048 if model.device.type == "cuda" else CPU_MAX_PREFILL_TOKENS
        for name, value, low in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0),
                                 ("max_prefill_tokens", max_prefill_tokens, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        check_vocab_limit(vocab_limit)
        self.model = model
        V = model.config.vocab_size
        self.vocab = V if vocab_limit is None else min(vocab_limit, V)  # the ids it draws and accepts
        self._limit = self.vocab if self.vocab < V else None  # None: every row (the step without a slice)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.compile = compile
        self.max_prefill_tokens = max_prefill_tokens
        self.ready = threading.Event()
        self._wake = threading.Condition()  # guards the queue and the flags below
        self._queue: deque[Request] = deque()
        self._accepting = True
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._slots: list[_Slot | None] = [None] * max_batch
        self._prefilling: list[int] = []  # slots whose prompt is not (all) in the cache yet, oldest first
        self._running = 0
        self._free_slots = max_batch  # slots neither running nor claimed (guarded by _wake)
        self._counts = dict(submitted=0, tokens_generated=0, steps=0, prefills=0, step_rows=0,
                            prefill_forwards=0, prefill_tokens=0, mixed_steps=0)
        self._seconds = dict(step_seconds=0.0, prefill_seconds=0.0, idle_seconds=0.0)  # inference thread time in each
        self._finished = dict.fromkeys(("stop", "length", "cancelled", "error"), 0)
        self._fatal: str | None = None
        # asyncio readers to wake, by event loop: woken once per loop after each admission round
        # and step (a self-pipe write per token and request cost ~5% of the engine thread).
        self._to_wake: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}

    # --- the public side (any thread) -------------------------------------------------------------
    def start(self) -> None:
        """Spawn the inference thread (it allocates the cache and warms up, then sets ``ready``)."""
        if self._thread is not None:
            raise RuntimeError("the engine is already started")
        self._thread = threading.Thread(target=self._run, name="gpt2model-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams) -> Request:
        """Queue a request; ``ValueError`` names what is wrong with it, ``QueueFullError`` when
        ``max_queue`` requests already wait beyond the free slots, ``RuntimeError`` once shutting
        down (or when the engine failed to start). Requests submitted before :meth:`start` wait in
        the queue until it is called: nothing runs them before then."""
        prompt, params = self._check(prompt_ids, params)
        request = Request(prompt, params, self._wake)
        with self._wake:
            if not self._accepting or self._fatal is not None:
                raise RuntimeError(f"the engine is not accepting requests ({self._fatal or 'shutting down'})")
            # Free slots the inference thread has not claimed yet count as room: a burst of requests
            # onto an idle engine is not refused while slots wait for their next admission.
            if len(self._queue) >= self.max_queue + self._free_slots:
                raise QueueFullError(f"{len(self._queue)} requests are already waiting (max_queue {self.max_queue}); "
                                     f"retry later")
            self._queue.append(request)
            self._counts["submitted"] += 1
            self._wake.notify_all()
        return request

    def shutdown(self, timeout: float) -> None:
        """Stop accepting; let queued and running requests finish for up to ``timeout`` seconds,
        then cancel the rest and stop the thread (the model's KV cache is freed)."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._wake:
            self._accepting = False
            self._wake.notify_all()
            while self._thread is not None and self._thread.is_alive() and (self._queue or self._running):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wake.wait(min(left, 0.05))
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(max(5.0, deadline - time.monotonic()))
        else:
            self._cancel_all()

    def stats(self) -> dict[str, Any]:
        """Counters for monitoring: requests ``running`` and ``queued`` now, ``tokens_generated``,
        ``steps`` (decode steps), ``step_rows`` (active rows summed over steps: / ``steps`` = the
        mean batch), ``prefills``, ``step_seconds`` / ``prefill_seconds`` / ``idle_seconds`` (time
        the inference thread spent in each, idle: with no request), ``prefill_forwards``
        (forwards that ran prompt tokens: several prompts go in one, a long prompt takes
        several), ``prefill_tokens`` (prompt tokens prefilled, padding not counted),
        ``submitted`` and ``finished`` by reason."""
        with self._wake:
            return dict(running=self._running, queued=len(self._queue), max_batch=self.max_batch,
                        max_queue=self.max_queue, ready=self.ready.is_set(), error=self._fatal,
                        **self._counts, **self._seconds, finished=dict(self._finished))

    def _check(self, prompt_ids: Sequence[int], params: SamplingParams) -> tuple[list[int], SamplingParams]:
        """The prompt as a list of ints and the params with numpy numbers as Python's (a seed from
        np.random, a top_k from an array: "seed must be an integer, got np.int64(5)" named no
        problem), or a ValueError naming what is wrong."""
        cfg = self.model.config
        V = self.vocab
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        params = replace(params, **{f.name: _plain(getattr(params, f.name)) for f in fields(params)})
        if isinstance(prompt_ids, (torch.Tensor, np.ndarray)) and prompt_ids.ndim != 1:
            # a (1, T) batch as generate() takes it: one request is one row
            raise ValueError(f"the prompt must be a list of token ids or a 1-D tensor of them, got a "
                             f"{type(prompt_ids).__name__} of shape {tuple(prompt_ids.shape)}: submit each row as "
                             f"its own request")
        if (isinstance(prompt_ids, torch.Tensor) and not prompt_ids.is_floating_point()) \
                or (isinstance(prompt_ids, np.ndarray) and prompt_ids.dtype.kind in "iu"):
            prompt_ids = prompt_ids.tolist()  # what encode_batch (uint32 arrays) and a (T,) id tensor hold
        if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, Sequence) \
                or any(isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)) for t in prompt_ids):
            # (numpy integers are ids too: list(encode_batch(...)[0]) holds np.uint32, which is no int)
            raise ValueError("the prompt must be a list of token ids (integers); encode text with the tokenizer")
        prompt = [int(t) for t in prompt_ids]
        check_token_ids(torch.tensor(prompt, dtype=torch.long), cfg.vocab_size, ndim=1, name="the prompt")
        if self._limit is not None and max(prompt) >= V:  # a padding row: no token of the tokenizer
            raise ValueError(f"the prompt holds token id {max(prompt)}, past the tokenizer's {V} tokens (the model's "
                             f"rows from {V} on are padding): encode the prompt with the model's tokenizer")
        if isinstance(params.max_tokens, bool) or not isinstance(params.max_tokens, int) or params.max_tokens < 0:
            raise ValueError(f"max_tokens must be an integer >= 0 (0: prompt only), got {params.max_tokens!r}")
        check_sampling_args(params.max_tokens, params.temperature, params.top_k, params.top_p,
                            repetition_penalty=params.repetition_penalty, min_p=params.min_p)
        if len(prompt) + params.max_tokens > cfg.context_length:
            raise ValueError(f"the prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
                             f"model's context length {cfg.context_length}: shorten the prompt or lower max_tokens")
        if params.seed is not None and (isinstance(params.seed, bool) or not isinstance(params.seed, int)):
            raise ValueError(f"seed must be an integer, got {params.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {k!r}")
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V
               for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids in [0, {V}), "
                             f"got {params.stop_token_ids!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(params, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -2.0 <= v <= 2.0:
                raise ValueError(f"{name} must be a number in [-2, 2], got {v!r}")
        if isinstance(params.min_tokens, bool) or not isinstance(params.min_tokens, int) \
                or not 0 <= params.min_tokens <= params.max_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens={params.max_tokens}], "
                             f"got {params.min_tokens!r}")
        for t, v in (params.logit_bias or {}).items():
            # (vLLM too refuses an out-of-vocabulary logit_bias id, rather than ignoring it)
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V:
                raise ValueError(f"logit_bias keys must be token ids in [0, {V}), got {t!r}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100.0 <= v <= 100.0:
                raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {v!r} for token {t}")
        return prompt, params

    # --- the inference thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._setup()
        except Exception as e:  # noqa: BLE001 - report it; requests must not wait forever
            with self._wake:
                self._fatal = f"the engine failed to start: {type(e).__name__}: {e}"
            self._cancel_all(reason="error", error=self._fatal)
            return
        self.ready.set()
        try:
            while True:
                with self._wake:
                    if not self._stopping and not self._queue and not self._running:
                        t0 = time.perf_counter()
                        while not self._stopping and not self._queue and not self._running:
                            self._wake.wait()
                        self._seconds["idle_seconds"] += time.perf_counter() - t0
                    if self._stopping:
                        break
                    self._take_admissible()
                self._drop_cancelled()
                decoding = any(s is not None and s.decoding for s in self._slots)
                if self._prefilling and decoding and not self.compile and self._mixed_round():
                    pass  # prompts and the running rows' tokens went through one forward
                else:
                    if self._prefilling:
                        self._prefill_round()
                        self._wake_readers()  # the first tokens go out before the decode step runs
                    if any(s is not None and s.decoding for s in self._slots):
                        self._step()
                self._wake_readers()
        except Exception as e:  # noqa: BLE001 - a bug outside one request's step: nobody would ever be served
            # Fail loudly instead: every request ends with "error", submit() refuses (HTTP 503), and
            # stats()["error"] says why (GET /health then answers 503).
            with self._wake:
                self._fatal = f"the inference thread failed: {type(e).__name__}: {e}"
            print(f"gpt2model engine: {self._fatal}\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            self._cancel_all(reason="error", error=self._fatal)
        finally:
            self._cancel_all()
            self.model.clear_cache()

    def _setup(self) -> None:
        m = self.model
        m.eval()
        B, C, device = self.max_batch, m.config.context_length, m.device
        m.setup_cache(B, C)
        self._check_inputs = m.check_inputs
        m.check_inputs = False  # ids are checked at submit; the per-forward check syncs the device
        self._tokens = torch.zeros(B, 1, dtype=torch.long, device=device)
        self._pos = torch.zeros(B, 1, dtype=torch.long, device=device)
        self._mask = torch.full((B, 1, 1, C), float("-inf"), dtype=m.dtype, device=device)
        self._mask[..., 0] = 0.0  # free rows attend to slot 0: never a fully masked (NaN) row
        # Each slot's sampling settings live on the device, written when a request is admitted
        # (free rows: greedy, no filters), so a step builds no tensors from Python lists; ``steps``
        # (the index of the token each row draws next) advances in place after every step.
        self._temperature = torch.zeros(B, device=device)
        self._top_k = torch.zeros(B, dtype=torch.long, device=device)  # <= 0: no top-k filter
        self._top_p = torch.ones(B, device=device)  # >= 1: no nucleus filter
        self._min_p = torch.zeros(B, device=device)  # 0: no min-p filter
        self._seeds = torch.zeros(B, dtype=torch.long, device=device)
        self._steps = torch.zeros(B, dtype=torch.long, device=device)
        # Rows with a logit bias or penalties (SamplingParams.penalized) add their row of this
        # (B, V) tensor to the logits before each draw; made at the first such request. A row's
        # penalties change one entry per generated token, so no counts are rebuilt per step.
        self._bias: torch.Tensor | None = None
        self._biased: set[int] = set()
        # Rows with a repetition penalty: their row of these (B, V) factors (the penalty at the ids
        # of the prompt and of each generated token, 1 elsewhere) scales the raw logits before each
        # draw; made at the first such request, a row reset to 1 when its slot frees.
        self._penalty: torch.Tensor | None = None
        self._repeating: set[int] = set()
        self._step_fn = step_for(m, self.compile)
        self.compile = self._step_fn is not decode_step
        # Warm up (and compile) with a one-token request in slot 0, then forget it.
        with torch.no_grad():
            prefill(m, self._tokens[:1], self._pos[0, :1].clone(), None, cache_row=0)
            self._decode(B if self.compile else 1, greedy_only=True)
        self._pos.zero_()

    def _take_admissible(self) -> None:
        """Pop queued requests into free slots (lowest first), to be prefilled; called with the
        lock held."""
        for request in [r for r in self._queue if r.cancelled]:  # cancelled while waiting: finish now
            self._queue.remove(request)
            self._finish_locked(request, FinishEvent(request._cancel_reason))
        free = [i for i, s in enumerate(self._slots) if s is None]
        while free and self._queue:
            request = self._queue.popleft()
            if request.cancelled:
                self._finish_locked(request, FinishEvent(request._cancel_reason))
                continue
            slot = free.pop(0)
            self._slots[slot] = _Slot(request)
            self._prefilling.append(slot)
            self._running += 1
            self._free_slots -= 1

    def _prefill_plan(self) -> list[tuple[int, int]]:
        """The rows of the next prefill forward, oldest first, as ``(slot, chunk length)``: as many
        as fit ``max_prefill_tokens`` counted as rows x longest chunk (the padded batch); a prompt
        that does not fit whole is cut to the group's chunk length (or to the budget, alone). A
        request that wants prompt logprobs is prefilled alone (its forward keeps every position's
        logits)."""
        budget, group, T = self.max_prefill_tokens, [], 0
        for b in self._prefilling:
            slot = self._slots[b]
            assert slot is not None
            alone = slot.request.params.prompt_logprobs is not None
            if group and alone:
                continue
            c = min(len(slot.request.prompt_ids) - slot.pos, budget)
            n = len(group) + 1
            if n * max(T, c) > budget:
                c = min(c, max(T, budget // n))
                if n * max(T, c) > budget:
                    break
            group.append((b, c))
            T = max(T, c)
            if alone:
                break
        return group

    @torch.no_grad()
    def _prefill_round(self) -> None:
        """One prefill forward over the rows :meth:`_prefill_plan` picks. If a forward of several
        rows fails, each row is retried alone, so one bad request fails only itself."""
        t0 = time.perf_counter()
        group = self._prefill_plan()
        try:
            out = self._prefill_forward(group)
        except Exception as e:  # noqa: BLE001 - one bad request must not take the engine down
            for b, c in group:
                if len(group) == 1:
                    self._free(b, FinishEvent("error", f"{type(e).__name__}: {e}"))
                    continue
                try:  # rewriting the chunk's slots is harmless: nothing advanced
                    alone = self._prefill_forward([(b, c)])
                except Exception as e1:  # noqa: BLE001
                    self._free(b, FinishEvent("error", f"{type(e1).__name__}: {e1}"))
                else:
                    self._advance([(b, c)], *alone)
        else:
            self._advance(group, *out)
        self._seconds["prefill_seconds"] += time.perf_counter() - t0

    def _prefill_forward(self, group: list[tuple[int, int]]) -> tuple[torch.Tensor, list[TokenEvent] | None]:
        """Run the chunks ``group`` (``(slot, length)``) through one forward, each into its own
        cache row from its slot's ``pos``; return each row's last logits ``(N, V)`` (and, for a
        request that wants them, the chunk's prompt logprobs). No slot state changes: a failed
        forward can be rerun. Rows are left-padded to the longest chunk, so the last column holds
        every row's last token (``prefill`` applies the LM head there only); a padding token sits
        at a cache slot past its row's tokens (read by nobody before the row writes it again), and
        it attends to the slots before it, so no attention row is all masked."""
        ids_t, pos_t, mask, cache_rows = self._prefill_inputs(group)
        first = self._slots[group[0][0]]
        assert first is not None
        k = first.request.params.prompt_logprobs
        if k is not None:  # alone (see _prefill_plan): the same forward with the head at every position
            every = limit_vocab(self.model(ids_t, input_pos=pos_t, mask=mask, cache_row=cache_rows)[0],
                                self._limit)  # (c, V)
            start, c = first.pos, group[0][1]
            n = min(c, len(first.request.prompt_ids) - 1 - start)  # positions whose next token is the prompt's
            nxt = torch.tensor(first.request.prompt_ids[start + 1:start + 1 + n], device=every.device)
            return every[-1:], _logprob_events(every[:n], nxt, k)
        return limit_vocab(prefill(self.model, ids_t, pos_t, mask, cache_row=cache_rows), self._limit), None

    def _prefill_inputs(self, group: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                      int | torch.Tensor]:
        """The ids, cache slots (also the positions), mask and cache rows of the chunks ``group``
        as one left-padded batch (see :meth:`_prefill_forward`)."""
        C, device = self.model.config.context_length, self.model.device
        T = max(c for _, c in group)
        ids, positions, rows = [], [], []
        for b, c in group:
            slot = self._slots[b]
            assert slot is not None
            start, pad = slot.pos, T - c
            ids.append([0] * pad + slot.request.prompt_ids[start:start + c])
            positions.append([min(start + c + j, C - 1) for j in range(pad)] + list(range(start, start + c)))
            rows.append(b)
        ids_t = torch.tensor(ids, dtype=torch.long, device=device)
        pos_t = torch.tensor(positions, dtype=torch.long, device=device)
        L = max(self._slots[b].pos + c for b, c in group)  # type: ignore[union-attr]
        mask = self.model.causal_mask[pos_t][:, None, :, :L]  # (N, 1, T, L): slot s visible from slot >= s
        # One row or adjacent rows: a plain cache_row (views into the cache); scattered rows: a tensor.
        adjacent = rows == list(range(rows[0], rows[0] + len(rows)))
        cache_rows: int | torch.Tensor = rows[0] if adjacent else torch.tensor(rows, device=device)
        return ids_t, pos_t, mask, cache_rows

    def _advance(self, group: list[tuple[int, int]], logits: torch.Tensor,
                 prompt_events: list[TokenEvent] | None) -> None:
        """After the prefill forward of ``group``: advance each row by its chunk; rows whose prompt
        is now complete draw their first token."""
        if prompt_events is not None:  # the request is alone in its forward (see _prefill_plan)
            first = self._slots[group[0][0]]
            assert first is not None
            first.prompt_events = (first.prompt_events or []) + prompt_events
        self._counts["prefill_forwards"] += 1
        self._counts["prefill_tokens"] += sum(c for _, c in group)
        done = []
        for i, (b, c) in enumerate(group):
            slot = self._slots[b]
            assert slot is not None
            slot.pos += c
            if slot.pos == len(slot.request.prompt_ids):
                done.append(i)
        if done:
            try:
                self._start_decoding(group, done, logits)
            except Exception as e:  # noqa: BLE001 - e.g. sampling: fail these rows, not the engine
                for i in done:
                    if (slot := self._slots[group[i][0]]) is not None and not slot.decoding:
                        self._free(group[i][0], FinishEvent("error", f"{type(e).__name__}: {e}"))

    def _start_decoding(self, group: list[tuple[int, int]], done: list[int], logits: torch.Tensor) -> None:
        """Rows ``group[i] for i in done`` have their whole prompt in the cache: draw their first
        tokens (step 0 of each row's seed) from ``logits[i]`` and emit them."""
        score_only = [i for i in done if self._slots[group[i][0]].request.params.max_tokens == 0]  # type: ignore[union-attr]
        for i in score_only:  # max_tokens=0 (prompt scoring): no token to draw; the logprobs go out, the slot frees
            slot = self._slots[group[i][0]]
            assert slot is not None
            self._counts["prefills"] += 1
            if slot.prompt_events is not None:
                self._post(slot.request, PromptEvent(slot.prompt_events))
            self._free(group[i][0], FinishEvent("length"))
        if score_only:
            keep = [i for i in range(len(group)) if i not in score_only]
            logits, group = logits[keep], [group[i] for i in keep]
            done = [keep.index(i) for i in done if i not in score_only]
        if not done:
            return
        slots = [self._slots[group[i][0]] for i in done]
        for i, slot in zip(done, slots, strict=True):
            assert slot is not None
            b, p = group[i][0], slot.request.params
            self._prefilling.remove(b)
            self._counts["prefills"] += 1
            if slot.prompt_events is not None:
                self._post(slot.request, PromptEvent(slot.prompt_events))
                slot.prompt_events = None
            slot.seed = new_seed() if p.seed is None else p.seed
            self._install(b, slot)
        rows = logits[done] if len(done) < logits.size(0) else logits
        bias = self._bias_of([group[i][0] for i in done])
        penalty = self._penalty_of([group[i][0] for i in done])
        if len(slots) == 1:
            p, seed = slots[0].request.params, slots[0].seed  # type: ignore[union-attr]
            tokens = sample_logits(rows, p.temperature, p.top_k, p.top_p, seed=seed, step=0, bias=bias,
                                   penalty=penalty, min_p=slots[0].min_p).tolist()  # type: ignore[union-attr]
        else:
            index = torch.tensor([group[i][0] for i in done], device=rows.device)
            temperature, top_k, top_p, min_p = self._sampling_args(slots, lambda t: t[index])
            tokens = sample_logits(rows, temperature, top_k, top_p, seed=self._seeds[index], step=0,
                                   bias=bias, penalty=penalty, min_p=min_p).tolist()
        for j, (i, token) in enumerate(zip(done, tokens, strict=True)):
            b = group[i][0]
            slot = self._slots[b]
            assert slot is not None
            self._mask[b].fill_(float("-inf"))
            self._mask[b, ..., :slot.pos] = 0.0
            slot.decoding = True
            self._tokens[b] = token
            try:
                self._deliver(b, token, rows[j] if slot.request.params.logprobs is not None else None)
            except Exception as e:  # noqa: BLE001
                self._free(b, FinishEvent("error", f"{type(e).__name__}: {e}"))

    def _install(self, b: int, slot: _Slot) -> None:
        """Write row ``b``'s sampling settings into the per-slot tensors (at admission)."""
        p = slot.request.params
        slot.sampled = p.temperature >= GREEDY_TEMPERATURE  # below: greedy, as sample_logits draws it
        # k >= V keeps every token (as generate's top_k does): clamped, so a huge k fits the int64 row.
        slot.top_k = min(p.top_k, self.vocab) if slot.sampled and p.top_k is not None else None
        slot.top_p = p.top_p if slot.sampled and p.top_p is not None and p.top_p < 1.0 else None
        slot.min_p = float(p.min_p) if slot.sampled and p.min_p else None  # (None, as generate() takes, is 0)
        self._temperature[b] = float(p.temperature)
        self._top_k[b] = slot.top_k or 0
        self._top_p[b] = 1.0 if slot.top_p is None else float(slot.top_p)
        self._min_p[b] = slot.min_p or 0.0
        self._seeds[b:b + 1] = seed_tensor([slot.seed], self._seeds.device)
        self._steps[b] = 1  # the first token (step 0) came from the prefill
        if p.penalized():
            if self._bias is None:
                self._bias = torch.zeros(self.max_batch, self.vocab, device=self._seeds.device)
            self._bias[b].zero_()
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias), device=self._bias.device)
                self._bias[b, ids] = torch.tensor([float(v) for v in p.logit_bias.values()], device=self._bias.device)
            if p.min_tokens > 0:
                self._bias[b, list(p.stop_token_ids)] = float("-inf")  # lifted in _deliver
            slot.seen = set()
            self._biased.add(b)
        if p.repetition_penalty != 1.0:
            if self._penalty is None:
                self._penalty = torch.ones(self.max_batch, self.vocab, device=self._seeds.device)
            ids = torch.tensor(slot.request.prompt_ids, device=self._penalty.device)
            self._penalty[b].fill_(1.0).index_fill_(0, ids, float(p.repetition_penalty))
            self._repeating.add(b)

    def _bias_of(self, rows: Sequence[int] | slice) -> torch.Tensor | None:
        """The logit bias of cache rows ``rows`` (a slice ``:hi`` or indices), or None when no
        row among them has one (the unbiased sampling path, and graph)."""
        return _rows_in_use(self._bias, self._biased, rows)

    def _penalty_of(self, rows: Sequence[int] | slice) -> torch.Tensor | None:
        """The repetition-penalty factors of cache rows ``rows`` (as :meth:`_bias_of`), or None
        when no row among them has a penalty (the path, and graph, without one)."""
        return _rows_in_use(self._penalty, self._repeating, rows)

    def _sampling_args(self, slots: Sequence[_Slot | None], rows: Callable[[torch.Tensor], torch.Tensor],
                       compiled: bool = False) -> tuple[Any, Any, Any, Any]:
        """``(temperature, top_k, top_p, min_p)`` for sampling the rows ``slots`` (free rows: None), whose
        per-slot tensors ``rows(tensor)`` selects. A batch of greedy rows passes
        ``temperature=0`` (argmax only: no random bits over the vocabulary), and a setting all
        sampled rows share is passed as one number (the cheaper whole-batch path of
        :func:`sample_logits`; greedy rows ignore filters). ``compiled``: the per-slot tensors
        always (one graph whatever the settings; a filter no row uses is left out)."""
        sampled = [s for s in slots if s is not None and s.sampled]
        if compiled:
            return (rows(self._temperature), rows(self._top_k) if any(s.top_k for s in sampled) else None,
                    rows(self._top_p) if any(s.top_p for s in sampled) else None,
                    rows(self._min_p) if any(s.min_p for s in sampled) else None)
        if not sampled:
            return 0.0, None, None, None
        top_k, top_p, min_p = {s.top_k for s in sampled}, {s.top_p for s in sampled}, {s.min_p for s in sampled}
        return (rows(self._temperature), top_k.pop() if len(top_k) == 1 else rows(self._top_k),
                top_p.pop() if len(top_p) == 1 else rows(self._top_p),
                min_p.pop() if len(min_p) == 1 else rows(self._min_p))

    def _drop_cancelled(self) -> None:
        for b, slot in enumerate(self._slots):
            if slot is not None and slot.request.cancelled:
                self._free(b, FinishEvent(slot.request._cancel_reason))

    @torch.no_grad()
    def _step(self) -> None:
        """One decode step over every active row; a failure fails those rows, not the engine."""
        active = [b for b, s in enumerate(self._slots) if s is not None and s.decoding]
        t0 = time.perf_counter()
        try:
            hi = self.max_batch if self.compile else active[-1] + 1
            tokens, logits = self._decode(hi)
            self._counts["steps"] += 1
            self._counts["step_rows"] += len(active)
        except Exception as e:  # noqa: BLE001
            for b in active:
                self._free(b, FinishEvent("error", f"decode step failed: {type(e).__name__}: {e}"))
            return
        self._deliver_step(active, tokens, logits)
        self._seconds["step_seconds"] += time.perf_counter() - t0

    @torch.no_grad()
    def _mixed_round(self) -> bool:
        """One forward for the decode step of the running rows AND the next prefill chunks
        (:meth:`_prefill_plan`), as llama.cpp and vLLM batch them: every linear layer reads its
        weights once for both, and a new prompt's first token comes out with the running rows'
        next ones, one forward after its arrival's step. Returns False, having advanced nothing,
        when the chunks need a forward of their own (prompt logprobs) or the forward fails (then
        the separate prefill and step run, and isolate a bad request as usual)."""
        group = self._prefill_plan()
        if not group or any(self._slots[b].request.params.prompt_logprobs is not None  # type: ignore[union-attr]
                            for b, _ in group):
            return False
        active = [b for b, s in enumerate(self._slots) if s is not None and s.decoding]
        t0 = time.perf_counter()
        try:
            tokens, logits, prompt_logits = self._decode(active[-1] + 1, group=group)
        except Exception:  # noqa: BLE001 - retried as a separate prefill and step
            return False
        self._counts["steps"] += 1
        self._counts["mixed_steps"] += 1
        self._counts["step_rows"] += len(active)
        self._deliver_step(active, tokens, logits)
        self._advance(group, prompt_logits, None)
        self._seconds["step_seconds"] += time.perf_counter() - t0
        return True

    def _deliver_step(self, active: list[int], tokens: list[int], logits: torch.Tensor) -> None:
        """Hand the decode step's new tokens to the rows ``active``."""
        for b in active:
            slot = self._slots[b]
            if slot is None:
                continue
            try:
                slot.pos += 1  # the token fed this step now sits in the cache
                want = slot.request.params.logprobs is not None
                self._deliver(b, tokens[b], logits[b] if want else None)
            except Exception as e:  # noqa: BLE001
                self._free(b, FinishEvent("error", f"{type(e).__name__}: {e}"))

    def _decode(self, hi: int, greedy_only: bool = False, group: list[tuple[int, int]] | None = None) -> Any:
        """Run :func:`decode_step` over cache rows ``0 .. hi-1``; returns the new tokens (host)
        and the logits. Each decoding row feeds its last token at its own position; a row still
        being prefilled writes (ignored) at its next prompt slot, which its next chunk rewrites,
        and a free row at slot 0. With ``group`` (prefill chunks, eager only) the same step and
        those chunks run in ONE forward (:class:`gpt2model.model.Part`: the step's rows first,
        so a chunk's write to its row's next slot wins), sampled with :func:`sample_logits` as
        :func:`decode_step` samples; returns ``(tokens, logits, the chunks' last logits)``."""
        rows = self._slots[:hi]
        pos_host = [s.pos if s is not None else 0 for s in rows]
        self._pos[:hi, 0] = torch.tensor(pos_host)
        pos = self._pos[:hi]
        self._mask[:hi].scatter_(3, pos.view(hi, 1, 1, 1), 0.0)  # the slot written now becomes visible
        L = self._mask.size(-1) if self.compile else max(pos_host) + 1
        decoding = [s if s is not None and s.decoding else None for s in rows] if not greedy_only else []
        temperature, top_k, top_p, min_p = self._sampling_args(decoding, lambda t: t[:hi], self.compile)
        bias = self._bias_of(slice(0, hi))
        # Keyword arguments only when some row uses them: without, exactly the step (and graph) before them.
        extra = {k: v for k, v in (("penalty", self._penalty_of(slice(0, hi))), ("min_p", min_p),
                                   ("vocab_limit", self._limit)) if v is not None}
        if group:
            ids_p, pos_p, mask_p, rows_p = self._prefill_inputs(group)
            parts = [Part(hi, 1, pos, self._mask[:hi, :, :, :L], 0),
                     Part(ids_p.size(0), ids_p.size(1), pos_p, mask_p, rows_p)]
            ids = torch.cat([self._tokens[:hi].view(1, hi), ids_p.view(1, -1)], dim=1)
            out = limit_vocab(self.model(ids, parts=parts)[0], self._limit)  # (hi + chunks, V)
            logits, prompt_logits = out[:hi], out[hi:]
            nxt = sample_logits(logits, temperature, top_k, top_p, seed=self._seeds[:hi], step=self._steps[:hi],
                                bias=bias, **extra)
            self._tokens[:hi, 0] = nxt
            self._steps[:hi] += 1
            return nxt.tolist(), logits, prompt_logits
        run = run_compiled_step if self.compile else (lambda fn, *args, **kwargs: fn(*args, **kwargs))
        try:
            nxt, logits = run(self._step_fn, self.model, self._tokens[:hi], pos, self._mask[:hi, :, :, :L], pos,
                              temperature, top_k, top_p, self._seeds[:hi], self._steps[:hi], bias, **extra)
        except Exception as e:
            if not self.compile:
                raise
            # A compiler failure (at warm-up, or a later graph for new sampling settings): decode
            # eagerly from now on; nothing advanced, and rewriting the cache slot is harmless.
            note_compile_failure(self.model, e)
            self.compile, self._step_fn = False, decode_step
            return self._decode(hi, greedy_only)
        self._tokens[:hi, 0] = nxt
        self._steps[:hi] += 1  # free rows too: harmless, _install resets a row
        return nxt.tolist(), logits

    def _deliver(self, b: int, token: int, logits: torch.Tensor | None) -> None:
        """Emit row ``b``'s new token (a stop token too, then finish) and free the row when done."""
        slot = self._slots[b]
        assert slot is not None
        p = slot.request.params
        slot.generated += 1
        event = TokenEvent(token)
        if logits is not None:
            event = _logprob_events(logits[None], torch.tensor([token]), p.logprobs or 0)[0]
        with self._wake:
            self._counts["tokens_generated"] += 1
        # A stop token is emitted too (it was generated: vLLM's output ids, usage and logprobs hold
        # the end-of-text that ended a choice), then the request finishes.
        self._post(slot.request, event)
        if token in p.stop_token_ids:
            self._free(b, FinishEvent("stop"))
            return
        if slot.generated == p.min_tokens > 0:  # from now on the stop tokens may be drawn
            assert self._bias is not None
            for t in p.stop_token_ids:
                self._bias[b, t] = float((p.logit_bias or {}).get(t, 0.0))
        if slot.seen is not None and (p.presence_penalty or p.frequency_penalty):
            # The next draws see this token once more (OpenAI's penalties, one entry per token).
            assert self._bias is not None
            self._bias[b, token] -= p.frequency_penalty + (p.presence_penalty if token not in slot.seen else 0.0)
            slot.seen.add(token)
        if b in self._repeating:  # the next draws penalize this token too (HF/vLLM: prompt + generated)
            self._penalty[b, token] = float(p.repetition_penalty)  # type: ignore[index]
        if slot.generated >= p.max_tokens:
            self._free(b, FinishEvent("length"))

    def _free(self, b: int, event: FinishEvent) -> None:
        slot = self._slots[b]
        if slot is None:
            return
        self._slots[b] = None
        if b in self._prefilling:
            self._prefilling.remove(b)
        self._mask[b].fill_(float("-inf"))
        self._mask[b, ..., 0] = 0.0
        if hasattr(self, "_temperature"):
            self._temperature[b] = 0.0  # a free row is greedy, unfiltered
            self._top_k[b], self._top_p[b], self._min_p[b] = 0, 1.0, 0.0
        if b in self._biased:
            self._biased.discard(b)
            self._bias[b].zero_()  # type: ignore[index]
        if b in self._repeating:
            self._repeating.discard(b)
            self._penalty[b].fill_(1.0)  # type: ignore[index]
        with self._wake:
            self._running -= 1
            self._free_slots += 1
            self._finish_locked(slot.request, event)
            self._wake.notify_all()

    def _finish_locked(self, request: Request, event: FinishEvent) -> None:
        if request.finish_reason is None:
            self._finished[event.reason] += 1
        self._post(request, event)

    def _post(self, request: Request, event: TokenEvent | PromptEvent | FinishEvent) -> None:
        for loop, ready in request._emit(event):
            self._to_wake.setdefault(loop, []).append(ready)

    def _wake_readers(self) -> None:
        """Wake the asyncio readers of the events posted since the last call: one
        ``call_soon_threadsafe`` per event loop."""
        to_wake, self._to_wake = self._to_wake, {}
        for loop, events in to_wake.items():
            with contextlib.suppress(RuntimeError):  # the reader's loop is closed: nobody listens any more
                loop.call_soon_threadsafe(_set_all, events)

    def _cancel_all(self, reason: str = "cancelled", error: str | None = None) -> None:
        """Finish every running and queued request (at shutdown, or when the engine cannot start)."""
        for b, slot in enumerate(self._slots):
            if slot is not None:
                self._free(b, FinishEvent(reason, error))
        with self._wake:
            while self._queue:
                self._finish_locked(self._queue.popleft(), FinishEvent(reason, error))
            self._wake.notify_all()
            self._wake_readers()
        if hasattr(self, "_check_inputs"):
            self.model.check_inputs = self._check_inputs

