"""repetition_penalty and min_p (HF's RepetitionPenaltyLogitsProcessor and MinPLogitsWarper, vLLM's
and llama.cpp's settings of the same names): sample_logits against HF's processors on random logits,
generate against HF's greedy search on a converted model, compiled against eager, hand-built
distributions, bad input and the CLI flags."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_generate import profiled_steps, spiky  # (tests/ is on sys.path: pytest's default import mode)

from gpt2model import GPT, GPTconfig
from gpt2model import generate as gen_mod
from gpt2model.generate import generate, sample_logits, stream

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (  # noqa: E402
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def factors(seen: list[list[int]], penalty: list[float], V: int) -> torch.Tensor:
    """The ``penalty`` argument of sample_logits: row b's factor ``penalty[b]`` at its seen ids, 1 elsewhere."""
    out = torch.ones(len(seen), V)
    for b, ids in enumerate(seen):
        out[b, ids] = penalty[b]
    return out


def hf_scores(logits: torch.Tensor, seen: list[int], penalty: float, temperature: float, top_k: int, top_p: float,
              min_p: float) -> torch.Tensor:
    """One row ``(1, V)`` through HF's processors in HF's order (penalty on the raw logits;
    temperature, top-k, top-p, min-p when sampling); dropped tokens -inf."""
    ids = torch.tensor([seen])
    scores = logits.clone()
    if penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(penalty)(ids, scores)
    if temperature == 0:
        return scores
    for warper in ([TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k > 0 else [])
                   + ([TopPLogitsWarper(top_p)] if top_p < 1 else []) + ([MinPLogitsWarper(min_p)] if min_p else [])):
        scores = warper(ids, scores)
    return scores


# Rows: greedy with a penalty; top-k + min-p; top-p + min-p; min-p alone without penalty; all of them with a
# penalty < 1 (which favours repeats); min-p off. V > NUCLEUS_CANDIDATES, so eager top-p takes its candidate path.
ROWS = [  # (penalty, temperature, top_k, top_p, min_p)
    (1.3, 0.0, 0, 1.0, 0.0),
    (1.5, 1.0, 20, 1.0, 0.3),
    (1.2, 0.7, 0, 0.9, 0.05),
    (1.0, 1.3, 0, 1.0, 0.2),
    (0.8, 2.0, 50, 0.95, 0.3),
    (2.0, 1.1, 0, 1.0, 0.0),
]


def test_sample_logits_equals_hf_processors_per_row_and_alone() -> None:
    g = torch.Generator().manual_seed(0)
    B, V = len(ROWS), 1000
    logits = torch.randn(B, V, generator=g) * 3
    # Each row has seen some random ids and its 3 most likely ones (so the penalty moves the top).
    seen = [torch.randint(0, V, (30,), generator=g).tolist() + logits[b].topk(3).indices.tolist() for b in range(B)]
    penalty, temperature, top_k, top_p, min_p = (list(c) for c in zip(*ROWS, strict=True))
    pen = factors(seen, penalty, V)
    per_row = dict(temperature=torch.tensor(temperature), top_k=torch.tensor(top_k), top_p=torch.tensor(top_p),
                   penalty=pen, min_p=torch.tensor(min_p))
    hf = torch.cat([hf_scores(logits[b:b + 1], seen[b], *ROWS[b]) for b in range(B)])
    kept = hf > float("-inf")
    # The reference draw: HF's filtered scores + our Gumbel noise of (seed + b, step, id), argmax.
    noise_ids = gen_mod._id_hashes(V, logits.device)
    assert logits[0].argmax() != hf[0].argmax()  # the greedy row's penalty changes its token
    # min-p removes tokens that top-k / top-p / temperature alone keep, in every row that uses it
    no_min_p = torch.cat([hf_scores(logits[b:b + 1], seen[b], *ROWS[b][:4], 0.0) for b in range(B)])
    assert all(((no_min_p[b] > float("-inf")) & ~kept[b]).any() for b in range(B) if min_p[b] > 0)
    changed = 0
    for step in range(40):
        keys = gen_mod._row_keys(gen_mod.row_seeds(7, B), torch.full((B,), step))
        expected = (hf + gen_mod._gumbel(keys, noise_ids)).argmax(dim=-1)
        expected[0] = hf[0].argmax()
        assert sample_logits(logits, seed=7, step=step, **per_row).tolist() == expected.tolist(), step
        for b in range(B):  # one row alone, settings as numbers: the top-k shortcut, nucleus candidates, full rows
            alone = sample_logits(logits[b:b + 1], temperature[b], top_k[b] or None, top_p[b] if top_p[b] < 1 else None,
                                  seed=7 + b, step=step, penalty=pen[b:b + 1], min_p=min_p[b])
            assert int(alone) == int(expected[b]), (step, b)
        unfiltered = sample_logits(logits, seed=7, step=step, **(per_row | dict(min_p=None)))
        changed += int((unfiltered != expected).sum())
    assert changed > 10  # min-p changed many draws
    # Per-row top-k and min-p without top-p (eager: the top-k candidate path with per-row k).
    rows_k = torch.tensor([1, 20, 5, 100, 50, 1000])
    hf_k = torch.cat([hf_scores(logits[b:b + 1], seen[b], penalty[b], max(temperature[b], 0.5), int(rows_k[b]), 1.0,
                                min_p[b]) for b in range(B)])
    for step in range(10):
        keys = gen_mod._row_keys(gen_mod.row_seeds(3, B), torch.full((B,), step))
        expected = (hf_k + gen_mod._gumbel(keys, noise_ids)).argmax(dim=-1)
        drawn = sample_logits(logits, torch.tensor(temperature).clamp(min=0.5), rows_k, seed=3, step=step,
                              penalty=pen, min_p=torch.tensor(min_p))
        assert drawn.tolist() == expected.tolist()


def test_sample_logits_compiled_equals_eager() -> None:
    g = torch.Generator().manual_seed(1)
    B, V = len(ROWS), 300
    logits = torch.randn(B, V, generator=g) * 3
    penalty, temperature, top_k, top_p, min_p = (torch.tensor(c) for c in zip(*ROWS, strict=True))
    pen = factors([torch.randint(0, V, (20,), generator=g).tolist() for _ in range(B)], penalty.tolist(), V)
    args = dict(temperature=temperature, top_k=top_k, top_p=top_p, penalty=pen, min_p=min_p, seed=torch.arange(B))
    compiled = torch.compile(sample_logits, fullgraph=True, dynamic=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(3):
            steps = torch.full((B,), step)
            assert torch.equal(compiled(logits, step=steps, **args), sample_logits(logits, step=steps, **args))


def draws(probs: list[float], n: int = 2000, **kwargs) -> set[int]:
    logits = torch.tensor(probs).log().expand(n, -1)
    return set(sample_logits(logits, seed=0, **kwargs).tolist())


def test_min_p_keeps_tokens_at_least_min_p_times_the_top_probability() -> None:
    probs = [0.15, 0.5, 0.05, 0.3]
    assert draws(probs, min_p=0.3) == {0, 1, 3}  # >= 0.15
    assert draws(probs, min_p=0.5) == {1, 3}  # >= 0.25
    assert draws(probs, min_p=0.61) == {1}
    assert draws(probs, min_p=1.0) == {1}  # only the most likely (and tokens tied with it)
    assert draws([0.4, 0.4, 0.2], min_p=1.0) == {0, 1}
    assert draws(probs, min_p=0.0) == draws(probs) == {0, 1, 2, 3}  # 0 = off
    # After temperature: at 2 the ratios are square roots (0.05 / 0.5 -> 0.316), so all four stay.
    assert draws(probs, min_p=0.3, temperature=2.0) == {0, 1, 2, 3}
    assert draws(probs, min_p=0.3, temperature=0.5) == {1, 3}  # 0.15/0.5 squared = 0.09 < 0.3
    # After top-k and top-p (HF's order); the threshold is relative to the row's top token in both.
    assert draws(probs, min_p=0.3, top_k=2) == {1, 3}
    assert draws(probs, min_p=0.3, top_p=0.9) == {0, 1, 3}
    # Per row; greedy rows ignore it.
    logits = torch.tensor([probs] * 3).log()
    for step in range(50):
        rows = sample_logits(logits, torch.tensor([1.0, 0.0, 1.0]), min_p=torch.tensor([0.61, 0.99, 0.0]), seed=0,
                             step=step)
        assert rows[0] == 1 and rows[1] == 1


def test_repetition_penalty_is_hf_formula() -> None:
    logits = torch.tensor([[2.0, -2.0, 0.0, 1.0]])
    pen = torch.tensor([[1.25, 1.25, 1.25, 1.0]])
    # Positive logits are divided, negative ones multiplied (both less likely); unseen unchanged.
    assert sample_logits(logits, 0, penalty=pen).tolist() == [0]  # 1.6 > 1.0
    assert sample_logits(logits * torch.tensor([[1, 1, 1, 1.7]]), 0, penalty=pen).tolist() == [3]  # 1.7 > 1.6
    penalized = RepetitionPenaltyLogitsProcessor(1.25)(torch.tensor([[0, 1, 2]]), logits.clone())
    assert torch.equal(penalized, torch.tensor([[1.6, -2.5, 0.0, 1.0]]))
    # Bit for bit HF's values on random logits (zeros and infinities included), per-row penalties above and below 1.
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 500, generator=g) * 4
    x[0, :5], x[1, :3] = 0.0, torch.tensor([float("inf"), float("-inf"), -0.0])
    seen = [torch.randint(0, 500, (60,), generator=g).tolist() + list(range(6)) for _ in range(4)]
    penalties = [1.3, 0.7, 2.0, 1.0001]
    hf = torch.cat([RepetitionPenaltyLogitsProcessor(p)(torch.tensor([s]), x[b:b + 1].clone())
                    for b, (s, p) in enumerate(zip(seen, penalties, strict=True))])
    ours = gen_mod._penalize(x, factors(seen, penalties, 500))
    assert torch.equal(ours, hf) and not torch.equal(ours, x)
    # Sampling draws from the penalized distribution: logits (3, 2), token 0 seen with penalty 50 -> (0.06, 2).
    drawn = sample_logits(torch.tensor([[3.0, 2.0]]).expand(4000, -1), seed=1, penalty=torch.tensor([[50.0, 1.0]]))
    assert abs((drawn == 0).float().mean().item() - torch.tensor([0.06, 2.0]).softmax(0)[0].item()) < 0.02


# --- generate -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[GPT, object]:
    """A GPT-2-shaped model (50,257 ids) and its HF conversion; std 0.05 makes greedy repeat."""
    path = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    model = spiky(GPT(GPTconfig(context_length=64, vocab_size=50257, n_layer=2, n_head=2, d_model=64)), std=0.05)
    model.save_pretrained(path)
    return model, transformers.GPT2LMHeadModel.from_pretrained(path).eval()


def test_greedy_repetition_penalty_matches_hf_generate(converted) -> None:
    model, hf = converted
    prompt = torch.randint(0, 50257, (2, 6), generator=torch.Generator().manual_seed(2))
    new = 30
    common = dict(max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        plain = hf.generate(prompt, attention_mask=torch.ones_like(prompt), **common)
        expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), repetition_penalty=1.3, **common)
    ours = generate(model, prompt, new, temperature=0, repetition_penalty=1.3)
    assert torch.equal(ours, expected)
    assert torch.equal(generate(model, prompt, new, temperature=0), plain)
    # The penalty matters here: greedy repeats a few tokens, the penalized continuation does not.
    assert all(len(set(row[6:].tolist())) <= 8 for row in plain)
    assert all(len(set(row[6:].tolist())) >= 20 for row in expected)
    # Prompts of different lengths (left-padded): the padding is not penalized, as HF ignores it too.
    rows = [[5, 6, 7, 5, 6, 7, 5], [9, 10]]
    ids = torch.tensor([rows[0], [0] * 5 + rows[1]])
    mask = torch.tensor([[1] * 7, [0] * 5 + [1] * 2])
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, repetition_penalty=1.3, **common)
    ours = generate(model, rows, new, temperature=0, repetition_penalty=1.3)
    assert ours == [expected[0].tolist(), expected[1, 5:].tolist()]


def test_penalty_buffer_holds_the_unpadded_prompt() -> None:
    bufs = gen_mod._Buffers(2, 8, 4, torch.float32, torch.device("cpu"))
    prompt = torch.tensor([[3, 4, 3], [0, 0, 5]])
    valid = torch.tensor([[True] * 3, [False, False, True]])
    bufs.use_penalty(1.5, prompt, valid, 10)
    assert bufs.penalty.tolist() == [[1.5 if i in (3, 4) else 1.0 for i in range(10)],
                                     [1.5 if i == 5 else 1.0 for i in range(10)]]
    gen_mod._record(bufs.out, torch.tensor([0]), bufs.done, bufs.eot, bufs.finished, torch.tensor([7, 0]),
                    bufs.penalty, bufs.repeat)
    assert bufs.penalty[0, 7] == bufs.penalty[1, 0] == 1.5 and bufs.penalty[0, 0] == 1.0
    bufs.use_penalty(1.0, prompt, valid, 10)
    assert bufs.penalty is None


def test_sampled_penalty_and_min_p_rows_alone_batched_streamed() -> None:
    torch.manual_seed(0)
    model = spiky(GPT(GPTconfig(context_length=32, vocab_size=64, n_layer=1, n_head=2, d_model=32)), std=0.2)
    prompts = [[5, 6, 5, 6], [9, 9, 9, 9], [1, 2, 3, 4]]  # one length: the window slides alike alone
    kw = dict(seed=4, top_k=30, repetition_penalty=1.4, min_p=0.1)
    batched = generate(model, prompts, 40, **kw)  # 40 > context 32: the window slides once (a prefill draw)
    for i, p in enumerate(prompts):
        assert generate(model, [p], 40, **(kw | dict(seed=4 + i)))[0] == batched[i]
    assert [p + [int(t[i]) for t in stream(model, prompts, 40, **kw)] for i, p in enumerate(prompts)] == batched
    assert batched != generate(model, prompts, 40, seed=4, top_k=30)
    assert batched != generate(model, prompts, 40, **(kw | dict(min_p=None)))
    assert batched != generate(model, prompts, 40, **(kw | dict(repetition_penalty=1.0)))


def test_compiled_generate_with_penalty_and_min_p_equals_eager(converted) -> None:
    model = converted[0]
    prompt = torch.tensor([[11, 12, 13, 11], [40, 41, 42, 43]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = dict(seed=5, repetition_penalty=1.2, min_p=0.05)
        assert torch.equal(generate(model, prompt, 12, compile=True, **kw), generate(model, prompt, 12, **kw))
    assert getattr(model, "_decode_compile_error", None) is None


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
    (dict(repetition_penalty=-1.0), "repetition_penalty must be"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty must be"),
    (dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
    (dict(min_p=-0.1), "min_p must be in"),
])
def test_bad_settings_raise_value_error(kwargs: dict, fragment: str) -> None:
    model = GPT(GPTconfig(context_length=16, vocab_size=50, n_layer=1, n_head=2, d_model=16))
    with pytest.raises(ValueError, match=fragment):
        generate(model, [[1, 2]], 3, **kwargs)


def test_sample_cli_flags(tmp_path, capsys) -> None:
    from gpt2model.cli import main
    from gpt2model.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text("abcdefghij ROMEO:\n")
    torch.manual_seed(0)
    model = spiky(GPT(GPTconfig(context_length=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16)),
                  std=0.1)
    model.save_pretrained(tmp_path / "m", tokenizer=tok)
    args = ["sample", "--model", str(tmp_path / "m"), "--device", "cpu", "--prompt", "ROMEO:", "--max-new-tokens",
            "40", "--seed", "3"]
    prompt = [tok.encode("ROMEO:")]
    for extra, kw in ((["--temperature", "0", "--repetition-penalty", "1.5"],
                       dict(temperature=0, repetition_penalty=1.5)),
                      (["--min-p", "0.2", "--repetition-penalty", "1.2"],
                       dict(temperature=0.8, min_p=0.2, repetition_penalty=1.2))):
        assert main([*args, *extra]) == 0
        out = capsys.readouterr().out
        assert out == tok.decode(generate(model, prompt, 40, seed=3, **kw)[0]) + "\n"
        assert main([*args, *extra, "--stream"]) == 0
        assert capsys.readouterr().out == out
    assert main([*args, "--temperature", "0"]) == 0
    assert capsys.readouterr().out != tok.decode(generate(model, prompt, 40, temperature=0, repetition_penalty=1.5)[0])
    for extra, fragment in ((["--repetition-penalty", "0"], "repetition_penalty must be"),
                            (["--min-p", "2"], "min_p must be in")):
        assert main([*args, *extra]) == 2
        assert fragment in capsys.readouterr().err


# --- CUDA (run by the lead on a GPU; skipped elsewhere) ---------------------------------------------------------
def _cuda_model() -> GPT:
    torch.manual_seed(0)
    return spiky(GPT(GPTconfig(context_length=128, vocab_size=50, n_layer=2, n_head=2, d_model=32)), std=0.15).cuda()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the CUDA-graph decode step)")
def test_cuda_graph_generate_with_penalty_and_min_p_is_one_replay_per_token() -> None:
    """With a repetition penalty and min_p the CUDA-graph step is still one graph replay per token
    (the penalty factors are updated inside it: no kernel, copy or sync outside), and the tokens
    are eager's."""
    model = _cuda_model()
    prompts = [[1, 2, 3, 4, 5], [6], [7, 8, 9]]
    kw = dict(seed=3, top_k=20, repetition_penalty=1.3, min_p=0.1)
    eager = generate(model, prompts, 40, **kw)
    assert eager != generate(model, prompts, 40, seed=3, top_k=20)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="torch.compile of the decode step failed")
        assert generate(model, prompts, 40, compile=True, **kw) == eager
        it = stream(model, prompts, 40, compile=True, _views=True, **kw)
        for _ in range(5):
            next(it)
        names = profiled_steps(it)
    assert sum(n.startswith("cudaGraphLaunch") for n in names) == 20, sorted(set(names))
    assert [n for n in names if n.startswith(("cudaLaunchKernel", "cuLaunchKernel", "cudaMemset"))] == []
    assert names.count("cudaStreamSynchronize") == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the CUDA-graph decode step)")
def test_cuda_graph_engine_with_penalty_and_min_p_matches_generate() -> None:
    import copy

    from gpt2model.engine import Engine, FinishEvent, SamplingParams

    model = _cuda_model()
    reference = copy.deepcopy(model)
    jobs = [([1, 2, 3, 1, 2], SamplingParams(max_tokens=30, temperature=0, repetition_penalty=1.3)),
            ([4, 5], SamplingParams(max_tokens=30, temperature=0.9, seed=11, min_p=0.2, repetition_penalty=1.15)),
            ([6], SamplingParams(max_tokens=30, temperature=0))]
    want = [generate(reference, [prompt], p.max_tokens, temperature=p.temperature, seed=p.seed, min_p=p.min_p,
                     repetition_penalty=p.repetition_penalty)[0][len(prompt):] for prompt, p in jobs]
    eng = Engine(model, max_batch=2, compile=True)
    eng.start()
    assert eng.ready.wait(600)
    try:
        for order in ([0, 1, 2], [2, 1, 0]):
            requests = {i: eng.submit(*jobs[i]) for i in order}
            got = {i: [e.token for e in r.events() if not isinstance(e, FinishEvent)] for i, r in requests.items()}
            assert got == dict(enumerate(want)), order
        assert eng.compile  # no fall back to eager
    finally:
        eng.shutdown(timeout=5)
