"""OpenAI's ``logit_bias``, ``presence_penalty`` and ``frequency_penalty`` in the serving engine:
each request gets exactly what a plain full-forward loop applying OpenAI's formula gives it,
alone or batched beside other requests, and a freed slot forgets its bias."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from gpt2model import GPT, GPTconfig
from gpt2model.engine import Engine, FinishEvent, Request, SamplingParams
from gpt2model.generate import generate, sample_logits

CFG = GPTconfig(context_length=64, vocab_size=50, n_layer=2, n_head=2, d_model=32)


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    m = GPT(CFG)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # spiky weights: clear winners, so penalties visibly change the text
        for name, p in m.named_parameters():
            if "ln" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return m.eval()


@pytest.fixture(scope="module")
def reference(model: GPT) -> GPT:
    ref = GPT(CFG).eval()
    ref.load_state_dict(model.state_dict())
    return ref


@pytest.fixture
def engine(model: GPT):
    eng = Engine(model, max_batch=3, max_queue=8)
    eng.start()
    assert eng.ready.wait(60)
    yield eng
    eng.shutdown(timeout=5)


def tokens_of(request: Request) -> list[int]:
    out = []
    for event in request.events():
        if isinstance(event, FinishEvent):
            assert event.reason in ("length", "stop"), event
            return out
        out.append(event.token)
    raise AssertionError("no FinishEvent")


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


def test_penalties_and_logit_bias_follow_openais_formula_alone_and_batched(engine: Engine, model: GPT,
                                                                           reference: GPT) -> None:
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
    assert len(tokens) == 4 and 5 not in tokens and events[-1].reason == "stop"
    p0 = SamplingParams(max_tokens=12, temperature=0.7, seed=2, stop_token_ids=(5,), logit_bias={5: 100.0})
    assert tokens_of(engine.submit([1], p0)) == []  # without min_tokens the stop token comes first
    with pytest.raises(ValueError, match="min_tokens"):
        engine.submit([1], SamplingParams(max_tokens=3, temperature=0, min_tokens=4))
