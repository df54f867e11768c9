"""Generation: the KV-cached loop against full recomputes and HF's greedy search, sampling filters
on hand-built distributions, batching, stopping, streaming, bf16, bad input, and the CLI verb."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence

import pytest
import torch

from gpt2model import GPT, GPTconfig
from gpt2model import generate as gen_mod
from gpt2model.generate import generate, sample_logits, stream, stream_text

TINY = GPTconfig(context_length=16, vocab_size=50, n_layer=2, n_head=2, d_model=32)


def spiky(model: GPT, std: float = 0.15, seed: int = 0) -> GPT:
    """Re-draw the weights with a larger std: GPT-2's init (0.02) gives nearly flat logits, and
    greedy decoding then repeats one token forever, which would make every comparison weak."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def tiny(config: GPTconfig = TINY, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return spiky(GPT(config), seed=seed)


def recompute(model: GPT, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy without a cache, following the documented window rule: crop the prompt to the last
    context_length tokens; when a window would exceed the context, restart it at the last
    context_length // 2 tokens. Returns the ids and the logits of every step."""
    C = model.config.context_length
    ids = list(prompt)
    start = max(0, len(ids) - C)
    all_logits = []
    with torch.no_grad():
        for _ in range(n):
            if len(ids) - start > C:
                start = len(ids) - C // 2
            logits = model(torch.tensor([ids[start:]]))[0, -1]
            all_logits.append(logits)
            ids.append(int(logits.argmax()))
    return ids, all_logits


class CharDecoder:
    """A stand-in tokenizer: id i <-> one character (no dependency on tokenizer.py)."""

    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWX"
    eot = None

    def encode(self, text: str) -> list[int]:
        return [self.chars.index(c) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids)


def record_logits(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Capture the logits that the generation loop samples from at every step."""
    seen: list[torch.Tensor] = []
    real = gen_mod.sample_logits

    def spy(logits: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        seen.append(logits.clone())
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(gen_mod, "sample_logits", spy)
    # A greedy CPU step can run as one op that never hands its logits out (GPT.fused_greedy_step;
    # the same tokens, tested in test_cpukernels.py): here the step's torch ops, which do.
    monkeypatch.setattr(GPT, "fused_greedy_step", lambda self, *args: False)
    return seen


# --- the cache against full recomputes -------------------------------------------------------------
def test_cached_logits_equal_full_recompute_at_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny()
    seen = record_logits(monkeypatch)
    prompt = [3, 1, 4, 1, 5]
    # 40 new tokens with context 16: the window slides several times (prefill of the last 8).
    out = generate(model, torch.tensor([prompt]), 40, temperature=0)
    ids, ref_logits = recompute(model, prompt, 40)
    assert out[0].tolist() == ids
    assert len(seen) == 40
    for step, (cached, full) in enumerate(zip(seen, ref_logits, strict=True)):
        assert torch.allclose(cached[0], full, atol=1e-5, rtol=0), f"step {step}"
    assert not hasattr(model, "causal_mask") and model.check_inputs  # the model is left as it was


def test_prefill_runs_the_head_on_the_last_position_only() -> None:
    """A prefill of T tokens feeds the LM head one row per sequence, not T (the head over every
    prompt position is as costly as the body at 50,257 ids), and its logits are the full
    forward's last row; ``logits_to_keep`` on the plain forward is the full output's tail."""
    model = tiny(GPTconfig(context_length=32, vocab_size=50, n_layer=2, n_head=2, d_model=32))
    head_rows: list[int] = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: head_rows.append(args[0].size(1)))
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [2, 7, 1, 8]]  # left-padded: the last position is real
    try:
        model.setup_cache(2, 16)
        ids, valid = gen_mod._as_padded_batch(prompts, 50, model.device)
        bufs = gen_mod._Buffers(2, 16, 5, model.dtype, model.device)
        window = gen_mod._Window(model, ids, valid, bufs, torch.zeros(2, dtype=torch.long), ())
        last = window.fill(0)
    finally:
        model.clear_cache()
        hook.remove()
    assert head_rows == [1]
    for row, prompt in enumerate(prompts):
        torch.testing.assert_close(last[row], model(torch.tensor([prompt]))[0, -1], rtol=1e-5, atol=1e-5)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    full = model(ids)
    assert torch.equal(model(ids, logits_to_keep=0), full)
    torch.testing.assert_close(model(ids, logits_to_keep=3), full[:, -3:], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model(ids, logits_to_keep=20), full, rtol=0, atol=0)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, logits_to_keep=-1)


def test_ragged_batch_logits_equal_each_row_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny()
    prompts = [[7], [1, 2, 3, 4, 5, 6], [9, 8, 7]]
    seen = record_logits(monkeypatch)
    out = generate(model, prompts, 10, temperature=0)  # 6 + 10 = context: no slide
    for row, prompt in enumerate(prompts):
        ids, ref_logits = recompute(model, prompt, 10)
        assert out[row] == ids
        for cached, full in zip(seen, ref_logits, strict=True):
            assert torch.allclose(cached[row], full, atol=1e-5, rtol=0)


def test_long_prompt_is_cropped_with_a_warning() -> None:
    model = tiny()
    prompt = list(torch.randint(0, 50, (40,), generator=torch.Generator().manual_seed(1)).tolist())
    with pytest.warns(UserWarning, match="more than context_length 16"):
        out = generate(model, [prompt], 12, temperature=0)
    assert out[0] == recompute(model, prompt, 12)[0]


# --- HF parity ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("config, prompt_len, new", [
    (GPTconfig(), 7, 40),  # the seed's config
    (GPTconfig(context_length=1024, vocab_size=50257, n_layer=2, n_head=2, d_model=64), 9, 30),  # GPT-2 shaped
    (GPTconfig(context_length=24, vocab_size=50, n_layer=2, n_head=2, d_model=32), 5, 19),  # up to the context
])
def test_greedy_matches_hf_generate(tmp_path, config: GPTconfig, prompt_len: int, new: int) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = spiky(GPT(config), std=0.1)
    model.save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    prompt = torch.randint(0, config.vocab_size, (2, prompt_len), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                               do_sample=False, pad_token_id=0, eos_token_id=None)
    ours = model.generate(prompt, new, temperature=0)
    assert ours.shape == expected.shape
    assert torch.equal(ours, expected)


# --- sampling ----------------------------------------------------------------------------------------
def draws(probs: list[float], n: int = 4000, **kwargs) -> torch.Tensor:
    logits = torch.tensor(probs).log().expand(n, -1)
    return sample_logits(logits, generator=torch.Generator().manual_seed(0), **kwargs)


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    assert set(draws(probs, top_p=0.8).tolist()) == {0, 1}
    assert set(draws(probs, top_p=0.81).tolist()) == {0, 1, 2}
    assert set(draws(probs, top_p=0.5).tolist()) == {0}
    assert set(draws(probs, top_p=0.01).tolist()) == {0}  # always at least the most likely token
    # top_p 0: only the most likely token, as HF's TopPLogitsWarper (min_tokens_to_keep=1) and llama.cpp
    # keep it (it was an error while the server, after OpenAI, already read 0 as greedy)
    assert set(draws(probs, top_p=0.0).tolist()) == {0}
    assert set(draws(probs, top_p=torch.tensor([0.0] * 4000)).tolist()) == {0}  # the per-row (engine) path
    assert set(draws(probs, top_p=1.0).tolist()) == {0, 1, 2, 3}
    # Order in the vocabulary does not matter, and the kept tokens are renormalised.
    kept = draws([0.05, 0.3, 0.15, 0.5], top_p=0.8)
    assert set(kept.tolist()) == {1, 3}
    assert abs((kept == 3).float().mean().item() - 0.5 / 0.8) < 0.03
    # Tokens tied with the last one kept stay (as with top_k), whatever order a sort puts them in.
    assert set(draws([0.2, 0.3, 0.1, 0.2, 0.2], top_p=0.45).tolist()) == {0, 1, 3, 4}


def test_top_k_and_temperature() -> None:
    probs = [0.1, 0.4, 0.2, 0.3]
    assert set(draws(probs, top_k=2).tolist()) == {1, 3}
    assert set(draws(probs, top_k=1).tolist()) == {1}
    assert set(draws(probs, top_k=10).tolist()) == {0, 1, 2, 3}
    assert set(draws(probs, top_k=3, top_p=0.6).tolist()) == {1, 3}  # top-k first, then the nucleus of the rest
    assert set(draws(probs, temperature=0).tolist()) == {1}  # greedy
    # Temperature 0.5 squares the probabilities before renormalising.
    x = draws([0.25, 0.75], n=20000, temperature=0.5)
    assert abs((x == 1).float().mean().item() - 0.9) < 0.01
    # bf16 logits are sampled in fp32.
    assert sample_logits(torch.tensor([[0.0, 5.0]], dtype=torch.bfloat16), temperature=0).tolist() == [1]


def test_same_seed_same_sample() -> None:
    model = tiny()
    prompt = torch.tensor([[1, 2, 3]])
    a = generate(model, prompt, 30, seed=123, top_k=20)
    b = generate(model, prompt, 30, seed=123, top_k=20)
    c = generate(model, prompt, 30, seed=124, top_k=20)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(generate(model, prompt, 20, generator=g1), generate(model, prompt, 20, generator=g2))


# --- batching and stopping ---------------------------------------------------------------------------
def test_batch_of_different_lengths_equals_one_by_one() -> None:
    model = tiny(GPTconfig(context_length=64, vocab_size=50, n_layer=2, n_head=2, d_model=32))
    prompts = [[5], [1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 3]]
    batched = generate(model, prompts, 20, temperature=0)
    alone = [generate(model, [p], 20, temperature=0)[0] for p in prompts]
    assert batched == alone
    # And as tensors, for prompts of equal length.
    x = torch.tensor([[1, 2, 3], [4, 5, 6]])
    both = generate(model, x, 20, temperature=0)
    assert torch.equal(both[1:], generate(model, x[1:], 20, temperature=0))


def first_new_token(ids: list[int]) -> int:
    """Index of the first token that differs from all before it (skipping index 0)."""
    return next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])


@pytest.mark.parametrize("late", [False, True])
def test_stop_on_eot_rows_finish_and_are_padded(late: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows end at eot; with ``late`` (as on CUDA, forced on the CPU) whether every row is done is
    read one step late (the device is never idle waiting for the host): the same tokens come out."""
    reads = []
    if late:
        monkeypatch.setattr(gen_mod, "READ_DONE_LATE_ON", ("cpu", "cuda"))
        real = gen_mod._LateFlag.previous
        monkeypatch.setattr(gen_mod._LateFlag, "previous", lambda self: reads.append(real(self)) or reads[-1])
    model = tiny(GPTconfig(context_length=64, vocab_size=50, n_layer=2, n_head=2, d_model=32), seed=1)
    prompts = [[5], [1, 2, 3, 4]]
    free = generate(model, prompts, 20, temperature=0)
    cont0, cont1 = free[0][1:], free[1][4:]
    k = first_new_token(cont0)
    eot = cont0[k]
    stopped = generate(model, prompts, 20, temperature=0, eot_id=eot)
    assert stopped[0] == [5] + cont0[:k + 1]  # ends with (and includes) the eot token
    assert stopped[1] == [1, 2, 3, 4] + (cont1[:cont1.index(eot) + 1] if eot in cont1 else cont1)
    # As a tensor: a finished row keeps being padded with eot while the other goes on, and the
    # loop ends as soon as every row is done.
    x = torch.tensor([[5] * 4, [1, 2, 3, 4]])
    free_t = generate(model, x, 15, temperature=0)[:, 4:].tolist()
    k = first_new_token(free_t[0])
    eot = free_t[0][k]
    out = generate(model, x, 15, temperature=0, eot_id=eot)
    assert out[0, 4:4 + k + 1].tolist() == free_t[0][:k + 1]
    assert (out[0, 4 + k + 1:] == eot).all()
    end = free_t[1].index(eot) + 1 if eot in free_t[1] else 15
    assert out.shape[1] == 4 + max(k + 1, end)
    assert out[1, 4:4 + end].tolist() == free_t[1][:end]
    assert (True in reads) if late else not reads  # the late flag ended a loop


def test_stop_strings() -> None:
    model = tiny()
    tok = CharDecoder()
    free = generate(model, [[1, 2, 3]], 12, temperature=0)[0][3:]
    text = tok.decode(free)
    stop = text[4:6]  # a stop string that ends with the 6th new token (or earlier)
    first = text.find(stop)
    out = generate(model, [[1, 2, 3]], 12, temperature=0, stop_strings=[stop], tokenizer=tok)[0][3:]
    assert out == free[:first + 2]
    # Streams stop at the same place, and the text stream leaves the stop string out.
    streamed = torch.cat(list(stream(model, [[1, 2, 3]], 12, temperature=0, stop_strings=[stop], tokenizer=tok)))
    assert streamed.tolist() == out
    pieces = list(stream_text(model, tok, "bcd", 12, stop_strings=[stop], temperature=0))
    assert "".join(pieces) == text[:first]
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate(model, [[1]], 3, stop_strings=["a"])


# --- streaming ---------------------------------------------------------------------------------------
def test_stream_yields_the_same_tokens_as_generate() -> None:
    model = tiny()
    prompts = [[1, 2], [3, 4, 5, 6]]
    tokens = list(model.stream(prompts, 25, seed=7, top_p=0.9))
    assert len(tokens) == 25 and all(t.shape == (2,) for t in tokens)
    full = model.generate(prompts, 25, seed=7, top_p=0.9)
    assert [row[len(p):] for row, p in zip(full, prompts, strict=True)] == torch.stack(tokens, 1).tolist()
    # Bad input is reported at the call, not at the first next().
    with pytest.raises(ValueError, match="empty prompt"):
        model.stream([[]], 5)
    # Abandoning a stream half-way leaves the model usable (cache freed).
    it = model.stream(prompts, 25, seed=7)
    next(it)
    it.close()
    assert not hasattr(model, "causal_mask")
    assert model(torch.tensor([[1, 2]])).shape == (1, 2, 50)


class ByteDecoder:
    """Byte-level stand-in tokenizer: id = one byte (as GPT-2's BPE can split a character)."""

    eot = 255

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def test_stream_text_holds_back_partial_characters_and_stop_strings(monkeypatch: pytest.MonkeyPatch) -> None:
    text = "héllo wörld 🙂 STOP not this"
    script = list(text.encode("utf-8"))

    def scripted(model, input_ids, max_new_tokens, **kwargs) -> Iterator[torch.Tensor]:
        for t in script[:max_new_tokens]:
            yield torch.tensor([t])

    monkeypatch.setattr(gen_mod, "stream", scripted)
    tok = ByteDecoder()
    pieces = list(stream_text(None, tok, "x", 100, stop_strings=["STOP"]))  # type: ignore[arg-type]
    assert "".join(pieces) == "héllo wörld 🙂 "
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) > 5  # it really streams
    # Without the stop string everything comes out; eot ends the stream and is not shown.
    script.append(tok.eot)
    script.extend(b"after eot")
    assert "".join(stream_text(None, tok, "x", 100)) == text  # type: ignore[arg-type]
    # A partial stop string at the very end is released when generation ends.
    script[:] = list(b"abc ST")
    assert "".join(stream_text(None, tok, "x", 100, stop_strings=["STOP"])) == "abc ST"  # type: ignore[arg-type]


def test_stream_text_reads_endoftext_in_a_text_prompt_as_the_token(data_dir, monkeypatch) -> None:
    """As `gpt2 sample --prompt`, the server's completions prompt and HF's pipelines read it (it was 7
    ordinary tokens here); a tokenizer without special tokens (ByteDecoder) encodes as before."""
    seen = []

    def recording(model, input_ids, max_new_tokens, **kwargs) -> Iterator[torch.Tensor]:
        seen.append(input_ids[0])
        yield from ()

    from gpt2model.tokenizer import load_tokenizer

    monkeypatch.setattr(gen_mod, "stream", recording)
    list(stream_text(None, load_tokenizer("gpt2"), "a<|endoftext|>b", 3))  # type: ignore[arg-type]
    list(stream_text(None, ByteDecoder(), "a<|", 3))  # type: ignore[arg-type]
    assert seen == [[64, 50256, 65], [97, 60, 124]]


def test_stream_text_with_the_gpt2_tokenizer(data_dir) -> None:
    from gpt2model.tokenizer import load_tokenizer

    tok = load_tokenizer("gpt2")
    model = tiny(GPTconfig(context_length=64, vocab_size=50257, n_layer=1, n_head=2, d_model=32), seed=3)
    prompt = tok.encode("Hello, world")
    ids = generate(model, [prompt], 30, seed=1, eot_id=tok.eot)[0][len(prompt):]
    if ids and ids[-1] == tok.eot:
        ids = ids[:-1]
    pieces = list(stream_text(model, tok, "Hello, world", 30, seed=1))
    assert "".join(pieces) == tok.decode(ids)


# --- dtypes and bad input ----------------------------------------------------------------------------
def test_bf16_model_generates_and_matches_fp32_greedy_at_first() -> None:
    model = tiny(GPTconfig(context_length=32, vocab_size=50, n_layer=2, n_head=2, d_model=32), seed=4)
    prompt = torch.tensor([[1, 2, 3, 4]])
    fp32 = generate(model, prompt, 8, temperature=0)
    model.to(torch.bfloat16)
    bf16 = generate(model, prompt, 8, temperature=0)
    assert bf16.dtype == torch.long
    assert torch.equal(bf16[:, :4 + 3], fp32[:, :4 + 3])
    sampled = generate(model, [[1], [2, 3]], 40, seed=0, top_k=10, top_p=0.9)  # past the context, padded
    assert [len(r) for r in sampled] == [41, 42]


def test_top_p_zero_generates_greedily() -> None:
    model = tiny()
    prompts = [[1, 2], [3]]
    assert generate(model, prompts, 12, seed=5, top_p=0.0) == generate(model, prompts, 12, temperature=0)


def test_hf_generate_arguments_name_their_equivalent() -> None:
    model = tiny()
    ids = torch.tensor([[1, 2]])
    with pytest.raises(TypeError, match=r"generate\(\) has no argument 'do_sample' .*temperature=0 is greedy"):
        model.generate(ids, 3, do_sample=False)
    with pytest.raises(TypeError, match=r"stream\(\) has no argument 'eos_token_id' .*eot_id="):
        model.stream(ids, 3, eos_token_id=5)
    with pytest.raises(TypeError, match="'attention_mask' .*list of lists"):
        generate(model, ids, 3, attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(input_ids=[[]]), "empty prompt"),
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "empty prompt"),
    (dict(input_ids=[[1, 99]]), "token id 99 is out of range"),
    (dict(input_ids=torch.tensor([1, 2])), r"ids\[None\]"),
    (dict(top_p=-0.1), "top_p must be in"),
    (dict(top_p=1.5), "top_p must be in"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(temperature=-0.1), "temperature must be"),
    (dict(max_new_tokens=-1), "max_new_tokens must be"),
    (dict(eot_id=50), "eot_id 50"),
])
def test_bad_input_raises_value_error(kwargs: dict, fragment: str) -> None:
    model = tiny()
    args = dict(input_ids=[[1, 2]], max_new_tokens=3) | kwargs
    with pytest.raises(ValueError, match=fragment):
        generate(model, **args)


def test_top_k_zero_is_no_filter_as_in_hf_generate() -> None:
    model = tiny()
    # HF generate, vLLM and llama.cpp read top_k=0 as "no top-k filter": the same draws as top_k=None
    off = generate(model, [[1, 2], [3]], 12, temperature=1.3, seed=5)
    assert generate(model, [[1, 2], [3]], 12, temperature=1.3, seed=5, top_k=0) == off
    assert generate(model, [[1, 2], [3]], 12, temperature=1.3, seed=5, top_k=2) != off


def test_zero_new_tokens_returns_the_prompt() -> None:
    model = tiny()
    assert generate(model, [[1, 2]], 0) == [[1, 2]]
    assert generate(model, torch.tensor([[1, 2]]), 0).tolist() == [[1, 2]]


def test_char_tokenizer_rejects_unknown_prompt_characters() -> None:
    from gpt2model.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match="not in the"):
        list(stream_text(tiny(), tok, "abz", 3))


def _ops_outside_graphs(prof: torch.profiler.profile) -> list[str]:
    """The aten ops a profiled stretch ran outside compiled graphs (top-level ones only)."""
    names = []
    for e in prof.events():
        parent, inside = e.cpu_parent, False
        while parent is not None and not inside:
            inside = parent.name.startswith("aten::") or "Compiled" in parent.name
            parent = parent.cpu_parent
        if not inside and e.name.startswith("aten::"):
            names.append(e.name)
    return names


def test_compiled_generation_step_is_all_a_token_costs(monkeypatch: pytest.MonkeyPatch) -> None:
    """``compile=True``: each token is one call of the compiled generation step, which does all the
    loop's bookkeeping (mask column, cache slot, positions, sampling step, storing the token, eot)
    on buffers it updates in place; outside it a token costs no op but a view (and, with an
    end-of-text id, reading whether every row is done). Under CUDA graphs the buffers and KV
    caches are kept on the model between generations of the same shapes (same addresses: no new
    recording); forced here on the CPU, the tokens are eager's, and ``stream`` yields copies."""
    monkeypatch.setattr(gen_mod, "KEEP_STEP_BUFFERS_ON", ("cuda", "cpu"))
    model = tiny(GPTconfig(context_length=32, vocab_size=50, n_layer=2, n_head=2, d_model=32))
    prompts = [[1, 2, 3, 4, 5], [6], [7, 8, 9]]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="torch.compile of the decode step failed")
        for kwargs in (dict(temperature=0), dict(seed=3, top_k=10, eot_id=7)):
            eager = generate(model, prompts, 45, **kwargs)  # past the context: the window slides twice
            assert generate(model, prompts, 45, compile=True, **kwargs) == eager
            kept = model._decode_buffers
            cache_k = kept.caches[0].k
            assert generate(model, prompts, 45, compile=True, **kwargs) == eager
            assert model._decode_buffers is kept and model.transformer.h[0].attn.kv_cache is None
            assert kept.caches[0].k is cache_k  # the same KV cache again
        # Steady state: profile tokens 5..14 (no slide in between) of a stream.
        for eot_id, allowed in ((None, {"aten::select"}), (7, {"aten::select", "aten::is_nonzero"})):
            it = stream(model, prompts, 45, temperature=0, compile=True, eot_id=eot_id, _views=True)
            for _ in range(5):
                next(it)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(10):
                    next(it)
            list(it)
            steps = [e for e in prof.events() if e.name.startswith("Torch-Compiled Region")]
            assert len(steps) == 10, [e.name for e in prof.events()][:50]
            assert set(_ops_outside_graphs(prof)) <= allowed, _ops_outside_graphs(prof)
    # stream() yields copies of the kept buffers: a later generation does not change them.
    streamed = [t.tolist() for t in stream(model, prompts, 45, temperature=0, compile=True)]
    kept = list(stream(model, prompts, 45, temperature=0, compile=True))
    generate(model, prompts, 45, compile=True, seed=3, top_k=10)
    assert [t.tolist() for t in kept] == streamed
    assert [p + [t[i] for t in streamed] for i, p in enumerate(prompts)] == generate(model, prompts, 45, temperature=0)
    model.clear_cache()  # frees the kept buffers
    assert not hasattr(model, "_decode_buffers")


@pytest.mark.slow
def test_compiled_decode_matches_eager() -> None:
    model = tiny()
    prompt = torch.tensor([[1, 2, 3]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a platform without a compiler falls back to eager
        compiled = generate(model, prompt, 30, temperature=0, compile=True)
        # Sampled: the compiled step hashes the whole vocabulary in int32 lanes inside the graph,
        # eager hashes only the top-k candidates; both must draw the same tokens.
        sampled = generate(model, prompt, 30, temperature=0.8, top_k=5, seed=3, compile=True)
    assert torch.equal(compiled, generate(model, prompt, 30, temperature=0))
    assert torch.equal(sampled, generate(model, prompt, 30, temperature=0.8, top_k=5, seed=3))


@pytest.mark.slow
def test_compiled_decode_uses_weights_changed_in_place_after_compiling() -> None:
    # The compiled CPU step takes the weights as inputs (no ``freezing``, which would bake them in
    # as constants): a model trained or loaded in place after compiling decodes with its new weights.
    model = tiny()
    prompt = torch.tensor([[1, 2, 3]])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="torch.compile of the decode step failed")
        before = generate(model, prompt, 20, temperature=0, compile=True)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-1.5)
        after = generate(model, prompt, 20, temperature=0, compile=True)
    assert torch.equal(after, generate(model, prompt, 20, temperature=0))
    assert not torch.equal(after, before)


@pytest.mark.slow
def test_compiled_half_precision_decode_uses_the_gemv_and_matches_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    # In a compiled one-row CPU step, bf16 / fp16 linears run quantize.half_gemv (fp32 arithmetic)
    # instead of PyTorch's half-precision kernel; the tokens are eager's.
    from gpt2model import quantize

    prompt = torch.tensor([[1, 2, 3]])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="torch.compile of the decode step failed")
        for dtype in (torch.bfloat16, torch.float16):
            model = tiny().to(dtype)
            assert torch.equal(generate(model, prompt, 30, temperature=0, compile=True),
                               generate(model, prompt, 30, temperature=0))
        # The compiled step (and only it) goes through half_gemv: with a GEMV that returns zeros
        # every logit is 0 and greedy decoding picks token 0 at every compiled step.
        monkeypatch.setattr(quantize, "half_gemv", lambda x, w, b=None: x.new_zeros(*x.shape[:-1], w.size(0)))
        eager = generate(model, prompt, 12, temperature=0)  # within the context: one prefill, then steps
        compiled = generate(model, prompt, 12, temperature=0, compile=True)
    assert eager[0, 4:].ne(0).any() and compiled[0, 4:].eq(0).all()  # token 3 comes from the prefill


@pytest.mark.slow
def test_many_generation_lengths_all_decode_compiled() -> None:
    # Each cache length is its own graph of decode_step; past torch's default of 8 graphs per
    # function the next length used to fall back to eager (and the model never compiled again).
    model = tiny(GPTconfig(context_length=64, vocab_size=50, n_layer=1, n_head=2, d_model=16))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="torch.compile of the decode step failed")
        for n in range(2, 14):
            generate(model, torch.tensor([[1, 2, 3]]), n, temperature=0, compile=True)
    assert getattr(model, "_decode_compile_error", None) is None


def test_half_gemv_is_a_linear_with_fp32_arithmetic() -> None:
    # Every output row in its place: row counts that split evenly into the GEMV's read streams
    # or not (padded), fewer rows than streams, an odd input width and a non-contiguous bf16
    # weight (the plain widening path), fp32 or half activations (Fp16Linear / a half model).
    from gpt2model.quantize import GEMV_STREAMS, half_gemv

    g = torch.Generator().manual_seed(0)
    for out_features, in_features in ((40, 24), (4 * GEMV_STREAMS + 1, 24), (GEMV_STREAMS - 1, 24), (9, 23)):
        w, b = torch.randn(out_features, in_features, generator=g), torch.randn(out_features, generator=g)
        x = torch.randn(1, 1, in_features, generator=g)
        for dtype in (torch.bfloat16, torch.float16):
            for x_dtype in (dtype, torch.float32):
                wd, bd, xd = w.to(dtype), b.to(x_dtype), x.to(x_dtype)
                exact = torch.nn.functional.linear(xd.float(), wd.float(), bd.float())  # the rounded inputs, in fp32
                for weight in (wd, wd.t().contiguous().t()):
                    for bias in (bd, None):
                        y = half_gemv(xd, weight, bias)
                        assert y.dtype == x_dtype and y.shape == (1, 1, out_features)
                        ref = exact if bias is not None else exact - bd.float()
                        assert (y.float() - ref.to(x_dtype).float()).abs().max() <= 1e-2 * ref.abs().max()


def test_decode_attention_is_sdpa_with_an_additive_mask() -> None:
    # The compiled CPU decode step's attention of one query (plain ops inductor fuses) computes
    # what SDPA does, for fp32 and bf16, over a mask with empty (-inf) slots.
    from gpt2model.model import decode_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (1, 9, 9))
    mask = torch.zeros(2, 1, 1, 9)
    mask[0, ..., 5:] = float("-inf")
    mask[1, ..., 0] = float("-inf")
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
        ref = torch.nn.functional.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype),
                                                               attn_mask=mask.to(dtype))
        got = decode_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask.to(dtype))
        assert got.dtype == dtype and got.shape == (2, 3, 1, 16)
        assert (got.float() - ref.float()).abs().max() <= tol


def test_perplexity_sanity_of_sampling_distribution() -> None:
    # Temperature 1 with no filters samples the model's distribution: the mean log-prob of sampled
    # tokens under the model is close to minus its entropy (a check that nothing is mis-scaled).
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0)) * 2
    logp = logits.log_softmax(-1)[0]
    x = sample_logits(logits.expand(20000, -1), generator=torch.Generator().manual_seed(1))
    entropy = -(logp.exp() * logp).sum().item()
    assert math.isclose(-logp[x].mean().item(), entropy, rel_tol=0.03)


# --- the CLI -----------------------------------------------------------------------------------------
@pytest.fixture
def char_model_dir(tmp_path):
    from gpt2model.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text("abcdefghij ROMEO:\n")
    model = tiny(GPTconfig(context_length=32, vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16))
    model.save_pretrained(tmp_path / "m", tokenizer=tok)
    return tmp_path / "m", model, tok


def test_sample_cli_is_reproducible_and_streams_the_same_text(char_model_dir, capsys) -> None:
    from gpt2model.cli import main

    path, model, tok = char_model_dir
    args = ["sample", "--model", str(path), "--device", "cpu", "--prompt", "ROMEO:", "--max-new-tokens", "40",
            "--seed", "3",
            "--top-k", "5"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first
    assert main([*args, "--stream"]) == 0
    assert capsys.readouterr().out == first
    ids = generate(model, [tok.encode("ROMEO:")], 40, seed=3, top_k=5, temperature=0.8)[0]
    assert first == tok.decode(ids) + "\n"
    assert main([*args, "--num-samples", "3", "--temperature", "0"]) == 0
    out = capsys.readouterr().out.split("---------------\n")
    assert len(out) == 4 and out[0] == out[1] == out[2] and out[0].startswith("ROMEO:")


def test_sample_cli_sample_i_is_the_same_batched_streamed_or_alone(char_model_dir, capsys) -> None:
    from gpt2model.cli import main

    path = str(char_model_dir[0])
    args = ["sample", "--model", path, "--device", "cpu", "--prompt", "ROMEO:", "--max-new-tokens", "30"]
    assert main([*args, "--seed", "10", "--num-samples", "3"]) == 0
    batched = capsys.readouterr().out
    assert main([*args, "--seed", "10", "--num-samples", "3", "--stream"]) == 0
    assert capsys.readouterr().out == batched
    samples = batched.split("---------------\n")[:3]
    assert len(set(samples)) == 3  # different samples ...
    for i, sample in enumerate(samples):  # ... each the one a run with seed 10 + i prints
        assert main([*args, "--seed", str(10 + i)]) == 0
        assert capsys.readouterr().out == sample


def test_sample_cli_stop_strings(char_model_dir, capsys) -> None:
    from gpt2model.cli import main

    path, model, tok = char_model_dir
    args = ["sample", "--model", str(path), "--device", "cpu", "--prompt", "ROMEO:", "--max-new-tokens", "60",
            "--temperature", "0"]
    assert main(args) == 0
    full = capsys.readouterr().out[:-1]
    continuation = full[len("ROMEO:"):]
    stop = continuation[5:7]  # a piece of text the greedy continuation is known to contain
    expected = "ROMEO:" + continuation[: continuation.find(stop)]
    assert main([*args, "--stop", stop]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert main([*args, "--stop", stop, "--stream"]) == 0
    assert capsys.readouterr().out == expected + "\n"


@pytest.mark.parametrize("extra, fragment", [
    (["--prompt", "xyz"], "not in the"),
    (["--prompt", ""], "prompt is empty"),
    (["--top-p", "-0.5"], "top_p must be in"),
    (["--top-k", "-1"], "top_k must be"),
    (["--temperature", "-1"], "temperature must be"),
    (["--max-new-tokens", "-1"], "max_new_tokens must be"),
])
def test_sample_cli_bad_input(char_model_dir, capsys, extra: list[str], fragment: str) -> None:
    from gpt2model.cli import main

    assert main(["sample", "--model", str(char_model_dir[0]), "--device", "cpu", *extra]) == 2
    assert fragment in capsys.readouterr().err


def test_sample_cli_on_a_hf_folder_uses_gpt2_bpe_and_eot_prompt(tmp_path, capsys, data_dir) -> None:
    from gpt2model.cli import main
    from gpt2model.tokenizer import load_tokenizer

    model = tiny(GPTconfig(context_length=64, vocab_size=50257, n_layer=1, n_head=2, d_model=16))
    model.save_pretrained(tmp_path)  # weights + config only, as a HF folder without tokenizer files
    assert main(["sample", "--model", str(tmp_path), "--device", "cpu", "--max-new-tokens", "10",
                 "--temperature", "0"]) == 0
    tok = load_tokenizer("gpt2")
    ids = generate(model, [[tok.eot]], 10, temperature=0, eot_id=tok.eot)[0][1:]
    ids = ids[:-1] if ids[-1] == tok.eot else ids
    assert capsys.readouterr().out == tok.decode(ids) + "\n"


# --- TextStream: the one stop-string / UTF-8 rule ------------------------------------------------------
def test_text_stream_holds_back_and_stops() -> None:
    from gpt2model.generate import TextStream

    tok = ByteDecoder()
    ts = TextStream(tok, ["STOP", "xyz"])
    out = [ts.push(t) for t in "ab é S".encode()]
    # "é" is two bytes: nothing comes out after its first byte; "S" may start "STOP": held.
    assert out[:3] == ["a", "b", " "] and out[3] == "" and out[4] == "é" and out[-1] == ""
    assert "".join(out) == "ab é " and not ts.stopped
    assert ts.push(ord("T")) == "" and ts.push(ord("x")) == "ST"  # "STx" is no stop; "x" may start "xyz"
    assert [ts.push(t) for t in b"yz tail"] == ["", "", "", "", "", "", ""] and ts.stopped
    assert ts.flush() == ""
    # A held prefix is released at the end; an unfinished character comes out as U+FFFD.
    ts = TextStream(tok, ["STOP"])
    assert "".join(ts.push(t) for t in b"abc ST") == "abc " and ts.flush() == "ST"
    ts = TextStream(tok)
    assert ts.push(0xC3) == "" and ts.flush() == "\ufffd"
    # A stop string completed by a token that also starts a new character stops at that token.
    class Tok:
        def decode(self, ids: Sequence[int]) -> str:
            return b"".join({1: b"a", 2: b"b\xc3"}[i] for i in ids).decode("utf-8", errors="replace")
    ts = TextStream(Tok(), ["ab"])
    assert ts.push(1) == "" and ts.push(2) == "" and ts.stopped
    with pytest.raises(ValueError, match="non-empty strings"):
        TextStream(tok, [""])


def test_text_stream_gives_exactly_the_decode_of_invalid_byte_runs() -> None:
    """With a tokenizer that gives token bytes, the text is tokenizer.decode of all the tokens: a
    stray byte before a character split over 4 tokens came out as 4 U+FFFD (the group of 4
    undecodable tokens was let through), where decode reads one U+FFFD and the emoji."""
    from gpt2model.generate import TextStream
    from gpt2model.tokenizer import GPT2Tokenizer

    try:
        tok = GPT2Tokenizer()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    byte = {tok.token_bytes(i): i for i in range(256)}
    ids = [byte[bytes([b])] for b in b"\xff\xf0\x9f\x98\x80\x80"] + tok.encode(" ok")
    ts = TextStream(tok)
    assert "".join(ts.push(t) for t in ids) + ts.flush() == tok.decode(ids) == "\ufffd\U0001F600\ufffd ok"
    ts = TextStream(tok, ["\U0001F600"])
    assert "".join(ts.push(t) for t in ids) == "\ufffd" and ts.stopped

def test_sample_texts_are_what_the_cli_prints(char_model_dir) -> None:
    from gpt2model.generate import sample_texts

    _, model, tok = char_model_dir
    prompt = tok.encode("ROMEO:")
    rows = generate(model, [prompt], 30, temperature=0)[0][len(prompt):]
    full = tok.decode(rows)
    stop = full[6:8]
    assert sample_texts(model, tok, prompt, 2, 30, temperature=0) == [full, full]
    assert sample_texts(model, tok, prompt, 1, 30, temperature=0, stop_strings=[stop]) == [full[:full.find(stop)]]
    with pytest.raises(ValueError, match="num_samples"):
        sample_texts(model, tok, prompt, 0, 30)


# --- sampling that is the same on every device: the counter-based hash ---------------------------------
def _py_hash32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _py_bits(seed: int, step: int, token: int) -> int:
    seed %= 2**63
    key = _py_hash32(_py_hash32(_py_hash32((seed >> 32) ^ 0x9E3779B9) ^ (seed & 0xFFFFFFFF)) ^ (step & 0xFFFFFFFF))
    return _py_hash32(_py_hash32(token) ^ key)


def test_random_bits_equal_a_pure_python_reimplementation() -> None:
    from gpt2model.generate import random_bits, seed_tensor

    seeds = [0, 1, 2**32 + 7, 2**63 - 1, -5, 123456789012345]
    steps = [0, 1, 2**31, 2**32 + 3, 7, 99]
    bits = random_bits(seed_tensor(seeds), torch.tensor(steps), 300)
    for row, (seed, step) in enumerate(zip(seeds, steps, strict=True)):
        assert bits[row].tolist() == [_py_bits(seed, step, v) for v in range(300)]


def test_argmax_rows_is_argmax_exactly_ties_nan_inf_and_the_last_chunk() -> None:
    """The CPU two-level argmax (chunk maxima, then one chunk per row) returns torch.argmax's index:
    the first maximal one, a NaN as the maximum, maxima in the short last chunk, all -inf rows."""
    from gpt2model.generate import ARGMAX_CHUNK, argmax_rows

    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        V = int(torch.randint(8 * ARGMAX_CHUNK, 60_000, (1,), generator=g))
        B = int(torch.randint(65536 // V + 1, 20, (1,), generator=g))  # big enough for the chunked path
        x = torch.randint(-3, 3, (B, V), generator=g).float()  # ties everywhere
        r = torch.rand(B, V, generator=g)
        x[r > 1 - 1e-4] = (float("nan"), float("inf"), 7.0)[trial % 3]
        if trial % 4 == 0:
            x[:, -2] = 9.0  # the maximum in the last (short, shifted) window
        if trial % 5 == 0:
            x[0, :ARGMAX_CHUNK + 3] = 9.0  # ties across the first chunk boundary
        if trial % 7 == 0:
            x[-1] = float("-inf")
        assert torch.equal(argmax_rows(x), x.argmax(dim=-1)), trial
    x = torch.randn(8, 50257)
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1)) and torch.equal(argmax_rows(x[:1]), x[:1].argmax(dim=-1))


def test_sampling_takes_its_full_vocabulary_argmaxes_through_argmax_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def spy(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return x.argmax(dim=-1)

    monkeypatch.setattr(gen_mod, "argmax_rows", spy)
    logits = torch.randn(3, 50)
    sample_logits(logits, 0.0)  # greedy
    sample_logits(logits, 0.7, seed=1)  # the Gumbel draw over the vocabulary
    sample_logits(logits, torch.tensor([0.0, 0.7, 1.0]), seed=1)  # per-row: the draw and the greedy rows
    assert calls == [(3, 50)] * 4


def test_top_k_hashes_only_the_candidates_and_draws_what_the_full_vocabulary_draws(
        monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(5)
    V, k = 1000, 8
    # bf16-rounded logits tie often; row 1 also has 5 extra tokens tied with its k-th value.
    logits = (torch.randn(3, V, generator=g) * 3).bfloat16().float()
    row = logits[1]
    top = row.topk(k).values
    ties = (row < top[-1]).nonzero()[:5, 0]
    row[ties] = top[-1]
    kept = logits >= logits.topk(k).values[:, -1:]  # the documented rule: ties with the k-th stay
    values, ids = gen_mod._top_k_candidates(logits, k, None)
    assert ids.size(1) == int(kept.sum(1).max()) >= k + 5
    for b in range(3):  # each row: exactly its kept tokens, the rest of the n entries -inf
        assert sorted(ids[b][values[b] > float("-inf")].tolist()) == kept[b].nonzero()[:, 0].tolist()

    def full_vocabulary_draw(temperature: torch.Tensor, ks: torch.Tensor, step: int) -> torch.Tensor:
        """The reference: mask each row below its k-th, Gumbel noise over the whole vocabulary."""
        scaled = logits / torch.where(temperature == 0, 1.0, temperature)[:, None]
        kth = scaled.sort(dim=-1, descending=True).values.gather(1, (ks - 1).clamp(min=0)[:, None])
        masked = scaled.masked_fill((scaled < kth) & (ks > 0)[:, None], float("-inf"))
        keys = gen_mod._row_keys(gen_mod.row_seeds(11, 3), torch.full((3,), step))
        drawn = (masked + gen_mod._gumbel(keys, gen_mod._id_hashes(V, logits.device))).argmax(dim=-1)
        return torch.where(temperature == 0, logits.argmax(dim=-1), drawn)

    hashed: list[int] = []
    real = gen_mod._hash32
    monkeypatch.setattr(gen_mod, "_hash32", lambda x: hashed.append(x.numel()) or real(x))
    per_row_t, per_row_k = torch.tensor([1.1, 0.0, 0.8]), torch.tensor([k, 0, 3])  # row 1 greedy (engine: k 0)
    drawn_tokens = set()
    for step in range(200):
        hashed.clear()
        fast = sample_logits(logits, temperature=0.9, top_k=k, seed=11, step=step)
        assert max(hashed) == 3 * ids.size(1)  # the candidates only, never (B, V)
        assert torch.equal(fast, full_vocabulary_draw(torch.full((3,), 0.9), torch.full((3,), k), step)), step
        hashed.clear()
        rows = sample_logits(logits, temperature=per_row_t, top_k=per_row_k, seed=11, step=step)
        assert max(hashed) < V
        assert torch.equal(rows, full_vocabulary_draw(per_row_t, per_row_k, step)), step
        drawn_tokens.add(int(fast[1]))
    assert len(drawn_tokens & set(ties.tolist())) >= 2  # tied tokens are drawn too


def _full_sort_draw(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                    seed: int, step: int) -> torch.Tensor:
    """The reference draw: every row's whole vocabulary sorted, top-k (ties stay), then the nucleus
    (the tokens before reach less than top_p; ties with the last kept stay), Gumbel noise over all ids."""
    B, V = logits.shape
    scaled = logits / torch.where(temperature == 0, 1.0, temperature)[:, None]
    ordered = scaled.sort(dim=-1, descending=True).values
    for b in range(B):
        if 0 < top_k[b] < V:
            scaled[b] = scaled[b].masked_fill(scaled[b] < ordered[b, top_k[b] - 1], float("-inf"))
    probs = scaled.softmax(dim=-1)
    for b in range(B):
        if top_p[b] < 1:
            sorted_probs = probs[b].sort(descending=True).values
            before = sorted_probs.cumsum(0) - sorted_probs
            n = max(1, int((before < top_p[b] - 1e-6).sum()))
            scaled[b] = scaled[b].masked_fill(probs[b] < sorted_probs[n - 1], float("-inf"))
    keys = gen_mod._row_keys(gen_mod.row_seeds(seed, B), torch.full((B,), step))
    drawn = (scaled + gen_mod._gumbel(keys, gen_mod._id_hashes(V, logits.device))).argmax(dim=-1)
    return torch.where(temperature == 0, logits.argmax(dim=-1), drawn)


def test_per_row_top_p_finds_the_nucleus_without_sorting_the_vocabulary(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-row top_p (the engine's mixed batches): eager code selects each row's most likely
    NUCLEUS_CANDIDATES tokens instead of sorting all of them, hashes only the kept candidates
    when every row has a nucleus, and sorts only when some nucleus is larger (a flat row): always
    the tokens of the full-sort reference."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.sorted: list[tuple[int, ...]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            if func.__name__.startswith("sort"):
                self.sorted.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    V = 5000
    g = torch.Generator().manual_seed(6)
    # bf16-rounded peaked logits: many ties, nuclei of 1 to ~120 tokens.
    logits = (torch.randn(6, V, generator=g) * torch.tensor([4.0, 4.0, 4.0, 5.0, 3.0, 3.0])[:, None])
    logits = logits.bfloat16().float()
    row = logits[5]  # an exact tie at the nucleus boundary of row 5 (top_p 0.6)
    top = row.topk(3).values
    row[row.topk(4).indices[3]] = top[2]
    temperature = torch.tensor([0.0, 1.0, 0.8, 1.2, 1.0, 1.0])
    top_k = torch.tensor([0, 0, 20, 0, 200, 0])
    top_p = torch.tensor([1.0, 0.9, 0.5, 0.95, 0.9, 0.6])  # row 0 greedy
    hashed: list[int] = []
    real_hash = gen_mod._hash32
    monkeypatch.setattr(gen_mod, "_hash32", lambda x: hashed.append(x.numel()) or real_hash(x))
    seen: set[int] = set()
    for step in range(40):
        hashed.clear()
        with Ops() as ops:
            fast = sample_logits(logits, temperature, top_k, top_p, seed=3, step=step)
        assert (6, V) not in ops.sorted, step  # selections only (the candidates' ids are sorted)
        assert max(hashed) < V  # the kept candidates only
        assert torch.equal(fast, _full_sort_draw(logits, temperature, top_k, top_p, 3, step)), step
        seen.add(int(fast[5]))
        # A row without any filter: the whole vocabulary is drawn from, still without a sort.
        flat_p = top_p.clone()
        flat_p[1] = 1.0
        with Ops() as ops:
            mixed = sample_logits(logits, temperature, top_k, flat_p, seed=3, step=step)
        assert (6, V) not in ops.sorted
        assert torch.equal(mixed, _full_sort_draw(logits, temperature, top_k, flat_p, 3, step))
        # A nucleus larger than the candidates (a flat row at top_p 0.95): the rows are sorted.
        wide = logits.clone()
        wide[3] = wide[3] / 50
        with Ops() as ops:
            fallback = sample_logits(wide, temperature, top_k, top_p, seed=3, step=step)
        assert (6, V) in ops.sorted
        assert torch.equal(fallback, _full_sort_draw(wide, temperature, top_k, top_p, 3, step))
    assert len(seen & set(row.topk(4).indices.tolist())) >= 3  # the tied boundary tokens are drawn too
    # The compiled graphs' path (a sort, no host read) filters exactly as the selection does.
    _, (values, ids) = gen_mod._filter(logits.clone(), top_k, top_p, temperature == 0, gen_mod.NUCLEUS_CANDIDATES)
    sorted_path, none = gen_mod._filter(logits.clone(), top_k, top_p, temperature == 0, None)
    selected = torch.full_like(logits, float("-inf")).scatter(1, ids, values)
    assert none is None and torch.equal(selected, sorted_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to compare with the CPU")
def test_sampling_is_the_same_on_cuda_and_cpu() -> None:
    logits = torch.randn(4, 50257, generator=torch.Generator().manual_seed(0)) * 3
    for kwargs in (dict(), dict(top_k=40), dict(top_p=0.9, temperature=0.7)):
        for step in range(20):
            cpu = sample_logits(logits, seed=42, step=step, **kwargs)
            assert torch.equal(sample_logits(logits.cuda(), seed=42, step=step, **kwargs).cpu(), cpu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the CUDA-graph decode step)")
def test_cuda_graph_decode_matches_eager_across_the_sliding_window() -> None:
    """``compile=True`` on CUDA (the decode step captured as a CUDA graph, sampling inside) gives the
    eager tokens, greedy and seeded, for ragged prompts and past the context (the window slides)."""
    torch.manual_seed(0)
    model = GPT(GPTconfig(context_length=32, vocab_size=50, n_layer=2, n_head=2, d_model=32)).cuda().eval()
    prompts = [[1, 2, 3, 4, 5], [6], [7, 8, 9]]
    for kwargs in (dict(temperature=0), dict(seed=3, top_k=10), dict(seed=4, top_p=0.8, temperature=0.7)):
        eager = generate(model, prompts, 60, **kwargs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled = generate(model, prompts, 60, compile=True, **kwargs)
        # A failed capture falls back to eager (same tokens) with a warning: that must not happen here.
        assert not [w for w in caught if "decode step failed" in str(w.message)]
        assert compiled == eager


def profiled_steps(it: Iterator[torch.Tensor], n: int = 20) -> list[str]:
    """The profiler's event names (CPU and CUDA) over the next ``n`` tokens of a CUDA ``stream``
    iterator ``it``, synced before and after; the rest of ``it`` is then drained."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            next(it)
        torch.cuda.synchronize()
    list(it)
    return [e.name for e in prof.events()]


def _cuda_graph_nodes() -> int:
    """How many CUDA graphs torch's CUDA-graph trees have recorded on this device (all functions)."""
    import torch._inductor.cudagraph_trees as trees

    manager = trees.get_container(torch.cuda.current_device()).tree_manager
    if manager is None:
        return 0
    count, todo = 0, [n for nodes in manager.roots.values() for n in nodes]
    while todo:
        node = todo.pop()
        count += 1
        todo += [c for nodes in node.children.values() for c in nodes]
    return count


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the CUDA-graph decode step)")
def test_cuda_graph_generate_is_one_replay_per_token_and_records_once() -> None:
    """On CUDA a compiled token is one CUDA-graph replay and nothing else: no kernel or copy
    launched outside the graph, no host sync (without an eot id); a second generation of the same
    shapes replays the graph recorded by the first (its buffers and KV caches are kept on the
    model: same addresses) instead of recording it again; the tokens are eager's."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = spiky(GPT(GPTconfig(context_length=128, vocab_size=50, n_layer=2, n_head=2, d_model=32))).cuda()
    prompts = [[1, 2, 3, 4, 5], [6], [7, 8, 9]]
    eager = generate(model, prompts, 60, temperature=0)
    skips = counters["inductor"]["cudagraph_skips"]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="torch.compile of the decode step failed")
        assert generate(model, prompts, 60, temperature=0, compile=True) == eager
        recorded = _cuda_graph_nodes()
        assert recorded >= 1
        assert generate(model, prompts, 60, temperature=0, compile=True) == eager
        assert _cuda_graph_nodes() == recorded, "the second generation recorded its CUDA graph again"
        profiles = []
        unused = next(t for t in range(50) if all(t not in row for row in eager))
        for eot_id in (None, unused):  # an eot id never drawn here: "all rows done?" is read one step late
            it = stream(model, prompts, 60, temperature=0, compile=True, _views=True, eot_id=eot_id)
            for _ in range(5):
                next(it)
            profiles.append(profiled_steps(it))
    assert counters["inductor"]["cudagraph_skips"] == skips, "torch skipped CUDA graphs for the step"
    for names, copies in zip(profiles, (0, 20), strict=True):
        launches = [n for n in names if n.startswith(("cudaLaunchKernel", "cuLaunchKernel", "cudaMemset"))]
        assert sum(n.startswith("cudaGraphLaunch") for n in names) == 20, sorted(set(names))
        assert launches == [], launches
        assert sum(n.startswith("cudaMemcpy") for n in names) == copies, sorted(set(names))  # the flag's copy
        assert names.count("cudaStreamSynchronize") == 0


def test_int8_compiled_reduction_is_the_dequantized_linear() -> None:
    """The int8 matmul of compiled GPU decode steps (``Int8Linear._compiled_reduction``: one fused
    reduction reading each int8 weight once for all rows, fp32 inside) computes ``x @ (q *
    scales).T``, in the interleaved CPU layout and the plain one, eager and compiled (on the CPU
    here; the GPU compiles the same graph to Triton)."""
    from gpt2model.quantize import Int8Linear, _in_decode_order

    g = torch.Generator().manual_seed(0)
    for in_features in (32, 30):  # interleaved (a multiple of 4, made on the CPU) and plain
        layer = Int8Linear.from_weight(torch.randn(40, in_features, generator=g), torch.randn(40, generator=g))
        assert layer.interleaved == (in_features == 32)
        w = layer.dequantize()
        compiled = torch.compile(layer._compiled_reduction, fullgraph=True, dynamic=False)
        for rows in (1, 3, 8):
            x = torch.randn(rows, in_features, generator=g)
            xs = _in_decode_order(x) if layer.interleaved else x
            ref = torch.nn.functional.linear(x, w)
            torch.testing.assert_close(layer._compiled_reduction(xs), ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(compiled(xs), ref, rtol=1e-5, atol=1e-5)
            xb = x.bfloat16()
            xbs = _in_decode_order(xb) if layer.interleaved else xb
            y = layer._compiled_reduction(xbs)
            assert y.dtype == torch.bfloat16
            torch.testing.assert_close(y.float(), torch.nn.functional.linear(xb.float(), w), rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the compiled int8 GPU step)")
def test_cuda_compiled_int8_step_reads_int8_weights_in_fused_kernels() -> None:
    """On CUDA a compiled one-row int8 decode step multiplies by the int8 weights in inductor's own
    fused reductions (no weight matmul library call, no dequantized copy); 8 rows dequantize, then
    multiply (``COMPILED_REDUCTION_MAX_ROWS``). Both give the eager int8 path's logits, and
    ``generate(compile=True)`` of an int8 model compiles (no eager fallback) and gives eager's greedy
    tokens. A bf16 model's compiled step, for contrast, calls weight matmuls."""
    from gpt2model.generate import compiled_decode_step, decode_step
    from gpt2model.quantize import COMPILED_REDUCTION_MAX_ROWS

    torch.manual_seed(0)
    base = spiky(GPT(GPTconfig(context_length=64, vocab_size=512, n_layer=2, n_head=2, d_model=64)), std=0.1)
    weight_shapes = {tuple(p.shape) for n, p in base.named_parameters() if p.dim() == 2 and "wpe" not in n}
    for dtype, int8 in ((torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False)):
        model = GPT(base.config)
        model.load_state_dict(base.state_dict())
        model = model.cuda().to(dtype).eval()
        if int8:
            model.quantize("int8")
        step = compiled_decode_step(model.device, mode=None)  # no CUDA graph: the profiler sees each op
        model.check_inputs = False  # (the range check reads the ids on the host: not in a graph)
        for B in (1, 8):
            model.setup_cache(B, 32)
            try:
                token = torch.randint(0, 512, (B, 1), device="cuda")
                pos = torch.zeros(B, 1, dtype=torch.long, device="cuda")
                mask = torch.zeros(B, 1, 1, 32, dtype=dtype, device="cuda")
                args = (model, token, pos, mask, pos, 0.0, None, None, torch.zeros(B, dtype=torch.long, device="cuda"),
                        torch.zeros(B, dtype=torch.long, device="cuda"))
                with torch.no_grad():  # as generate runs it
                    _, eager_logits = decode_step(*args)
                    step(*args)
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                record_shapes=True) as prof:
                        _, logits = step(*args)
                        torch.cuda.synchronize()
            finally:
                model.clear_cache()
            # Weight matmuls: 2-D products with a (out, in) weight operand (attention's batched
            # products over the cache are not weights, whatever kernel SDPA picks for them).
            matmuls = [(e.name, e.input_shapes) for e in prof.events()
                       if e.name in ("aten::mm", "aten::addmm", "aten::linear", "aten::_weight_int8pack_mm")
                       and any(tuple(s) in weight_shapes or tuple(s[::-1]) in weight_shapes
                               for s in e.input_shapes if len(s) == 2)]
            if int8:
                if B <= COMPILED_REDUCTION_MAX_ROWS:
                    assert not matmuls, f"{dtype} B={B}: {matmuls}"
                tol = 1e-4 if dtype == torch.float32 else 0.05
                torch.testing.assert_close(logits.float(), eager_logits.float(), rtol=tol, atol=tol,
                                           msg=lambda m, d=dtype, b=B: f"{d} B={b}: {m}")
            else:
                assert matmuls, "the profiler saw no weight matmul in the bf16 step: the int8 check proves nothing"
        if int8 and dtype == torch.float32:  # fp32 activations: eager and compiled agree to ~1e-6
            prompt = [[1, 2, 3], [4, 5, 6, 7, 8]]
            with warnings.catch_warnings():
                warnings.filterwarnings("error", message="torch.compile of the decode step failed")
                assert generate(model, prompt, 30, temperature=0, compile=True) == generate(model, prompt, 30,
                                                                                             temperature=0)
        model.check_inputs = True


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_draws_follow_the_distribution() -> None:
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.03, 0.01])
    logits = probs.log()[None].expand(30000, -1)
    # Across rows (seeds S, S+1, ...) and across steps of one row: both must be the distribution.
    across_rows = sample_logits(logits, seed=7)
    across_steps = sample_logits(logits, seed=torch.full((30000,), 7), step=torch.arange(30000))
    for x in (across_rows, across_steps):
        counts = torch.bincount(x, minlength=7).float()
        assert _chi_square(counts, probs) < 22.46  # chi-square, 6 degrees of freedom, p = 0.001
    # A filtered draw is the renormalised distribution of the kept tokens.
    x = sample_logits(logits, seed=8, top_k=3)
    assert _chi_square(torch.bincount(x, minlength=3).float(), probs[:3] / probs[:3].sum()) < 13.82  # 2 dof
    x = sample_logits(logits, seed=9, temperature=0.5)
    sharp = probs**2 / (probs**2).sum()
    assert _chi_square(torch.bincount(x, minlength=7).float(), sharp) < 22.46  # every expected count >= 5


def test_per_row_settings_equal_the_same_settings_alone() -> None:
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(3)) * 2
    temperature = torch.tensor([0.0, 1.0, 0.7, 1.3])
    top_k = torch.tensor([0, 5, 0, 20])  # 0: no top-k for that row
    top_p = torch.tensor([1.0, 1.0, 0.8, 0.9])  # 1: no nucleus for that row
    settings = [dict(temperature=0.0), dict(temperature=1.0, top_k=5), dict(temperature=0.7, top_p=0.8),
                dict(temperature=1.3, top_k=20, top_p=0.9)]
    for step in range(30):
        batched = sample_logits(logits, temperature, top_k, top_p, seed=100, step=step)
        for row, kw in enumerate(settings):
            assert int(batched[row]) == int(sample_logits(logits[row:row + 1], seed=100 + row, step=step, **kw)[0])
    assert int(batched[0]) == int(logits[0].argmax())  # temperature 0 is exactly greedy


def test_batched_row_i_equals_alone_with_seed_s_plus_i() -> None:
    model = tiny(GPTconfig(context_length=64, vocab_size=50, n_layer=2, n_head=2, d_model=32))
    prompts = [[5], [1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 3]]
    batched = generate(model, prompts, 25, seed=40, top_k=20, top_p=0.95)
    for i, p in enumerate(prompts):
        assert generate(model, [p], 25, seed=40 + i, top_k=20, top_p=0.95)[0] == batched[i]
        streamed = [int(t[0]) for t in stream(model, [p], 25, seed=40 + i, top_k=20, top_p=0.95)]
        assert p + streamed == batched[i]
    # Equal prompts still get different samples (each row its own seed).
    same = generate(model, [[1, 2]] * 3, 20, seed=0)
    assert same[0] != same[1] != same[2]


def test_generator_argument_seeds_the_hash() -> None:
    model = tiny()
    prompt = torch.tensor([[1, 2, 3]])
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = generate(model, prompt, 20, generator=g1), generate(model, prompt, 20, generator=g2)
    assert torch.equal(a, b)
    assert not torch.equal(generate(model, prompt, 20, generator=g1), a)  # the generator moved on
    torch.manual_seed(1)
    c = generate(model, prompt, 20)
    torch.manual_seed(1)
    assert torch.equal(generate(model, prompt, 20), c)  # unseeded follows torch's global generator
    with pytest.raises(ValueError, match="either seed or generator"):
        generate(model, prompt, 3, seed=1, generator=g1)


def test_two_live_streams_on_one_model_are_refused() -> None:
    model = tiny()
    first = model.stream([[1, 2]], 10, seed=0)
    a = [next(first)]
    second = model.stream([[3]], 10, seed=0)
    with pytest.raises(RuntimeError, match="already has a live KV cache"):
        next(second)  # would overwrite the first stream's cache
    a += list(first)  # the first stream is unharmed
    assert torch.stack(a, 1).tolist() == [generate(model, [[1, 2]], 10, seed=0)[0][2:]]
    model.setup_cache(1)
    with pytest.raises(RuntimeError, match="already has a live KV cache"):
        model.setup_cache(1)
    model.clear_cache()


def test_one_token_id_check_everywhere() -> None:
    from gpt2model.evaluate import evaluate

    model = tiny()
    for call in (lambda: model(torch.tensor([[1, 50]])), lambda: generate(model, [[1, 50]], 2),
                 lambda: generate(model, torch.tensor([[1, 50]]), 2), lambda: evaluate(model, [1, 50])):
        with pytest.raises(ValueError, match=r"token id 50 is out of range: ids must be in \[0, 50\)"):
            call()
    for call in (lambda: model(torch.tensor([[1.0]])), lambda: generate(model, torch.tensor([[1.0]]), 2),
                 lambda: evaluate(model, torch.tensor([1.0, 2.0]))):
        with pytest.raises(ValueError, match="integer token ids"):
            call()


def broken_compile(calls: list[str]):
    """A stand-in for ``compiled_decode_step`` whose step fails like a compiler error."""
    def make(device: torch.device, mode: str | None = "auto", fn=None):
        def step(*args: object) -> None:
            calls.append("compiled")
            raise RuntimeError("no compiler here")
        return step
    return make


def test_a_failed_compile_decodes_eagerly_and_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(gen_mod, "compiled_decode_step", broken_compile(calls))
    model = tiny()
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with pytest.warns(UserWarning, match="decode step failed .RuntimeError: no compiler here.; decoding eagerly"):
        first = generate(model, prompt, 10, temperature=0, compile=True)
    assert calls == ["compiled"]
    # Each failing compilation costs seconds: a later call on the same model goes straight to eager.
    with pytest.warns(UserWarning, match="compile=True ignored: the decode step failed to compile on this model"):
        second = generate(model, prompt, 10, seed=1, compile=True)
    assert calls == ["compiled"]
    assert torch.equal(first, generate(model, prompt, 10, temperature=0))
    assert torch.equal(second, generate(model, prompt, 10, seed=1))


@pytest.mark.slow
def test_cuda_graph_mode_step_is_one_graph_and_matches_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CUDA path's compile settings (reduce-overhead, fullgraph, sampling inside the step), run
    # where torch allows it without a GPU: a graph break or a failure would fall back with a warning.
    real = gen_mod.compiled_decode_step
    monkeypatch.setattr(gen_mod, "compiled_decode_step",
                        lambda device, fn=None: real(device, mode="reduce-overhead", fn=fn))
    model = tiny()
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="torch.compile of the decode step failed")
        greedy = generate(model, prompt, 30, temperature=0, compile=True)
        sampled = generate(model, prompt, 30, seed=3, top_k=10, top_p=0.9, compile=True)
    assert torch.equal(greedy, generate(model, prompt, 30, temperature=0))
    assert torch.equal(sampled, generate(model, prompt, 30, seed=3, top_k=10, top_p=0.9))


def test_compiled_step_sets_up_cuda_graph_state_on_any_thread() -> None:
    """torch keeps CUDA-graph-tree state per thread, set up on the importing thread (older torch
    asserts elsewhere): a compiled step run from another thread (the serving engine's) sets it up."""
    import threading

    import torch._inductor.cudagraph_trees as trees

    from gpt2model.generate import run_compiled_step

    seen = []

    def engine_thread() -> None:
        before = hasattr(trees.local, "tree_manager_containers")
        out = run_compiled_step(lambda x: (x + 1,), torch.zeros(2))
        seen.append((before, hasattr(trees.local, "tree_manager_containers"), out[0].tolist()))

    t = threading.Thread(target=engine_thread)
    t.start()
    t.join()
    assert seen == [(False, True, [1.0, 1.0])]


# --- a model with more rows than its tokenizer -------------------------------------------------------
def padded_rows(model: GPT, limit: int) -> GPT:
    """Make rows ``>= limit`` (padding rows: a nanoGPT export's 50,304 for GPT-2's 50,257 tokens)
    win every draw by far: ln_f puts a constant 50 in dimension 0 and only those rows read it (the
    head is tied to wte), so their logits are ~5000 above the rest whatever the input."""
    with torch.no_grad():
        model.transformer.ln_f.weight[0] = 0.0
        model.transformer.ln_f.bias[0] = 50.0
        model.transformer.wte.weight[:limit, 0] = 0.0
        model.transformer.wte.weight[limit:, 0] = 100.0
    return model


LIMIT = 40  # TINY has 50 rows: ids 40..49 are padding


@pytest.mark.parametrize("compile", [False, True])
def test_vocab_limit_never_draws_an_id_past_the_tokenizer(compile: bool) -> None:
    model = padded_rows(tiny(), LIMIT)
    assert int(model(torch.tensor([[1, 2]]))[0, -1].argmax()) >= LIMIT  # model(ids) keeps every row
    assert model(torch.tensor([[1, 2]])).size(-1) == 50
    settings = [dict(temperature=0), dict(temperature=1.0), dict(temperature=1.5, top_k=3),
                dict(temperature=1.0, top_p=0.9), dict(temperature=1.0, min_p=0.1),
                dict(temperature=0.9, repetition_penalty=1.3)]
    if compile:
        settings = settings[:2]  # (a compiled graph per setting costs seconds; eager covers the filters)
    for kwargs in settings:
        # 40 new tokens > context 16: the window slides (refill prefills sample too)
        without = generate(model, [[1, 2, 3]], 40, seed=5, compile=compile, **kwargs)[0][3:]
        assert any(t >= LIMIT for t in without), kwargs  # the padding rows win without a limit
        out = generate(model, [[1, 2, 3], [4]], 40, seed=5, vocab_limit=LIMIT, compile=compile, **kwargs)
        for row in out:
            assert len(row) > 1 and max(row) < LIMIT, kwargs
        streamed = torch.stack(list(stream(model, torch.tensor([[1, 2, 3]]), 40, seed=5, vocab_limit=LIMIT,
                                           compile=compile, **kwargs)), dim=1)[0].tolist()
        assert streamed == out[0][3:], kwargs
    # A limit that keeps every row is no limit: the same tokens.
    assert generate(model, [[1, 2]], 8, temperature=0, vocab_limit=50) == generate(model, [[1, 2]], 8, temperature=0)


def test_vocab_limit_draws_as_the_model_with_only_those_rows() -> None:
    """Sampling under a limit is sampling from the first ``limit`` logits: the same ids, seed for
    seed, as a model whose head has only those rows."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    logits[:, LIMIT:] = 1e4
    for kwargs in (dict(temperature=0), dict(temperature=1.0), dict(top_k=5), dict(top_p=0.8), dict(min_p=0.2)):
        got = sample_logits(logits, seed=7, step=3, vocab_limit=LIMIT, **kwargs)
        assert torch.equal(got, sample_logits(logits[:, :LIMIT].contiguous(), seed=7, step=3, **kwargs)), kwargs
    bias = torch.zeros(4, 50)
    bias[:, 2] = 100.0
    assert sample_logits(logits, bias=bias, vocab_limit=LIMIT).tolist() == [2] * 4  # a full-width bias is cut
    assert sample_logits(logits, bias=bias[:, :LIMIT], vocab_limit=LIMIT).tolist() == [2] * 4
    with pytest.raises(ValueError, match="vocab_limit must be an integer >= 1"):
        generate(tiny(), [[1]], 2, vocab_limit=0)


def test_sample_texts_and_stream_text_limit_to_the_tokenizer() -> None:
    from gpt2model.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMN")  # 40 characters, the model 50 rows
    assert tok.vocab_size == LIMIT
    model = padded_rows(tiny(), LIMIT)
    texts = gen_mod.sample_texts(model, tok, tok.encode("ab"), 3, 30, seed=1, temperature=1.0)
    assert len(texts) == 3 and all(len(t) == 30 for t in texts)
    assert len("".join(stream_text(model, tok, "ab", 30, seed=1, temperature=0))) == 30


def test_a_huge_max_new_tokens_allocates_in_bounded_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """max_new_tokens=10**10 (run until eot) asked for an 80 GB buffer up front; now the buffer
    starts at PREALLOCATED_NEW_TOKENS and doubles, so a long sliding-window run and a huge bound
    work, with the same tokens as a buffer big enough from the start."""
    model = tiny()
    want = generate(model, [[1, 2]], 50, temperature=0.8, seed=3)
    monkeypatch.setattr(gen_mod, "PREALLOCATED_NEW_TOKENS", 4)  # grows 4 -> 8 -> ... -> 50
    assert generate(model, [[1, 2]], 50, temperature=0.8, seed=3) == want
    assert generate(model, [[1, 2]], 50, temperature=0.8, seed=3, compile=True) == want
    monkeypatch.undo()
    it = stream(model, [[1, 2]], 10**10, temperature=0.8, seed=3)  # would raise "cannot allocate" before
    got = [int(next(it)[0]) for _ in range(48)]
    it.close()
    assert [1, 2, *got] == want[0][:50]


def test_sample_cli_on_a_model_with_more_rows_than_its_tokenizer(tmp_path, capsys) -> None:
    """`gpt2 sample` on a model saved with 10 rows more than its tokenizer (padding rows that win
    every draw by far) prints text; before, "ids [..] are outside the character vocabulary"."""
    from gpt2model.cli import main
    from gpt2model.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text("abcdefghij ROMEO:\n")
    model = padded_rows(tiny(GPTconfig(context_length=32, vocab_size=tok.vocab_size + 10, n_layer=1, n_head=2,
                                       d_model=16)), tok.vocab_size)
    model.save_pretrained(tmp_path / "m", tokenizer=tok)
    args = ["sample", "--model", str(tmp_path / "m"), "--device", "cpu", "--prompt", "ROMEO:", "--max-new-tokens",
            "40", "--seed", "3"]
    for extra in ([], ["--stream"], ["--temperature", "0", "--num-samples", "2"], ["--top-k", "3"]):
        assert main([*args, *extra]) == 0, extra
        out = capsys.readouterr().out
        assert out.startswith("ROMEO:") and len(out.split("---------------\n")[0]) == len("ROMEO:") + 40 + 1, extra


@pytest.mark.parametrize("late", [False, True])
def test_a_sequence_of_eos_ids_ends_each_row_at_the_first_of_any(late: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """``eot_id`` may be a list of ids (a ChatML fine-tune's generation_config eos_token_id, e.g.
    [<|im_end|>, <|endoftext|>], as HF's generate takes it): a row ends at the first of any of
    them, a finished row is padded with the first one, stream_text stops there, and the compiled
    step gives the same tokens (before: a TypeError, '<=' not supported for a list). An int, a
    numpy integer and a 0-d tensor stay one id."""
    np = pytest.importorskip("numpy")
    if late:
        monkeypatch.setattr(gen_mod, "READ_DONE_LATE_ON", ("cpu", "cuda"))
    model = tiny(GPTconfig(context_length=64, vocab_size=50, n_layer=2, n_head=2, d_model=32), seed=1)
    prompts = [[5], [1, 2, 3, 4]]
    free = generate(model, prompts, 20, seed=3, top_k=10)
    conts = [free[0][1:], free[1][4:]]
    a, b = conts[0][first_new_token(conts[0])], conts[1][first_new_token(conts[1])]
    assert a != b
    ends = [next(i + 1 for i, t in enumerate(c) if t in (a, b)) for c in conts]
    want = [p + c[:e] for p, c, e in zip(prompts, conts, ends, strict=True)]
    assert generate(model, prompts, 20, seed=3, top_k=10, eot_id=[b, a, b]) == want
    assert generate(model, prompts, 20, seed=3, top_k=10, eot_id=(a, b), compile=True) == want
    x = torch.tensor([[5, 5, 5, 5], [1, 2, 3, 4]])
    out = generate(model, x, 20, seed=3, top_k=10, eot_id=torch.tensor([b, a]))[:, 4:].tolist()
    free_t = generate(model, x, 20, seed=3, top_k=10)[:, 4:].tolist()
    ends_t = [next((i + 1 for i, t in enumerate(c) if t in (a, b)), 20) for c in free_t]
    assert len(out[0]) == max(ends_t)
    for row, f, e in zip(out, free_t, ends_t, strict=True):
        assert row[:e] == f[:e] and row[e:] == [b] * (len(row) - e)  # padded with the first id
    tok = CharDecoder()
    text = "".join(stream_text(model, tok, [1, 2, 3, 4], 20, seed=4, top_k=10, eot_id=[a, b]))  # row 1: seed 3 + 1
    assert text == tok.decode(conts[1][:ends[1] - 1])  # the eos id itself is not text
    for one in (a, np.int64(a), torch.tensor(a)):
        assert generate(model, prompts, 20, seed=3, top_k=10, eot_id=one)[0] == generate(
            model, prompts, 20, seed=3, top_k=10, eot_id=[a])[0]


@pytest.mark.parametrize("eot_id, fragment", [
    ([3, 50], "eot_id 50 is not a token id"), ([-1], "eot_id -1 is not a token id"),
    ("x", "eot_id must be a token id or a sequence"), (True, "eot_id must be"), ([1.0], "eot_id must be"),
])
def test_bad_eos_ids_are_one_clear_error(eot_id: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        generate(tiny(), [[1, 2]], 3, eot_id=eot_id)
