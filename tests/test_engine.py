"""The serving engine: continuous batching gives each request exactly what it gets alone, cancels
free their slot, the queue is bounded, a failing request does not take the engine down."""

from __future__ import annotations

import asyncio
import copy
import time
from collections import Counter

import pytest
import torch

from gpt2model import GPT, GPTconfig
from gpt2model import engine as engine_mod
from gpt2model import generate as gen_mod
from gpt2model.engine import (
    Engine,
    FinishEvent,
    PromptEvent,
    QueueFullError,
    Request,
    SamplingParams,
    TokenEvent,
)
from gpt2model.generate import generate, sample_logits

CFG = GPTconfig(context_length=64, vocab_size=50, n_layer=2, n_head=2, d_model=32)
_REFERENCE: dict[int, GPT] = {}  # a copy of each test model, for generate() while an engine holds the model


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    m = GPT(CFG)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # spiky weights: nearly flat logits would make comparisons weak
        for name, p in m.named_parameters():
            if "ln" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    _REFERENCE[id(m)] = copy.deepcopy(m).eval()
    return m.eval()


@pytest.fixture
def engine(model: GPT):
    eng = Engine(model, max_batch=3, max_queue=8)
    eng.start()
    assert eng.ready.wait(60)
    yield eng
    eng.shutdown(timeout=5)
    assert not hasattr(model, "causal_mask")  # the cache is freed for plain use


def collect(request: Request, n: int | None = None) -> tuple[list[TokenEvent], FinishEvent | None]:
    """Read all events (or the first ``n`` token events) of a request."""
    tokens: list[TokenEvent] = []
    for event in request.events():
        if isinstance(event, FinishEvent):
            return tokens, event
        tokens.append(event)
        if n is not None and len(tokens) == n:
            return tokens, None
    raise AssertionError("events() ended without a FinishEvent")


def alone(model: GPT, prompt: list[int], p: SamplingParams) -> list[int]:
    """What ``model.generate`` gives for the request on its own (on a copy of the model: the
    engine holds the model's KV cache while it runs)."""
    eot = p.stop_token_ids[0] if p.stop_token_ids else None
    out = generate(_REFERENCE[id(model)], [prompt], p.max_tokens, temperature=p.temperature, top_k=p.top_k,
                   top_p=p.top_p, seed=p.seed, eot_id=eot, repetition_penalty=p.repetition_penalty,
                   min_p=p.min_p)[0][len(prompt):]
    return out  # with the stop token that ended it: the engine emits it too (as vLLM's output ids hold it)


def test_requests_get_what_they_get_alone_while_others_join_and_leave(engine: Engine, model: GPT) -> None:
    a_prompt, a = [3, 1, 4, 1, 5], SamplingParams(max_tokens=40, temperature=0)
    req_a = engine.submit(a_prompt, a)
    first, _ = collect(req_a, 5)  # A decodes alone for a while ...
    others = [  # ... then requests of other lengths and settings join; some leave early
        ([7], SamplingParams(max_tokens=6, temperature=0)),
        ([9, 8, 7, 6, 5, 4, 3, 2, 1], SamplingParams(max_tokens=20, seed=11, top_k=10)),
        ([2, 2], SamplingParams(max_tokens=15, seed=5, top_p=0.8, temperature=0.7)),
        ([1, 2, 3], SamplingParams(max_tokens=12, seed=3)),
    ]
    reqs = [engine.submit(p, s) for p, s in others]  # more than the free slots: one waits for a slot
    rest, fin = collect(req_a)
    assert fin == FinishEvent("length")
    assert [e.token for e in first + rest] == alone(model, a_prompt, a)
    for req, (prompt, params) in zip(reqs, others, strict=True):
        tokens, fin = collect(req)
        assert fin.reason == "length" and [e.token for e in tokens] == alone(model, prompt, params), params
        assert all(e.logprob is None and e.top_logprobs is None for e in tokens)
    _wait_idle(engine)
    s = engine.stats()
    assert s["running"] == 0 and s["queued"] == 0 and s["finished"]["length"] == 5
    assert s["tokens_generated"] == 40 + 6 + 20 + 15 + 12
    # 5 first tokens come from prefills, the other 88 from steps of 1..3 rows (3 slots).
    assert s["step_rows"] == 40 + 6 + 20 + 15 + 12 - 5 and s["steps"] <= s["step_rows"] <= 3 * s["steps"]
    assert s["prefills"] == 5 and s["step_seconds"] > 0 and s["prefill_seconds"] > 0
    time.sleep(0.05)
    engine.submit([1], SamplingParams(max_tokens=1, temperature=0)).events().__next__()
    assert engine.stats()["idle_seconds"] >= 0.04  # the wait with no request counts as idle


def _wait_idle(engine: Engine) -> None:
    deadline = time.monotonic() + 10
    while engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)


def test_seeded_request_is_the_same_alone_or_batched(engine: Engine) -> None:
    params = SamplingParams(max_tokens=25, seed=1234, top_k=20, temperature=0.9)
    solo, _ = collect(engine.submit([5, 6, 7], params))
    crowd = [engine.submit([1] * (i + 1), SamplingParams(max_tokens=25, seed=i)) for i in range(2)]
    again, _ = collect(engine.submit([5, 6, 7], params))
    assert [e.token for e in again] == [e.token for e in solo]
    for r in crowd:
        collect(r)
    unseeded = [[e.token for e in collect(engine.submit([5, 6, 7], SamplingParams(max_tokens=25)))[0]]
                for _ in range(2)]
    assert unseeded[0] != unseeded[1]  # the engine draws a fresh seed for each


def test_stop_tokens_and_logprobs(engine: Engine, model: GPT) -> None:
    prompt = [4, 4, 2]
    greedy = alone(model, prompt, SamplingParams(max_tokens=20, temperature=0))
    k = next(i for i in range(1, 20) if greedy[i] not in greedy[:i])
    before = engine.stats()["tokens_generated"]
    tokens, fin = collect(engine.submit(prompt, SamplingParams(max_tokens=20, temperature=0,
                                                               stop_token_ids=(greedy[k],), logprobs=3)))
    # The stop token is emitted (with its logprobs: vLLM lists and counts it), then the request stops.
    assert fin.reason == "stop" and [e.token for e in tokens] == greedy[:k + 1]
    assert engine.stats()["tokens_generated"] - before == k + 1
    ids = list(prompt)
    with torch.no_grad():
        for e in tokens:
            logp = _REFERENCE[id(model)](torch.tensor([ids]))[0, -1].log_softmax(-1)
            assert e.logprob == pytest.approx(float(logp[e.token]), abs=1e-4)
            top = logp.topk(3)
            assert [t for t, _ in e.top_logprobs] == top.indices.tolist()
            assert [v for _, v in e.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
            ids.append(e.token)
    tokens, _ = collect(engine.submit(prompt, SamplingParams(max_tokens=2, temperature=0, logprobs=0)))
    assert all(e.logprob is not None and e.top_logprobs == [] for e in tokens)


def test_logprobs_of_a_vocabulary_smaller_than_k_list_every_token() -> None:
    """logprobs=5 on a 3-token vocabulary failed the request ("selected index k out of range", an
    HTTP 500); it lists the 3 tokens, as vLLM does."""
    torch.manual_seed(0)
    eng = Engine(GPT(GPTconfig(context_length=16, vocab_size=3, n_layer=1, n_head=1, d_model=8)).eval(),
                 max_batch=2, max_queue=2)
    eng.start()
    try:
        assert eng.ready.wait(60)
        events = list(eng.submit([1, 2], SamplingParams(max_tokens=3, logprobs=5, prompt_logprobs=5, seed=0)).events())
        assert isinstance(events[-1], FinishEvent) and events[-1].reason == "length"
        assert len(events[0].tokens[0].top_logprobs) == 3  # the prompt's
        assert [len(e.top_logprobs) for e in events[1:-1]] == [3, 3, 3]
        assert all(sorted(t for t, _ in e.top_logprobs) == [0, 1, 2] for e in events[1:-1])
    finally:
        eng.shutdown(timeout=5)


def test_tiny_temperatures_are_greedy_everywhere(engine: Engine, model: GPT) -> None:
    """temperature=1e-40 (or 1e-300: 0 in fp32) divided the logits into inf/NaN and drew garbage
    (token 0/1 every step through the server); below 1e-5 it is greedy, as vLLM does, in
    sample_logits (one number or per row), generate() and the engine alike."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 20
    for t in (1e-6, 1e-40, 1e-300):
        assert torch.equal(sample_logits(logits, t, seed=1), logits.argmax(-1))
        per_row = torch.tensor([t, 0.0, 1.0])
        drawn = sample_logits(logits, per_row, top_k=torch.tensor([5, 0, 0]), seed=1)
        assert drawn[:2].tolist() == logits[:2].argmax(-1).tolist()
    greedy = alone(model, [4, 4, 2], SamplingParams(max_tokens=8, temperature=0))
    tiny = SamplingParams(max_tokens=8, temperature=1e-40, top_p=0.5, seed=3)
    assert alone(model, [4, 4, 2], tiny) == greedy
    assert [e.token for e in collect(engine.submit([4, 4, 2], tiny))[0]] == greedy


def test_prompts_as_id_arrays_and_tensors(engine: Engine) -> None:
    """encode_batch gives uint32 arrays and generate takes tensors: a 1-D integer array or tensor is a
    prompt too (it was 'must be a list of token ids'); floats and 2-D stay errors."""
    import numpy as np

    params = SamplingParams(max_tokens=4, temperature=0)
    want = [e.token for e in collect(engine.submit([4, 4, 2], params))[0]]
    # list(a uint32 array) holds numpy integers (were refused: "encode text with the tokenizer")
    ids = np.array([4, 4, 2], dtype=np.uint32)
    for prompt in (ids, torch.tensor([4, 4, 2]), (4, 4, 2), list(ids), [np.int64(4), 4, np.uint16(2)]):
        assert [e.token for e in collect(engine.submit(prompt, params))[0]] == want
    for bad in (torch.tensor([4.0, 2.0]), np.array([4.5]), [np.float32(4)], [np.bool_(True)]):
        with pytest.raises(ValueError, match="list of token ids"):
            engine.submit(bad, params)
    # numpy numbers in the params (a seed from np.random, ids from an array) are numbers: were refused as
    # "seed must be an integer, got np.int64(5)"
    plain = SamplingParams(max_tokens=4, temperature=0.7, top_k=20, seed=5, logprobs=2, stop_token_ids=(3,),
                           logit_bias={2: 1.5}, min_tokens=1)
    typed = SamplingParams(max_tokens=np.int64(4), temperature=np.float32(0.7), top_k=np.int32(20),
                           seed=np.int64(5), logprobs=np.uint8(2), stop_token_ids=(np.int64(3),),
                           logit_bias={np.int64(2): np.float64(1.5)}, min_tokens=np.int64(1))
    got = [(e.token, e.logprob) for e in collect(engine.submit([4, 4, 2], typed))[0]]
    assert got == [(e.token, e.logprob) for e in collect(engine.submit([4, 4, 2], plain))[0]] and len(got) == 4
    with pytest.raises(ValueError, match="seed must be an integer"):
        engine.submit([4], SamplingParams(max_tokens=1, seed=np.bool_(True)))
    # generate()'s (1, T) batch names the shape and the fix (was "encode text with the tokenizer")
    for bad in (torch.tensor([[4, 2]]), np.array([[4, 2]]), torch.tensor(4)):
        with pytest.raises(ValueError, match=r"got a (Tensor|ndarray) of shape .*submit each row as its own request"):
            engine.submit(bad, params)


def test_prompt_logprobs_come_first_from_the_same_prefill(engine: Engine, model: GPT) -> None:
    prompt, params = [4, 4, 2, 9, 1], SamplingParams(max_tokens=6, temperature=0, prompt_logprobs=2)
    events = list(engine.submit(prompt, params).events())
    assert isinstance(events[0], PromptEvent) and isinstance(events[-1], FinishEvent)
    with torch.no_grad():
        logp = _REFERENCE[id(model)](torch.tensor([prompt]))[0].log_softmax(-1)  # (P, V)
    assert [e.token for e in events[0].tokens] == prompt[1:]
    for i, e in enumerate(events[0].tokens):
        assert e.logprob == pytest.approx(float(logp[i, prompt[i + 1]]), abs=1e-4)
        assert [t for t, _ in e.top_logprobs] == logp[i].topk(2).indices.tolist()
    assert [e.token for e in events[1:-1]] == alone(model, prompt, params)  # generation is unchanged
    assert all(isinstance(e, TokenEvent) and e.logprob is None for e in events[1:-1])
    with pytest.raises(ValueError, match="prompt_logprobs must be"):
        engine.submit(prompt, SamplingParams(max_tokens=2, prompt_logprobs=-1))


def test_simultaneous_requests_are_prefilled_in_one_forward_even_into_scattered_slots(
        model: GPT, monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests that wait together are prefilled together: ONE forward for prompts of different
    lengths (left-padded), into whichever slots are free (here rows 1 and 3, between two running
    rows), and each still gets exactly what it gets alone."""
    cache_rows: list[object] = []
    real = Engine._prefill_inputs

    def spy(self, group):  # noqa: ANN001, ANN202
        out = real(self, group)
        cache_rows.append(out[3].tolist() if isinstance(out[3], torch.Tensor) else out[3])
        return out

    monkeypatch.setattr(Engine, "_prefill_inputs", spy)
    eng = Engine(model, max_batch=4)
    eng.start()
    assert eng.ready.wait(60)
    try:
        long, short = SamplingParams(max_tokens=55, temperature=0), SamplingParams(max_tokens=2, temperature=0)
        first = [([1, 2, 3], long), ([4], short), ([5, 6, 7, 8, 9, 1, 2], long), ([7, 8], short)]
        with eng._wake:  # the engine thread cannot take any of them before all four wait
            reqs = [eng.submit(p, s) for p, s in first]
        heads = [collect(r, 1)[0] for r in reqs]  # every first token is out
        assert eng.stats()["prefill_forwards"] == 1 and eng.stats()["prefills"] == 4
        assert cache_rows[-1] == 0  # rows 0..3: adjacent rows go as one plain cache_row
        for r in (reqs[1], reqs[3]):  # slots 1 and 3 free again; 0 and 2 keep decoding
            assert collect(r)[1].reason == "length"
        cases = [([9, 8, 7, 6, 5], SamplingParams(max_tokens=20, temperature=0)),
                 ([2], SamplingParams(max_tokens=20, seed=8, top_k=6, temperature=0.9, logprobs=2))]
        with eng._wake:
            later = [eng.submit(p, s) for p, s in cases]
        heads += [collect(r, 1)[0] for r in later]
        # One forward into rows 1 and 3: rows 0 and 2 were still taken (free slots go lowest first),
        # and it is the running rows' decode step too (one mixed forward).
        assert eng.stats()["prefill_forwards"] == 2 and cache_rows[-1] == [1, 3]
        assert eng.stats()["mixed_steps"] == 1
        for r, (prompt, p), head in zip(later + [reqs[0], reqs[2]], cases + [first[0], first[2]],
                                        heads[4:] + [heads[0], heads[2]], strict=True):
            tokens, fin = collect(r)
            assert fin.reason == "length" and [e.token for e in head + tokens] == alone(model, prompt, p), p
        assert all(e.logprob is not None and len(e.top_logprobs) == 2 for e in collect(eng.submit(
            [2], SamplingParams(max_tokens=3, seed=8, top_k=6, temperature=0.9, logprobs=2)))[0])
        assert eng.stats()["prefill_tokens"] == 3 + 1 + 7 + 2 + 5 + 1 + 1
    finally:
        eng.shutdown(timeout=5)


def test_a_long_prompt_is_prefilled_in_chunks_while_others_keep_decoding(model: GPT,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``max_prefill_tokens`` bounds one prefill forward: a longer prompt goes in chunks, one per
    engine iteration, and the running request gets a token between two chunks."""
    order: list[tuple[str, str]] = []
    real_emit = Request._emit

    def emit(self: Request, event: object) -> object:
        order.append((self.id, type(event).__name__))
        return real_emit(self, event)  # type: ignore[arg-type]

    monkeypatch.setattr(Request, "_emit", emit)
    eng = Engine(model, max_batch=2, max_prefill_tokens=8)
    eng.start()
    assert eng.ready.wait(60)
    try:
        a_params = SamplingParams(max_tokens=60, temperature=0)
        a = eng.submit([1, 2], a_params)
        head, _ = collect(a, 1)  # A decodes
        before = eng.stats()["prefill_forwards"]
        prompt = [(7 * i) % 50 for i in range(30)]
        params = SamplingParams(max_tokens=10, seed=3, top_k=5)
        order.append(("test", "submit"))
        b = eng.submit(prompt, params)
        assert [e.token for e in collect(b)[0]] == alone(model, prompt, params)
        assert eng.stats()["prefill_forwards"] - before == 4  # 8 + 8 + 8 + 6 tokens
        tail, fin = collect(a)
        assert fin.reason == "length" and [e.token for e in head + tail] == alone(model, [1, 2], a_params)
        since = order[order.index(("test", "submit")):]
        b_first = since.index((b.id, "TokenEvent"))
        assert since[:b_first].count((a.id, "TokenEvent")) >= 3  # a decode step after each of the 3 chunks
        # Prompt logprobs gathered over chunks are those of one whole forward.
        p_params = SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=1)
        events = list(eng.submit(prompt[:19], p_params).events())
        with torch.no_grad():
            logp = _REFERENCE[id(model)](torch.tensor([prompt[:19]]))[0].log_softmax(-1)
        assert [e.token for e in events[0].tokens] == prompt[1:19]
        assert [e.logprob for e in events[0].tokens] == pytest.approx(
            [float(logp[i, prompt[i + 1]]) for i in range(18)], abs=1e-4)
        assert [e.token for e in events[1:-1]] == alone(model, prompt[:19], p_params)
    finally:
        eng.shutdown(timeout=5)
    with pytest.raises(ValueError, match="max_prefill_tokens must be"):
        Engine(model, max_prefill_tokens=0)
    # On a CPU one ~40-token prompt per forward by default (measured: lower TTFT p50 and inter-token
    # p99 than 128 at 8 clients, same tokens/s).
    assert Engine(model).max_prefill_tokens == engine_mod.CPU_MAX_PREFILL_TOKENS == 64


def test_cancel_frees_the_slot_within_one_step(model: GPT) -> None:
    eng = Engine(model, max_batch=1, max_queue=4)
    eng.start()
    assert eng.ready.wait(60)
    try:
        long = eng.submit([1, 2], SamplingParams(max_tokens=60, temperature=0))
        waiting = eng.submit([3], SamplingParams(max_tokens=3, temperature=0))  # needs the only slot
        before, _ = collect(long, 3)
        long.cancel()
        steps = eng.stats()["steps"]  # read after cancel(): the step under way may not be counted yet
        after, fin = collect(long)
        # Its tokens: one from the prefill, one per step so far, and at most the step under way.
        assert fin == FinishEvent("cancelled") and len(before + after) <= 1 + steps + 1
        tokens, fin = collect(waiting)
        assert fin.reason == "length" and len(tokens) == 3
        # The cancelled row took at most one more step; the waiting request 2 (its first token
        # comes from its prefill).
        assert eng.stats()["steps"] - steps <= 1 + 2
        queued = eng.submit([1], SamplingParams(max_tokens=60, temperature=0))
        blocked = eng.submit([1], SamplingParams(max_tokens=60, temperature=0))
        blocked.cancel()  # cancelled while queued: finished without ever taking a slot
        assert collect(blocked) == ([], FinishEvent("cancelled"))
        queued.cancel()
        assert collect(queued)[1] == FinishEvent("cancelled")
        _wait_idle(eng)
        assert eng.stats()["running"] == 0 and eng.stats()["finished"]["cancelled"] == 3
        # A caller's own stop rule (the server's stop strings) finishes it as "stop", running or
        # queued: /metrics counted every stop-string stop as "cancelled".
        running = eng.submit([1], SamplingParams(max_tokens=60, temperature=0))
        queued = eng.submit([1], SamplingParams(max_tokens=60, temperature=0))
        collect(running, 2)
        queued.cancel("stop")
        running.cancel("stop")
        running.cancel()  # a later plain cancel (the server's cleanup) does not change it
        assert collect(running)[1] == FinishEvent("stop") and collect(queued) == ([], FinishEvent("stop"))
        _wait_idle(eng)
        assert eng.stats()["finished"]["stop"] == 2 and eng.stats()["finished"]["cancelled"] == 3
        with pytest.raises(ValueError, match="reason"):
            running.cancel("length")
    finally:
        eng.shutdown(timeout=1)


def test_queue_full_and_bad_requests(model: GPT) -> None:
    eng = Engine(model, max_batch=1, max_queue=2)  # not started: nothing leaves the queue
    p = SamplingParams(max_tokens=4, temperature=0)
    queued = [eng.submit([1], p), eng.submit([2], p), eng.submit([3], p)]  # one for the free slot, two waiting
    with pytest.raises(QueueFullError, match="max_queue 2"):
        eng.submit([4], p)
    for prompt, params, fragment in [
        ([], p, "empty prompt"),
        ([1, 50], p, "token id 50 is out of range"),
        ("abc", p, "list of token ids"),
        ([1.5], p, "list of token ids"),
        ([1] * 60, SamplingParams(max_tokens=5), "exceeds the model's context length 64"),
        ([1], SamplingParams(max_tokens=-1), "max_tokens must be an integer >= 0"),
        ([1] * 65, SamplingParams(max_tokens=0), "exceeds the model's context length 64"),
        ([1], SamplingParams(max_tokens=3, temperature=float("nan")), "temperature must be"),
        ([1], SamplingParams(max_tokens=3, top_p=1.5), "top_p must be in"),
        ([1], SamplingParams(max_tokens=3, top_k=-1), "top_k must be"),
        ([1], SamplingParams(max_tokens=3, logprobs=99), "logprobs must be"),
        ([1], SamplingParams(max_tokens=3, stop_token_ids=(77,)), "stop_token_ids"),
        ([1], SamplingParams(max_tokens=3, seed="x"), "seed must be"),  # type: ignore[arg-type]
        ([1], SamplingParams(max_tokens=3, repetition_penalty=1e300), "a float32 number"),  # failed the request
    ]:
        with pytest.raises(ValueError, match=fragment):
            eng.submit(prompt, params)
    eng.start()
    assert [collect(r)[1].reason for r in queued] == ["length"] * 3
    eng.shutdown(timeout=1)
    with pytest.raises(RuntimeError, match="not accepting"):
        eng.submit([1], p)


def test_an_error_in_one_request_does_not_stop_the_engine(model: GPT, monkeypatch: pytest.MonkeyPatch) -> None:
    real = Engine._prefill_inputs

    def flaky(self, group):  # noqa: ANN001, ANN202 - a forward with the 3-token prompt fails (prefill or mixed)
        if any(len(self._slots[b].request.prompt_ids) == 3 for b, _ in group):
            raise RuntimeError("boom")
        return real(self, group)

    monkeypatch.setattr(Engine, "_prefill_inputs", flaky)
    eng = Engine(model, max_batch=2)
    eng.start()
    assert eng.ready.wait(60)
    try:
        good = eng.submit([1, 2], SamplingParams(max_tokens=10, temperature=0))
        bad = eng.submit([1, 2, 3], SamplingParams(max_tokens=10, temperature=0))
        assert collect(bad) == ([], FinishEvent("error", "RuntimeError: boom"))
        assert collect(good)[1].reason == "length"
        assert collect(eng.submit([4], SamplingParams(max_tokens=3)))[1].reason == "length"
        # ... and when it arrives while another decodes (its mixed forward fails, then its prefill alone).
        good = eng.submit([1, 2], SamplingParams(max_tokens=10, temperature=0))
        assert len(collect(good, 1)[0]) == 1
        bad = eng.submit([3, 2, 1], SamplingParams(max_tokens=10, temperature=0))
        assert collect(bad) == ([], FinishEvent("error", "RuntimeError: boom"))
        assert collect(good)[1].reason == "length"
        _wait_idle(eng)
        s = eng.stats()
        assert s["running"] == 0 and s["finished"]["error"] == 2 and s["finished"]["length"] == 3
    finally:
        eng.shutdown(timeout=1)


def test_one_asyncio_event_follows_several_requests(model: GPT) -> None:
    """``watch`` + ``take_events``: one coroutine follows several requests with one shared
    asyncio.Event (the server's streaming path: no task per request or token); each request's
    events are its tokens alone and end with exactly one FinishEvent."""
    eng = Engine(model, max_batch=3)
    eng.start()
    assert eng.ready.wait(60)
    jobs = [([1, 2], SamplingParams(max_tokens=9, seed=1)), ([3], SamplingParams(max_tokens=4, temperature=0)),
            ([4, 5, 6], SamplingParams(max_tokens=7, seed=5, top_k=5))]

    async def run() -> list[list]:
        ready = asyncio.Event()
        reqs = [eng.submit(p, s) for p, s in jobs]
        for r in reqs:
            r.watch(ready)
        got: list[list] = [[] for _ in reqs]
        while not all(g and isinstance(g[-1], FinishEvent) for g in got):
            ready.clear()
            batch = [(i, ev) for i, r in enumerate(reqs) for ev in r.take_events()]
            if not batch:
                await asyncio.wait_for(ready.wait(), 30)
            for i, ev in batch:
                got[i].append(ev)
        for r in reqs:
            r.unwatch(ready)
            assert r._waiters == []
        return got

    try:
        got = asyncio.run(run())
    finally:
        eng.shutdown(timeout=1)
    for events, (prompt, params) in zip(got, jobs, strict=True):
        assert [e.token for e in events[:-1]] == alone(model, prompt, params)
        assert events[-1] == FinishEvent("length") and sum(isinstance(e, FinishEvent) for e in events) == 1


def test_async_events_and_shutdown(model: GPT) -> None:
    eng = Engine(model, max_batch=2)
    eng.start()
    assert eng.ready.wait(60)
    params = SamplingParams(max_tokens=8, seed=3)

    async def run() -> list[int]:
        r = eng.submit([1, 2], params)
        tokens = [e.token async for e in r.aevents() if isinstance(e, TokenEvent)]
        return tokens

    tokens = asyncio.run(run())
    assert tokens == alone(model, [1, 2], params)
    # Shutdown lets running requests finish within the timeout, then cancels the rest.
    short = eng.submit([1], SamplingParams(max_tokens=3, temperature=0))
    time.sleep(0.05)
    eng.shutdown(timeout=10)
    assert collect(short)[1].reason == "length"
    eng2 = Engine(model, max_batch=1)
    eng2.start()
    assert eng2.ready.wait(60)
    endless = eng2.submit([1], SamplingParams(max_tokens=60, temperature=0))
    collect(endless, 1)
    eng2.shutdown(timeout=0)
    assert collect(endless)[1] == FinishEvent("cancelled")


def test_a_compile_failure_in_the_engine_falls_back_to_eager(model: GPT, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def broken(device: torch.device, mode: str | None = "auto"):
        def step(*args: object) -> None:
            calls.append("compiled")
            raise RuntimeError("no compiler here")
        return step

    monkeypatch.setattr(gen_mod, "compiled_decode_step", broken)
    eng = Engine(model, max_batch=2, compile=True)
    eng.start()
    try:
        assert eng.ready.wait(60)  # the warm-up's failure does not stop the engine from starting
        p = SamplingParams(max_tokens=8, seed=4, top_k=5)
        assert [e.token for e in collect(eng.submit([1, 2], p))[0]] == alone(model, [1, 2], p)
        assert calls == ["compiled"] and "no compiler here" in model._decode_compile_error
    finally:
        eng.shutdown(timeout=5)
        model.__dict__.pop("_decode_compile_error", None)  # the module's model is shared by later tests


def test_steps_pass_per_slot_settings_and_greedy_batches_draw_nothing(model: GPT,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The sampling settings live in per-slot tensors written at admission; a step over greedy
    rows only passes ``temperature=0`` (argmax: no random bits over the vocabulary), a setting all
    sampled rows share goes as one number, differing ones as the per-slot tensor."""
    seen: list[tuple[object, object, object]] = []

    def step(*args: object):  # noqa: ANN202
        seen.append(args[5:8])  # temperature, top_k, top_p
        return gen_mod.decode_step(*args)

    monkeypatch.setattr(engine_mod, "decode_step", step)  # the eager step, as the engine sees it
    monkeypatch.setattr(engine_mod, "step_for", lambda m, compile: step)
    eng = Engine(model, max_batch=3)
    eng.start()
    assert eng.ready.wait(60)

    def batch(cases: list[tuple[list[int], SamplingParams]]) -> list[tuple[object, object, object]]:
        seen.clear()
        reqs = [eng.submit(prompt, p) for prompt, p in cases]
        for r, (prompt, p) in zip(reqs, cases, strict=True):
            assert [e.token for e in collect(r)[0]] == alone(model, prompt, p), p
        _wait_idle(eng)
        return list(seen)

    try:
        greedy = SamplingParams(max_tokens=12, temperature=0)
        assert {args for args in batch([([1, 2], greedy), ([3], greedy)])} == {(0.0, None, None)}
        shared = batch([([1, 2], greedy), ([3], SamplingParams(max_tokens=12, seed=4, top_k=5, temperature=0.8)),
                        ([4, 5, 6], SamplingParams(max_tokens=12, seed=7, top_k=5))])
        assert any(isinstance(t, torch.Tensor) and k == 5 and q is None for t, k, q in shared)
        mixed = batch([([3], SamplingParams(max_tokens=12, seed=4, top_k=5, top_p=0.9)),
                       ([4, 5, 6], SamplingParams(max_tokens=12, seed=7, top_k=9))])
        assert any(isinstance(k, torch.Tensor) and isinstance(q, torch.Tensor) for _, k, q in mixed)
        # A seeded request after others used its slot still draws what it draws alone.
        batch([([4, 5, 6], SamplingParams(max_tokens=12, seed=7, top_k=9)), ([1], greedy)])
    finally:
        eng.shutdown(timeout=5)


def test_asyncio_readers_are_woken_once_per_loop_per_step(model: GPT) -> None:
    """Several streams read on one event loop: one ``call_soon_threadsafe`` per engine step wakes
    them all (not one per token and request)."""
    eng = Engine(model, max_batch=3)
    eng.start()
    assert eng.ready.wait(60)
    wakeups = []

    async def run() -> list[list[int]]:
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe

        def counting(*args: object, **kwargs: object):  # noqa: ANN202
            wakeups.append(args[0])
            return real(*args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        reqs = [eng.submit([i + 1], SamplingParams(max_tokens=20, temperature=0)) for i in range(3)]

        async def read(r: Request) -> list[int]:
            return [e.token async for e in r.aevents() if isinstance(e, TokenEvent)]

        return await asyncio.gather(*(read(r) for r in reqs))

    try:
        steps = eng.stats()["steps"]
        outs = asyncio.run(run())
        assert [len(o) for o in outs] == [20, 20, 20]
        # 60 tokens and 3 finishes; at most one wake-up per step, plus one per admission.
        assert 0 < len(wakeups) <= eng.stats()["steps"] - steps + 3 + 1
    finally:
        eng.shutdown(timeout=5)


@pytest.mark.slow
def test_compiled_engine_matches_generate(model: GPT) -> None:
    eng = Engine(model, max_batch=2, compile=True)
    eng.start()
    assert eng.ready.wait(600)
    try:
        params = [SamplingParams(max_tokens=20, temperature=0), SamplingParams(max_tokens=20, seed=9, top_p=0.9)]
        reqs = [eng.submit([1, 2, 3], params[0]), eng.submit([4], params[1])]
        for r, prompt, p in zip(reqs, ([1, 2, 3], [4]), params, strict=True):
            assert [e.token for e in collect(r)[0]] == alone(model, prompt, p)
        # HF/vLLM's repetition_penalty and min_p through the compiled step (per-slot tensors), beside a plain row.
        penalized = SamplingParams(max_tokens=20, temperature=0, repetition_penalty=1.3)
        for other in (SamplingParams(max_tokens=20, seed=9, min_p=0.1, repetition_penalty=1.2), params[0]):
            reqs = [eng.submit([1, 2, 3], penalized), eng.submit([4], other)]
            for r, prompt, p in zip(reqs, ([1, 2, 3], [4]), (penalized, other), strict=True):
                assert [e.token for e in collect(r)[0]] == alone(model, prompt, p)
        assert eng.compile  # no fall back to eager
    finally:
        eng.shutdown(timeout=5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the CUDA-graph decode step)")
def test_cuda_graph_engine_matches_eager_generate(model: GPT) -> None:
    """On CUDA, ``compile=True`` captures the decode step (sampling inside) as a CUDA graph: every
    request still gets exactly the tokens eager ``generate`` gives it alone on the same device."""
    gpu = copy.deepcopy(_REFERENCE[id(model)]).cuda()
    reference = copy.deepcopy(gpu)
    # A CUDA-graph step on this (main) thread first: torch keeps CUDA-graph state per thread, and
    # the engine's own thread must still get the compiled step, not an eager fallback.
    generate(copy.deepcopy(gpu), [[1, 2]], 3, temperature=0, compile=True)
    eng = Engine(gpu, max_batch=3, compile=True)
    eng.start()
    assert eng.ready.wait(600)
    assert eng.compile, "the engine fell back to the eager decode step"
    try:
        cases = [([1, 2, 3], SamplingParams(max_tokens=30, temperature=0)),
                 ([4], SamplingParams(max_tokens=30, seed=9, top_p=0.9)),
                 ([5, 6], SamplingParams(max_tokens=12, seed=2, top_k=5, temperature=0.8)),
                 ([7, 8, 9, 10], SamplingParams(max_tokens=25, temperature=0))]  # waits for a free slot
        reqs = [eng.submit(p, s) for p, s in cases]
        for r, (prompt, p) in zip(reqs, cases, strict=True):
            want = generate(reference, [prompt], p.max_tokens, temperature=p.temperature, top_k=p.top_k,
                            top_p=p.top_p, seed=p.seed)[0][len(prompt):]
            assert [e.token for e in collect(r)[0]] == want
    finally:
        eng.shutdown(timeout=5)


def test_a_packed_forward_of_parts_equals_each_part_alone() -> None:
    """``GPT.forward(parts=...)`` (the engine's mixed step: running rows' decode tokens and new
    prompts' prefill chunks in one forward) gives each row's last logits and writes the same KV
    cache as separate forwards; a later part's write to a slot wins (a row being prefilled also
    sits in the decode part, writing a throw-away token at its next prompt slot)."""
    from gpt2model.model import Part

    torch.manual_seed(1)
    m = GPT(GPTconfig(context_length=32, vocab_size=50, n_layer=2, n_head=2, d_model=32)).eval()
    m.setup_cache(4, 32)
    m.check_inputs = False
    try:
        with torch.no_grad():
            hist = torch.randint(0, 50, (3, 6))  # rows 0..2: six tokens each in the cache
            m(hist, input_pos=torch.arange(6), cache_row=0)
            dec_ids, dec_pos = torch.randint(0, 50, (3, 1)), torch.tensor([[6], [6], [2]])
            dec_mask = m.causal_mask[dec_pos][:, None, :, :7]
            # row 2 is "being prefilled" from slot 2; row 3 gets a whole prompt (left-padded by one)
            pre_ids = torch.randint(0, 50, (2, 4))
            pre_pos = torch.tensor([[2, 3, 4, 5], [4, 0, 1, 2]])
            pre_ids[1, 0] = 0
            pre_mask = m.causal_mask[pre_pos][:, None, :, :6]
            rows = torch.tensor([2, 3])
            before = [(b.attn.kv_cache.k.clone(), b.attn.kv_cache.v.clone()) for b in m.transformer.h]
            packed = m(torch.cat([dec_ids.view(1, -1), pre_ids.view(1, -1)], 1),
                       parts=[Part(3, 1, dec_pos, dec_mask, 0), Part(2, 4, pre_pos, pre_mask, rows)])
            after = [(b.attn.kv_cache.k.clone(), b.attn.kv_cache.v.clone()) for b in m.transformer.h]
            for blk, (k, v) in zip(m.transformer.h, before, strict=True):
                blk.attn.kv_cache.k.copy_(k)
                blk.attn.kv_cache.v.copy_(v)
            dec = m(dec_ids, input_pos=dec_pos, mask=dec_mask, cache_row=0)[:, -1]
            pre = m(pre_ids, input_pos=pre_pos, mask=pre_mask, cache_row=rows, logits_to_keep=1)[:, -1]
        assert packed.shape == (1, 5, 50)
        torch.testing.assert_close(packed[0, :2], dec[:2])  # row 2's decode logits are thrown away
        torch.testing.assert_close(packed[0, 3:], pre)
        for blk, (k, v) in zip(m.transformer.h, after, strict=True):
            torch.testing.assert_close(blk.attn.kv_cache.k, k)
            torch.testing.assert_close(blk.attn.kv_cache.v, v)
        with pytest.raises(ValueError, match="input_ids must be"):
            m(dec_ids, parts=[Part(3, 1, dec_pos, dec_mask, 0)])
    finally:
        m.clear_cache()


def test_an_f16_model_gets_what_it_gets_alone_batched_and_mixed() -> None:
    """``--dtype f16`` (float16 weights, float32 math: FBGEMM on CPU) through the engine: greedy and
    seeded requests, submitted while others run (mixed forwards), get what ``generate`` gives each
    on its own with the same weights."""
    torch.manual_seed(0)
    m = GPT(CFG)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "ln" not in name:
                p.normal_(0, 0.15)
    m.quantize("f16", head=True)
    _REFERENCE[id(m)] = copy.deepcopy(m).eval()
    eng = Engine(m, max_batch=3)
    eng.start()
    assert eng.ready.wait(60)
    try:
        cases = [([1, 2, 3], SamplingParams(max_tokens=30, temperature=0)),
                 ([4, 5, 6, 7, 8, 9, 1, 2], SamplingParams(max_tokens=20, temperature=0.8, top_k=10, seed=3)),
                 ([7], SamplingParams(max_tokens=25, temperature=0)),
                 ([2, 7, 1, 8, 2, 8], SamplingParams(max_tokens=15, temperature=0))]
        reqs = [eng.submit(*cases[0])]
        head = [e.token for e in collect(reqs[0], 3)[0]]  # the first one decodes before the others come
        reqs += [eng.submit(*c) for c in cases[1:]]
        for i, (r, (prompt, p)) in enumerate(zip(reqs, cases, strict=True)):
            events = list(r.events())
            tokens = (head if i == 0 else []) + [e.token for e in events if isinstance(e, TokenEvent)]
            assert events[-1].reason == "length" and tokens == alone(m, prompt, p), p
        assert eng.stats()["mixed_steps"] >= 1
    finally:
        eng.shutdown(timeout=5)


def tokens_of(request: Request) -> list[int]:
    """The tokens of a request that ends normally (length or a stop token)."""
    tokens, finish = collect(request)
    assert finish is not None and finish.reason in ("length", "stop"), finish
    return [e.token for e in tokens]


@torch.no_grad()
def openai_loop(model: GPT, prompt: list[int], p: SamplingParams) -> list[int]:
    """OpenAI's definition, written out: before draw ``s`` the logit of token ``j`` is
    ``logit + logit_bias[j] - presence * (c[j] > 0) - frequency * c[j]`` over the tokens generated
    so far; the draw is ``sample_logits`` with the request's seed at step ``s``. A full forward
    per token (no cache)."""
    ids, out, counts = list(prompt), [], Counter()
    for step in range(p.max_tokens):
        logits = model(torch.tensor([ids]))[0, -1:]
        bias = torch.zeros(1, CFG.vocab_size)
        for t, v in (p.logit_bias or {}).items():
            bias[0, t] += v
        for t, c in counts.items():
            bias[0, t] -= p.presence_penalty + p.frequency_penalty * c
        seed = p.seed if p.seed is not None else 0
        token = int(sample_logits(logits, p.temperature, p.top_k, p.top_p, seed=seed, step=step, bias=bias))
        out.append(token)
        counts[token] += 1
        ids.append(token)
    return out


def test_penalties_and_logit_bias_follow_openais_formula_alone_and_batched(engine: Engine, model: GPT) -> None:
    """OpenAI's ``logit_bias``, ``presence_penalty`` and ``frequency_penalty``: each request gets
    what :func:`openai_loop` gives it, alone or batched, and a freed slot forgets its bias."""
    reference = _REFERENCE[id(model)]
    greedy = SamplingParams(max_tokens=30, temperature=0, presence_penalty=0.5, frequency_penalty=1.5,
                            logit_bias={3: 2.0, 7: -100.0})
    sampled = SamplingParams(max_tokens=25, temperature=0.8, top_k=20, seed=11, frequency_penalty=-0.7,
                             logit_bias={9: 1.0})
    plain = SamplingParams(max_tokens=20, temperature=0)
    want_greedy = openai_loop(reference, [1, 2, 3], greedy)
    want_sampled = openai_loop(reference, [4, 5], sampled)
    want_plain = generate(reference, [[6]], 20, temperature=0)[0][1:]
    # The penalties change the greedy text (else this test could not tell), and token 7 is banned.
    assert want_greedy != generate(reference, [[1, 2, 3]], 30, temperature=0)[0][3:]
    assert 7 not in want_greedy and len(set(want_greedy)) > 10  # the penalties spread the choices out
    # Alone, one after the other (each in slot 0, whose bias must be reset in between).
    assert tokens_of(engine.submit([1, 2, 3], greedy)) == want_greedy
    assert tokens_of(engine.submit([6], plain)) == want_plain
    assert tokens_of(engine.submit([4, 5], sampled)) == want_sampled
    # Batched: all three at once, in every slot.
    for order in ([0, 1, 2], [2, 0, 1]):
        jobs = [([1, 2, 3], greedy), ([4, 5], sampled), ([6], plain)]
        requests = {i: engine.submit(*jobs[i]) for i in order}
        got = {i: tokens_of(r) for i, r in requests.items()}
        assert got == {0: want_greedy, 1: want_sampled, 2: want_plain}


def test_a_large_logit_bias_forces_a_token_and_bad_values_are_refused(engine: Engine) -> None:
    for params in (SamplingParams(max_tokens=8, temperature=0, logit_bias={5: 100.0}),
                   SamplingParams(max_tokens=8, temperature=1.0, seed=3, logit_bias={5: 100.0})):
        assert tokens_of(engine.submit([1], params)) == [5] * 8
    bad = [dict(presence_penalty=2.5), dict(frequency_penalty=float("nan")), dict(logit_bias={50: 1.0}),
           dict(logit_bias={1: 101.0}), dict(logit_bias={"1": 1.0})]
    for fields in bad:
        with pytest.raises(ValueError, match="penalty|logit_bias"):
            engine.submit([1], SamplingParams(max_tokens=2, temperature=0, **fields))


def test_min_tokens_holds_back_the_stop_tokens(engine: Engine) -> None:
    """vLLM's ``min_tokens``: a stop token that would win at once (+100 bias) cannot be drawn
    before ``min_tokens`` tokens, then ends the request at the first chance."""
    p = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(5,), logit_bias={5: 100.0}, min_tokens=4)
    request = engine.submit([1], p)
    events = list(request.events())
    tokens = [e.token for e in events[:-1]]
    assert len(tokens) == 5 and 5 not in tokens[:4] and tokens[4] == 5 and events[-1].reason == "stop"
    p0 = SamplingParams(max_tokens=12, temperature=0.7, seed=2, stop_token_ids=(5,), logit_bias={5: 100.0})
    assert tokens_of(engine.submit([1], p0)) == [5]  # without min_tokens the stop token comes first
    with pytest.raises(ValueError, match="min_tokens"):
        engine.submit([1], SamplingParams(max_tokens=3, temperature=0, min_tokens=4))


def test_repetition_penalty_and_min_p_give_what_generate_gives_alone_and_batched(engine: Engine, model: GPT) -> None:
    """HF/vLLM's ``repetition_penalty`` (over the prompt and the generated tokens) and ``min_p``:
    each request gets what ``generate`` gives it with the same settings, alone (one after the other
    in slot 0, which must forget its penalties) or batched beside others, through the prefill's
    first token, the mixed forward and the decode step."""
    reference = _REFERENCE[id(model)]
    greedy = SamplingParams(max_tokens=30, temperature=0, repetition_penalty=1.3)
    sampled = SamplingParams(max_tokens=25, temperature=0.9, top_k=30, seed=11, min_p=0.2, repetition_penalty=1.15)
    min_p_only = SamplingParams(max_tokens=20, temperature=1.2, seed=4, min_p=0.3)
    plain = SamplingParams(max_tokens=20, temperature=0)
    jobs = [([1, 2, 3, 1, 2], greedy), ([4, 5], sampled), ([6], min_p_only), ([6, 7], plain)]
    want = [alone(model, prompt, p) for prompt, p in jobs]
    # The settings change the tokens (else this test could not tell).
    assert want[0] != generate(reference, [[1, 2, 3, 1, 2]], 30, temperature=0)[0][5:]
    assert want[1] != alone(model, [4, 5], SamplingParams(max_tokens=25, temperature=0.9, top_k=30, seed=11))
    assert want[2] != alone(model, [6], SamplingParams(max_tokens=20, temperature=1.2, seed=4))
    for (prompt, p), w in zip(jobs, want, strict=True):
        assert tokens_of(engine.submit(prompt, p)) == w
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]):  # 4 requests, 3 slots: one joins a running batch
        requests = {i: engine.submit(*jobs[i]) for i in order}
        assert {i: tokens_of(r) for i, r in requests.items()} == dict(enumerate(want)), order
    first = engine.submit(*jobs[1])
    head = [e.token for e in collect(first, 3)[0]]  # decoding: the next prompts go through its steps' forwards
    mixed = engine.stats()["mixed_steps"]
    rest = [engine.submit(*jobs[i]) for i in (0, 2)]
    assert [tokens_of(r) for r in rest] == [want[0], want[2]]
    assert head + tokens_of(first) == want[1]
    assert engine.stats()["mixed_steps"] > mixed
    assert tokens_of(engine.submit([6], SamplingParams(max_tokens=20, temperature=1.2, seed=4, min_p=None))) \
        == alone(model, [6], SamplingParams(max_tokens=20, temperature=1.2, seed=4))  # None: off, as in generate()
    for fields, fragment in ((dict(repetition_penalty=0.0), "repetition_penalty"), (dict(min_p=1.5), "min_p"),
                             (dict(min_p=float("nan")), "min_p")):
        with pytest.raises(ValueError, match=fragment):
            engine.submit([1], SamplingParams(max_tokens=2, **fields))


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])  # compiled: ~25 s
def test_a_model_with_more_rows_than_its_tokenizer_never_emits_or_lists_the_extra_ids(model: GPT,
                                                                                      compile: bool) -> None:
    """vocab_limit=40 on a 50-row model whose rows 40..49 win every draw by far (a nanoGPT export
    padded past its tokenizer): every token, logprob list and prompt logprob list stays below 40,
    each request gets what generate(vocab_limit=40) gives alone, and ids >= 40 are refused where a
    request names them (prompt, logit_bias as vLLM, stop ids)."""
    limit = 40
    m = copy.deepcopy(model)
    with torch.no_grad():  # as test_generate.padded_rows: ln_f's dimension 0 is 50, read by rows >= 40 only
        m.transformer.ln_f.weight[0], m.transformer.ln_f.bias[0] = 0.0, 50.0
        m.transformer.wte.weight[:limit, 0], m.transformer.wte.weight[limit:, 0] = 0.0, 100.0
    ref = copy.deepcopy(m)
    eng = Engine(m, max_batch=3, compile=compile, max_prefill_tokens=8, vocab_limit=limit)
    eng.start()
    assert eng.ready.wait(600)
    try:
        params = [SamplingParams(max_tokens=12, temperature=0, logprobs=5, prompt_logprobs=5),
                  SamplingParams(max_tokens=12, seed=3, top_k=4, logprobs=3),
                  SamplingParams(max_tokens=12, seed=4, top_p=0.9, repetition_penalty=1.3, logit_bias={5: 2.0},
                                 logprobs=2),
                  SamplingParams(max_tokens=12, seed=5, min_p=0.05, presence_penalty=0.5)]
        prompts = [[1, 2, 3], [4] * 20, [7, 8], [9]]  # 20 tokens: prefilled in chunks beside decoding rows
        if compile:  # (a graph per combination of settings costs seconds; eager covers them all)
            params, prompts = params[:2], prompts[:2]
        reqs = [eng.submit(pr, p) for pr, p in zip(prompts, params, strict=True)]
        for r, pr, p in zip(reqs, prompts, params, strict=True):
            events = list(r.events())
            assert isinstance(events[-1], FinishEvent) and events[-1].reason == "length"
            tokens = [e for e in events if isinstance(e, TokenEvent)]
            assert len(tokens) == 12 and max(e.token for e in tokens) < limit
            for e in tokens:
                assert all(t < limit for t, _ in e.top_logprobs or [])
            for e in events:
                if isinstance(e, PromptEvent):
                    assert all(t < limit for pe in e.tokens for t, _ in pe.top_logprobs)
            if not p.penalized():  # (generate has no logit_bias / OpenAI penalties)
                want = generate(ref, [pr], 12, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=p.seed,
                                repetition_penalty=p.repetition_penalty, min_p=p.min_p, vocab_limit=limit)[0]
                assert [e.token for e in tokens] == want[len(pr):]
        lp = [e for e in tokens if e.logprob is not None]
        assert not lp or all(e.logprob <= 0 for e in lp)
        assert any(t >= limit for t in generate(ref, [[1, 2, 3]], 12, temperature=0)[0][3:])  # without: drawn
        for bad, match in ((dict(logit_bias={45: 1.0}), r"logit_bias keys must be token ids in \[0, 40\)"),
                           (dict(stop_token_ids=(45,)), r"stop_token_ids must be token ids in \[0, 40\)")):
            with pytest.raises(ValueError, match=match):
                eng.submit([1], SamplingParams(max_tokens=2, **bad))
        with pytest.raises(ValueError, match="the prompt holds token id 45, past the tokenizer's 40 tokens"):
            eng.submit([1, 45], SamplingParams(max_tokens=2))
        if compile:
            assert eng.compile
    finally:
        eng.shutdown(timeout=5)


def test_a_failure_outside_any_request_fails_loudly_instead_of_hanging(model: GPT) -> None:
    """An exception escaping the inference loop (a bug, not one request's step) used to end the
    thread quietly: running requests were "cancelled" and every later request waited forever while
    /health said ok. Now they end with "error", submit() refuses, and stats() says why."""
    engine = Engine(copy.deepcopy(model), max_batch=2, max_queue=4)
    engine.start()
    assert engine.ready.wait(60)
    try:
        engine._drop_cancelled = lambda: (_ for _ in ()).throw(RuntimeError("boom"))  # noqa: SLF001
        events = list(engine.submit([1, 2], SamplingParams(max_tokens=5, temperature=0)).events())
        assert events[-1].reason == "error" and "boom" in events[-1].error
        with pytest.raises(RuntimeError, match="inference thread failed: RuntimeError: boom"):
            engine.submit([1], SamplingParams(max_tokens=1))
        assert "boom" in engine.stats()["error"]
        pytest.importorskip("fastapi")
        from fastapi.testclient import TestClient

        from gpt2model.server import ServerConfig, create_app
        from gpt2model.tokenizer import CharTokenizer

        app = create_app(engine, CharTokenizer([chr(65 + i) for i in range(CFG.vocab_size)]), ServerConfig("m"))
        health = TestClient(app).get("/health")
        assert health.status_code == 503 and "boom" in health.json()["error"]
    finally:
        engine.shutdown(1)
