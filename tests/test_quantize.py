"""Weight-only int8 (``model.quantize("int8")``) and the decode weight layouts (``prepare_decode``):
error bounds of single layers, both int8 matmul paths, quality gates on trained models (perplexity
within 1% of fp32, identical greedy tokens), and that the decode layout changes nothing a user can
see: logits, training, tied weights, HF parity and saved files."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn import functional as F

from gpt2model import GPT, GPTconfig
from gpt2model.generate import generate
from gpt2model.quantize import (
    INT8_KERNEL_MAX_ROWS,
    Int8Linear,
    _in_decode_order,
    is_quantized,
    quantize,
    quantize_int8,
)


# --- single layers -----------------------------------------------------------------------------------
def test_quantize_int8_rounds_each_weight_to_within_half_a_step() -> None:
    torch.manual_seed(0)
    w = torch.randn(48, 40) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different ranges
    w[5] = 0.0  # an all-zero row must not divide by zero
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scales.shape == (48,)
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    assert torch.equal(q.abs().amax(dim=1)[torch.arange(48) != 5], torch.full((47,), 127, dtype=torch.int8))
    err = (w - q.float() * scales[:, None]).abs()
    assert torch.all(err <= scales[:, None] / 2 * (1 + 1e-6))
    assert torch.all(q[5] == 0)
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8(torch.zeros(3))


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("rows", [1, 3, INT8_KERNEL_MAX_ROWS, INT8_KERNEL_MAX_ROWS + 1, 40])
@pytest.mark.parametrize("in_features", [64, 12])  # 12: not a multiple of 8, the CPU kernel can't take it
def test_int8_linear_matches_its_dequantized_weight_and_the_float_layer(rows: int, in_features: int,
                                                                        dynamic: bool) -> None:
    torch.manual_seed(1)
    lin = nn.Linear(in_features, 96)
    qlin = Int8Linear.from_linear(lin, dynamic=dynamic)
    x = torch.randn(rows, in_features)
    y = qlin(x)
    assert y.dtype == torch.float32 and y.shape == (rows, 96)
    exact = F.linear(x, qlin.dequantize(), lin.bias).detach()
    ref = lin(x).detach()
    if dynamic:
        # FBGEMM's int8 x int8 GEMM: each row's activations on a 7-bit grid of step 2 * max|x| / 127,
        # so each is off by at most half a step and each output by at most that times sum |w|.
        bound = x.abs().amax(dim=1, keepdim=True) / 127 * qlin.dequantize().abs().sum(dim=1)
        assert torch.all((y - exact).abs() <= bound * (1 + 1e-4) + 1e-5)
        assert (y - exact).abs().max() > 1e-4  # ... and they are quantized (not a float path)
        assert (y - ref).norm() / ref.norm() < 0.03  # the weights' and the activations' rounding
    else:
        # Against the exact product with the dequantized weight: only the activations' rounding
        # (a 15-bit grid per row in our kernel, bf16 (relative 2^-9) in torch's) separates them.
        assert (y - exact).abs().max() <= 1e-2 * exact.abs().max()
        # Against the float layer: int8 rounding of the weights, about 1% relative at most.
        assert (y - ref).norm() / ref.norm() < 0.01
    # 3-D input (batch, time, features) and bf16 activations keep their shape and dtype.
    y3 = qlin(x.view(1, rows, in_features).bfloat16())
    assert y3.dtype == torch.bfloat16 and y3.shape == (1, rows, 96)
    assert (y3.float().view(rows, 96) - exact).abs().max() <= 3e-2 * exact.abs().max()


def test_int8_cpu_kernels_by_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Weight-only int8: up to 16 rows take our AVX2 kernel (cpukernels.py) where it is built,
    else ``_weight_int8pack_mm``, more dequantize + GEMM; ``dynamic`` (int8-dynamic): every eager
    input (one row, a batched step, a prefill) takes FBGEMM's int8 x int8 GEMM, and without FBGEMM
    the weight-only kernels."""
    import gpt2model.quantize as quantize_module
    from gpt2model import cpukernels

    calls = []
    real_mm, real_packed = torch._weight_int8pack_mm, quantize_module._fbgemm_packed
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(("int8pack", *a[0].shape)) or real_mm(*a))
    monkeypatch.setattr(quantize_module, "_fbgemm_packed", lambda *a: calls.append(("fbgemm",)) or real_packed(*a))
    lin = nn.Linear(32, 16, bias=False)
    qlin, dyn = Int8Linear.from_linear(lin), Int8Linear.from_linear(lin, dynamic=True)
    assert qlin.use_kernel == cpukernels.enabled() and not dyn.use_kernel
    if qlin.use_kernel:
        before = cpukernels.calls()
        for rows in (1, INT8_KERNEL_MAX_ROWS, INT8_KERNEL_MAX_ROWS + 1):
            qlin(torch.randn(1, rows, 32))
        assert cpukernels.calls() - before == 2 and calls == []
    qlin.use_kernel = False  # torch's kernels: what runs where ours cannot be built
    weight_only = [("int8pack", 1, 32), ("int8pack", INT8_KERNEL_MAX_ROWS, 32)]
    for rows in (1, INT8_KERNEL_MAX_ROWS, INT8_KERNEL_MAX_ROWS + 1):
        qlin(torch.randn(1, rows, 32))
    assert calls == weight_only
    for rows in (1, 2, 200):
        dyn(torch.randn(1, rows, 32))
    assert calls[2:] == [("fbgemm",)] * 3
    monkeypatch.setattr(quantize_module, "_FBGEMM_INT8", False)
    for rows in (1, INT8_KERNEL_MAX_ROWS, INT8_KERNEL_MAX_ROWS + 1):
        dyn(torch.randn(1, rows, 32))
    assert calls[5:] == weight_only


@pytest.mark.parametrize("mode", ["int8", "int8-dynamic"])
def test_int8_seeded_engine_requests_get_their_tokens_alone_or_batched(mode: str) -> None:
    """The engine's contract (same seed, same tokens alone or batched) holds for int8: a one-row
    step, a batched one and a prefill compute a row the same way (eager here; a compiled engine
    step always has all of its rows)."""
    from gpt2model.engine import Engine, SamplingParams, TokenEvent

    model = spiky(SMALL).quantize(mode)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11]]
    engine = Engine(model, max_batch=4)
    engine.start()
    try:
        assert engine.ready.wait(60)

        def run(batch: list[list[int]]) -> list[list[int]]:
            requests = [engine.submit(p, SamplingParams(max_tokens=10, temperature=0.8, seed=7)) for p in batch]
            return [[e.token for e in r.events() if isinstance(e, TokenEvent)] for r in requests]

        assert run(prompts) == [run([p])[0] for p in prompts]
    finally:
        engine.shutdown(10)


def test_int8_rows_kernel_gives_each_row_the_same_bits_alone_or_in_any_batch() -> None:
    """FBGEMM scales the activations of a whole call by one range; each row's grid must be its own,
    or a request's tokens would depend on its neighbours' values (the engine batches requests)."""
    torch.manual_seed(4)
    qlin = Int8Linear.from_linear(nn.Linear(64, 40), dynamic=True)
    x = torch.randn(6, 64) * torch.logspace(-3, 3, 6)[:, None]  # rows of very different ranges
    x[2] = 0.0  # and an all-zero row
    together = qlin(x)
    compiled = torch.compile(qlin, fullgraph=True, dynamic=False)
    for r in range(6):
        for neighbours in (torch.randn(1, 64) * 1e4, torch.randn(7, 64) * 1e-4, x[:max(r, 1)]):
            batch = torch.cat([neighbours, x[r:r + 1], neighbours])
            assert torch.equal(qlin(batch)[len(neighbours)], together[r])
        assert torch.equal(compiled(torch.cat([x[r:r + 1], x[r:r + 1] * 100]))[0], together[r])
    assert torch.equal(together[2], qlin.bias)


def test_int8_rows_kernel_packs_each_weight_once_and_follows_changes() -> None:
    import copy
    import gc

    from gpt2model.quantize import _FBGEMM_PACKED

    torch.manual_seed(5)
    lin = nn.Linear(64, 24)
    qlin = Int8Linear.from_linear(lin, dynamic=True)
    x = torch.randn(3, 64)
    y = qlin(x)
    entry = _FBGEMM_PACKED[id(qlin.weight)]
    assert torch.equal(qlin(x), y) and _FBGEMM_PACKED[id(qlin.weight)] is entry  # packed once, reused
    twin = copy.deepcopy(qlin)  # its own weight tensors: packed for itself
    assert torch.equal(twin(x), y) and id(twin.weight) in _FBGEMM_PACKED
    with torch.no_grad():
        qlin.weight.neg_()  # an in-place change: the next call packs the new weight
    assert torch.allclose(qlin(x), -(y - qlin.bias) + qlin.bias, atol=1e-5)
    twin_key = id(twin.weight)
    del twin
    gc.collect()
    assert twin_key not in _FBGEMM_PACKED  # the packed copy went with its weight


def test_int8_decode_linear_adds_its_bias_without_a_separate_cast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode pays per op: the fp32 bias add takes the kernel's bf16 product directly (type
    promotion, exactly the cast-then-add result) instead of a cast and then an add."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    from gpt2model import quantize as quantize_module

    monkeypatch.setattr(quantize_module, "_FBGEMM_INT8", False)  # the kernel of CPUs without FBGEMM
    torch.manual_seed(2)
    qlin = Int8Linear.from_linear(nn.Linear(64, 48))
    qlin.use_kernel = False  # torch's kernel (where ours cannot be built)
    x = torch.randn(1, 1, 64)
    with Ops() as ops:
        y = qlin(x)
    # The activations are permuted into the weight's column order and cast to bf16 in one copy;
    # nothing is cast back.
    assert [n for n in ops.names if n.startswith(("_to_copy", "copy", "clone"))] == ["copy_.default"]
    product = torch._weight_int8pack_mm(_in_decode_order(x.view(1, 64), torch.bfloat16), qlin.weight,
                                        qlin.scales_bf16)
    assert y.dtype == torch.float32 and torch.equal(y.view(1, 48), product.float() + qlin.bias)


def test_int8_weight_is_stored_interleaved_and_every_path_computes_the_same_product() -> None:
    torch.manual_seed(3)
    lin = nn.Linear(64, 40)
    q, _ = quantize_int8(lin.weight)
    qlin = Int8Linear.from_linear(lin)
    assert qlin.interleaved and not torch.equal(qlin.weight, q)
    assert torch.equal(qlin.weight.view(40, 16, 4)[:, 5, 2], q[:, 2 * 16 + 5])  # word 5, byte 2 = input 37
    assert torch.equal(qlin.int8_weight(), q)
    odd = Int8Linear.from_linear(nn.Linear(10, 6))  # in_features not a multiple of 4: plain order
    assert not odd.interleaved and torch.equal(odd.weight, quantize_int8(odd.dequantize())[0])
    x = torch.randn(1, 64)
    exact = F.linear(x, qlin.dequantize(), lin.bias)
    # Our kernel (eager and compiled): activations on a 15-bit grid per row, integer products.
    if qlin.use_kernel:
        assert (qlin(x) - exact).abs().max() <= 1e-4 * exact.abs().max()
        assert (torch.compile(qlin, fullgraph=True, dynamic=False)(x) - exact).abs().max() <= 1e-4 * exact.abs().max()
    # Without it, inside torch.compile on a CPU one row takes inductor's int8 GEMV: fp32
    # activations and fp32 accumulation, so it is the exact product up to summation order (the
    # eager kernel rounds the activations to bf16, ~1e-3 relative).
    qlin.use_kernel = False
    compiled = torch.compile(qlin, fullgraph=True, dynamic=False)(x)
    assert (compiled - exact).abs().max() <= 1e-5 * exact.abs().max()
    assert (qlin(x) - exact).abs().max() > 1e-5 * exact.abs().max()


def test_compiled_int8_decode_is_the_dequantized_float_model() -> None:
    """A compiled CPU decode step of an int8 model (the inductor GEMV) computes what the float
    model with the dequantized weights computes: the same greedy tokens, and no fallback."""
    model = spiky(GPTconfig(context_length=32, vocab_size=2000, n_layer=2, n_head=2, d_model=32))
    model.quantize("int8")
    assert isinstance(model.lm_head, Int8Linear)
    reference = spiky(GPTconfig(context_length=32, vocab_size=2000, n_layer=2, n_head=2, d_model=32))
    reference.lm_head = nn.Linear(32, 2000, bias=False)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, Int8Linear):
                target = reference.get_submodule(name)
                target.weight.copy_(m.dequantize())
                if m.bias is not None:
                    target.bias.copy_(m.bias)
    prompt = [[5, 6, 7]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = generate(model, prompt, 40, temperature=0, compile=True)  # slides past the context too
    assert not [w for w in caught if "decode step failed" in str(w.message)]
    assert compiled == generate(reference, prompt, 40, temperature=0)


# --- the model ---------------------------------------------------------------------------------------
def spiky(config: GPTconfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" not in name:
                p.normal_(0, 0.15)
    return model.eval()


SMALL = GPTconfig(context_length=32, vocab_size=80, n_layer=2, n_head=2, d_model=32)


def test_quantize_swaps_every_linear_unties_the_head_and_keeps_the_embedding() -> None:
    model = spiky(SMALL)
    wte = model.transformer.wte.weight.detach().clone()
    assert not is_quantized(model)
    assert model.quantize("int8", head=True) is model
    assert is_quantized(model) and not model.training
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.lm_head, Int8Linear)
    assert torch.equal(model.transformer.wte.weight, wte) and model.transformer.wte.weight.dtype == torch.float32
    assert torch.allclose(model.lm_head.dequantize(), wte, atol=float(model.lm_head.scales.max()) / 2 + 1e-7)
    with pytest.raises(ValueError, match="already quantized"):
        model.quantize("int8")
    with pytest.raises(ValueError, match="unknown quantization 'int4'; choose one of int8"):
        quantize(spiky(SMALL), "int4")


def test_the_head_is_quantized_where_it_is_a_sizeable_part_of_the_weights() -> None:
    # A character vocabulary's head is a sliver of the weights: int8 there saves nothing and flips
    # near-tied greedy tokens, so by default it stays float (and tied); a BPE-sized head is quantized.
    char = GPT(GPTconfig(context_length=32, vocab_size=65, n_layer=2, n_head=2, d_model=64)).quantize("int8")
    assert isinstance(char.lm_head, nn.Linear) and char.lm_head.weight is char.transformer.wte.weight
    assert isinstance(char.transformer.h[0].mlp.c_fc, Int8Linear)
    bpe = GPT(GPTconfig(context_length=32, vocab_size=5000, n_layer=2, n_head=2, d_model=64)).quantize("int8")
    assert isinstance(bpe.lm_head, Int8Linear)
    forced = GPT(GPTconfig(context_length=32, vocab_size=5000, n_layer=2, n_head=2, d_model=64))
    assert isinstance(forced.quantize("int8", head=False).lm_head, nn.Linear)


def test_a_quantized_model_refuses_to_be_saved(tmp_path) -> None:
    model = spiky(SMALL).quantize("int8")
    with pytest.raises(ValueError, match="no quantized save format.*quantize after loading"):
        model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m" / "model.safetensors").exists()


def test_int8_model_generates_batched_and_in_bf16() -> None:
    model = spiky(SMALL)
    prompt = [[1, 2, 3], [4, 5, 6, 7, 8]]
    fp32 = generate(model, prompt, 40, temperature=0)  # past the context: slides
    model.quantize("int8")
    out = generate(model, prompt, 40, temperature=0)
    assert [len(r) for r in out] == [43, 45]
    assert out[0][:8] == fp32[0][:8] and out[1][:10] == fp32[1][:10]
    model.to(torch.bfloat16)
    assert [len(r) for r in generate(model, prompt, 10, seed=0)] == [13, 15]


def test_int8_bf16_decode_step_compiles(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.compile pattern-matches gpt-fast's ``linear(x, q.to(bf16)) * scales`` as weight-only
    # int8 and its lowering failed on bf16 activations: every compiled int8 decode on CUDA fell back
    # to eager (22 tokens/s on an H200). On a CPU that path is taken, without FBGEMM, by rows past
    # the kernel's limit.
    from gpt2model import quantize as quantize_module

    monkeypatch.setattr(quantize_module, "_FBGEMM_INT8", False)
    model = spiky(SMALL).to(torch.bfloat16).quantize("int8")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, SMALL.vocab_size, (INT8_KERNEL_MAX_ROWS + 1, 3), generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = generate(model, prompt, 6, temperature=0, compile=True)
    assert not [w for w in caught if "decode step failed" in str(w.message)]
    assert torch.equal(compiled, generate(model, prompt, 6, temperature=0))


def test_compiled_int8_batch_decode_runs_the_int8_rows_kernel_in_its_one_graph() -> None:
    """int8-dynamic: a compiled decode step of a few rows calls FBGEMM's GEMM as an op inside the
    one graph (no fallback to eager) and gives the eager tokens, which are each row's tokens alone."""
    model = spiky(SMALL).quantize("int8-dynamic")
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, SMALL.vocab_size, (4, 3), generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = generate(model, prompt, 8, temperature=0, compile=True)
    assert not [w for w in caught if "decode step failed" in str(w.message)]
    assert torch.equal(compiled, generate(model, prompt, 8, temperature=0))
    alone = torch.cat([generate(model, prompt[i:i + 1].repeat(2, 1), 8, temperature=0)[:1] for i in range(4)])
    assert torch.equal(compiled, alone)


def test_compiled_f16_batch_decode_runs_fbgemm_in_its_one_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiled decode step of several rows runs Fp16Linear's FBGEMM GEMM as an op (it widened
    the whole weight to fp32 every step before: 80 ms per 8-row step of the 6x384 BPE model)."""
    from gpt2model import quantize as quantize_module

    model = spiky(SMALL).quantize("f16", head=True)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, SMALL.vocab_size, (3, 4), generator=g)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="torch.compile of the decode step failed")
        compiled = generate(model, prompt, 6, temperature=0, compile=True)
        assert torch.equal(compiled, generate(model, prompt, 6, temperature=0))
        calls = []
        real = quantize_module._packed_copy
        monkeypatch.setattr(quantize_module, "_packed_copy", lambda *a: calls.append(1) or real(*a))
        generate(model, prompt, 6, temperature=0, compile=True)
    assert len(calls) >= 5 * 5  # every linear of every compiled step (5 steps after the prefill)


# --- the decode layout -------------------------------------------------------------------------------
BIG_VOCAB = GPTconfig(context_length=32, vocab_size=20000, n_layer=2, n_head=2, d_model=32)  # a BPE-sized head


def test_decode_layout_while_the_cache_lives_changes_no_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 on CPU: the linear weights are re-laid column-major (in place, the head still tied),
    and a cache of >= PACKED_HEAD_MIN_ROWS rows adds a oneDNN-packed copy of a large head for
    steps of that many rows; logits are unchanged (fp32 within 1e-5) throughout."""
    from gpt2model.quantize import NARROW_ROW_MAJOR_MAX_ROWS, PACKED_HEAD_MIN_ROWS, PackedHead

    model = spiky(BIG_VOCAB)
    ids = torch.randint(0, BIG_VOCAB.vocab_size, (PACKED_HEAD_MIN_ROWS, 20))
    ref = model(ids).detach()
    params = dict(model.named_parameters())
    calls = []
    real_call = PackedHead.__call__
    monkeypatch.setattr(PackedHead, "__call__", lambda self, x: calls.append(x.shape) or real_call(self, x))
    model.setup_cache(PACKED_HEAD_MIN_ROWS)
    head = model.lm_head.weight
    assert head.stride() == (1, BIG_VOCAB.vocab_size) and head is model.transformer.wte.weight  # still tied
    w = model.transformer.h[0].mlp.c_fc.weight
    assert w.stride() == (1, w.size(0))  # W.t() contiguous
    down = model.transformer.h[0].mlp.c_proj.weight  # narrowing (out < in): row-major for caches of few rows
    assert PACKED_HEAD_MIN_ROWS <= NARROW_ROW_MAJOR_MAX_ROWS and down.is_contiguous()
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    logits = model(ids, input_pos=torch.arange(20)).detach()
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    assert calls == [(PACKED_HEAD_MIN_ROWS, 20, 32)]
    # A weight written in place (e.g. load_state_dict) is seen at once: the stale packed copy is
    # not used, and the next cache packs the new weight.
    with torch.no_grad():
        head[7].mul_(3)
    changed = GPT(BIG_VOCAB).eval()
    changed.load_state_dict(model.state_dict())
    expected = changed(ids).detach()
    model.clear_cache()
    model.setup_cache(PACKED_HEAD_MIN_ROWS)
    torch.testing.assert_close(model(ids[:, :1], input_pos=torch.arange(1)).detach(), expected[:, :1],
                               rtol=1e-5, atol=1e-5)
    assert len(calls) == 2
    with torch.no_grad():
        head[7].mul_(0.5)  # while the cache lives
    changed.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(ids[:, 1:2], input_pos=torch.arange(1, 2)).detach(),
                               changed(ids[:, :2]).detach()[:, 1:], rtol=1e-5, atol=1e-5)
    assert len(calls) == 2  # the stale copy was not used
    model.clear_cache()
    model.setup_cache(NARROW_ROW_MAJOR_MAX_ROWS + 1)  # more rows: the narrowing matrices column-major too
    assert down.stride() == (1, down.size(0)) and head.stride() == (1, BIG_VOCAB.vocab_size)
    torch.testing.assert_close(model(ids[:1, :1], input_pos=torch.arange(1)).detach(), changed(ids[:1, :1]).detach(),
                               rtol=1e-5, atol=1e-5)
    model.clear_cache()
    model.setup_cache(1)  # one row: where our fp32 GEMV is built, it reads every weight row-major
    from gpt2model import cpukernels

    if cpukernels.enabled():
        assert head.is_contiguous() and down.is_contiguous() and head is model.transformer.wte.weight
    else:  # eval mode: the layout stays between generations (one copy per model)
        assert head.stride() == (1, BIG_VOCAB.vocab_size) and down.is_contiguous()
    model.clear_cache()
    model.train()  # training gets the usual layout back, and the packed copy is dropped
    assert all(p.is_contiguous() for p in model.parameters()) and model._packed_head is None
    model.setup_cache(PACKED_HEAD_MIN_ROWS)  # a training-mode model is never re-laid
    assert all(p.is_contiguous() for p in model.parameters()) and model._packed_head is None
    model.clear_cache()
    model.eval()
    # bf16 keeps row-major (its CPU kernels want it).
    model.to(torch.bfloat16).setup_cache(PACKED_HEAD_MIN_ROWS)
    assert model.transformer.h[0].mlp.c_fc.weight.is_contiguous() and model.lm_head.weight.is_contiguous()
    assert model._packed_head is None
    model.clear_cache()
    small = spiky(SMALL)  # a small head: no packed copy (it would gain nothing)
    small.setup_cache(PACKED_HEAD_MIN_ROWS)
    assert small._packed_head is None and small.lm_head.weight.stride() == (1, SMALL.vocab_size)


def test_generating_between_training_steps_changes_nothing(tmp_path) -> None:
    """Train, generate, train: the same losses and weights as training straight through, and the
    same saved files as a model that never generated."""

    def run(generate_between: bool) -> tuple[list[float], GPT]:
        model = spiky(SMALL)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(0)
        losses = []
        for step in range(3):
            model.train()
            ids = torch.randint(0, 80, (4, 17), generator=g)
            loss = model.loss(ids[:, :-1], ids[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if generate_between and step == 1:
                generate(model.eval(), [[1, 2, 3]], 5, seed=0)
        return losses, model

    plain_losses, plain = run(False)
    losses, model = run(True)
    assert losses == plain_losses
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert p.is_contiguous() and torch.equal(p, q), name
    plain.save_pretrained(tmp_path / "plain")
    generate(model, [[1, 2, 3]], 5, temperature=0)
    model.save_pretrained(tmp_path / "generated")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "generated" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()


# --- quality gates -----------------------------------------------------------------------------------
def train_char_model(text: str, config: GPTconfig, steps: int, batch: int, seq_len: int, lr: float = 3e-3,
                     seed: int = 0) -> tuple[GPT, dict[str, int]]:
    """AdamW on the first 90% of ``text`` (the seed's split): enough for peaked, text-like
    predictions, which is what quantization must preserve. One thread: these matmuls are too small
    to gain from two, and on a shared machine the second thread's barriers cost more than it gives."""
    vocab = {c: i for i, c in enumerate(sorted(set(text)))}
    data = torch.tensor([vocab[c] for c in text[: int(0.9 * len(text))]], dtype=torch.long)
    torch.manual_seed(seed)
    model = GPT(GPTconfig(**{**config.to_dict(), "vocab_size": len(vocab)}))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            ix = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=g)
            x = torch.stack([data[i:i + seq_len] for i in ix])
            y = torch.stack([data[i + 1:i + seq_len + 1] for i in ix])
            loss = model.loss(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval(), vocab


@torch.no_grad()
def val_logits(model: GPT, val: torch.Tensor, windows: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(windows * seq_len, V)`` of evenly spaced validation windows and their targets."""
    starts = torch.linspace(0, len(val) - seq_len - 1, windows).long()
    x = torch.stack([val[i:i + seq_len] for i in starts])
    y = torch.stack([val[i + 1:i + seq_len + 1] for i in starts])
    return model(x).flatten(0, 1).float(), y.flatten()


@torch.no_grad()
def decode_path_logits(model: GPT, ids: list[int], start: int) -> torch.Tensor:
    """The logits ``(len(ids) - start, V)`` that predict ``ids[start:]``, computed as greedy decoding
    computes them (a cached prefill of ``ids[:start]``, then one token per forward, so the same
    one-row kernels), along the given path rather than the model's own."""
    model.setup_cache(1, len(ids))
    try:
        x = torch.tensor([ids])
        out = [model(x[:, :start], input_pos=torch.arange(start))[:, -1]]
        for t in range(start, len(ids) - 1):
            out.append(model(x[:, t:t + 1], input_pos=torch.tensor([t]))[:, -1])
    finally:
        model.clear_cache()
    return torch.cat(out).float()


# The largest change int8 may make to any logit along the greedy path: the seed model's logits
# span ~20 and int8 moved them by at most 0.047 (300 training steps; int8-dynamic's 7-bit per-row
# activation grids: 0.091); a wrong column order moves them by units.
INT8_MAX_LOGIT_CHANGE = 0.1


def check_int8_quality(model: GPT, val: torch.Tensor, prompt: list[int], *, windows: int, seq_len: int,
                       n_greedy: int = 0) -> dict[str, float]:
    """Quantize ``model`` and compare with its fp32 self: perplexity within 1%, the same
    next-token argmax (teacher-forced) at >= 99% of validation positions and, with ``n_greedy``,
    the same greedy continuation of ``prompt``.

    The greedy check is robust to near-ties without asserting less: along fp32's greedy path (both
    models fed the same tokens, decoding's kernels) every logit must move by at most
    ``INT8_MAX_LOGIT_CHANGE``, and int8's own greedy tokens must equal fp32's, except that the two
    may part at a near-tie: a position whose fp32 top-2 margin is at most twice the largest logit
    change int8 made there, the only kind of position where int8 can change the greedy choice (an
    undertrained model has several: the 300-step seed model has 5 in its first 50 tokens, the
    smallest margin 0.012, so whether all 50 tokens matched was luck of rounding). If they part,
    the assertion says where, with the margin there and int8's change."""
    logits, y = val_logits(model, val, windows, seq_len)
    greedy = generate(model, [prompt], n_greedy, temperature=0)[0] if n_greedy else None
    path = decode_path_logits(model, greedy, len(prompt)) if n_greedy else None
    model.quantize("int8")
    qlogits, _ = val_logits(model, val, windows, seq_len)
    ppl, qppl = math.exp(F.cross_entropy(logits, y).item()), math.exp(F.cross_entropy(qlogits, y).item())
    agree = (logits.argmax(-1) == qlogits.argmax(-1)).float().mean().item()
    assert abs(qppl / ppl - 1) < 0.01, (ppl, qppl)
    assert agree >= 0.99, agree
    stats = {"ppl_fp32": ppl, "ppl_int8": qppl, "argmax_agreement": agree}
    if greedy is not None:
        qpath = decode_path_logits(model, greedy, len(prompt))
        change = (qpath - path).abs().amax(dim=-1).tolist()  # per position, over the vocabulary
        top2 = path.topk(2, dim=-1).values
        margins = (top2[:, 0] - top2[:, 1]).tolist()
        assert max(change) <= INT8_MAX_LOGIT_CHANGE, f"int8 moved a logit along the fp32 greedy path by {max(change)}"
        qgreedy = generate(model, [prompt], n_greedy, temperature=0)[0]
        new, qnew = greedy[len(prompt):], qgreedy[len(prompt):]
        first = next((i for i, (a, b) in enumerate(zip(new, qnew, strict=True)) if a != b), None)
        ties = [i for i, (m, c) in enumerate(zip(margins, change, strict=True)) if m <= 2 * c + 1e-4]
        stats.update(max_logit_change=max(change), first_divergence=first, near_ties=ties, min_margin=min(margins))
        if first is not None:
            assert first in ties, (
                f"int8 greedy differs from fp32 at new token {first} ({new[first]} -> {qnew[first]}), not a near-tie: "
                f"fp32's top-2 logit margin there is {margins[first]:.4f}, int8 changed its logits by <= "
                f"{change[first]:.4f}")
        print(f"int8 greedy vs fp32: first divergence {first} (near-tie positions {ties}: fp32 top-2 margin <= 2x "
              f"int8's logit change), largest change {max(change):.4f}, smallest margin {min(margins):.4f}")
    return stats


def test_int8_char_model_on_tiny_shakespeare_keeps_perplexity_and_predictions(shakespeare_text: str) -> None:
    config = GPTconfig(context_length=64, vocab_size=65, n_layer=2, n_head=4, d_model=64)
    model, vocab = train_char_model(shakespeare_text, config, steps=200, batch=16, seq_len=32)
    val = torch.tensor([vocab[c] for c in shakespeare_text[int(0.9 * len(shakespeare_text)):]], dtype=torch.long)
    stats = check_int8_quality(model, val, [vocab[c] for c in "ROMEO:\n"], windows=64, seq_len=64)
    assert stats["ppl_fp32"] < 14  # trained: a uniform guess over 65 characters would be 65


@pytest.mark.slow
def test_int8_seed_model_on_tiny_shakespeare_keeps_perplexity_and_50_greedy_tokens(shakespeare_text: str) -> None:
    model, vocab = train_char_model(shakespeare_text, GPTconfig(), steps=300, batch=16, seq_len=64)  # 6x384
    val = torch.tensor([vocab[c] for c in shakespeare_text[int(0.9 * len(shakespeare_text)):]], dtype=torch.long)
    check_int8_quality(model, val, [vocab[c] for c in "ROMEO:\n"], windows=32, seq_len=256, n_greedy=50)


@pytest.mark.slow
def test_int8_gpt2_shape_keeps_perplexity_on_tiny_shakespeare(shakespeare_text: str) -> None:
    """The 124M shape (context cropped to 256 to keep the fp32 forwards affordable), random init."""
    from gpt2model.tokenizer import load_tokenizer

    tok = load_tokenizer("gpt2")
    val = torch.tensor(tok.encode(shakespeare_text[int(0.9 * len(shakespeare_text)):][:20_000]), dtype=torch.long)
    torch.manual_seed(0)
    model = GPT(GPTconfig(context_length=256, vocab_size=50257, n_layer=12, n_head=12, d_model=768)).eval()
    logits, y = val_logits(model, val, 8, 256)
    model.quantize("int8")
    qlogits, _ = val_logits(model, val, 8, 256)
    ppl, qppl = math.exp(F.cross_entropy(logits, y).item()), math.exp(F.cross_entropy(qlogits, y).item())
    assert abs(qppl / ppl - 1) < 0.01, (ppl, qppl)


# --- the CLI -----------------------------------------------------------------------------------------
def test_cli_dtype_int8_quantizes_at_load_for_sample_and_eval(tmp_path, capsys) -> None:
    import json

    from gpt2model.cli import main
    from gpt2model.evaluate import evaluate
    from gpt2model.tokenizer import CharTokenizer

    text = "to be or not to be, that is the question\n" * 5
    tok = CharTokenizer.from_text(text)
    model = spiky(GPTconfig(context_length=32, vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16))
    model.save_pretrained(tmp_path / "m", tokenizer=tok)
    saved = (tmp_path / "m" / "model.safetensors").read_bytes()
    model.quantize("int8")
    assert main(["sample", "--model", str(tmp_path / "m"), "--device", "cpu", "--dtype", "int8", "--prompt", "to be",
                 "--max-new-tokens", "20", "--temperature", "0"]) == 0
    ids = generate(model, [tok.encode("to be")], 20, temperature=0)[0]
    assert capsys.readouterr().out == tok.decode(ids) + "\n"
    (tmp_path / "t.txt").write_text(text)
    assert main(["eval", "--model", str(tmp_path / "m"), "--text", str(tmp_path / "t.txt"), "--stride", "8",
                 "--json", str(tmp_path / "r.json"), "--no-progress", "--device", "cpu", "--dtype", "int8"]) == 0
    expected = evaluate(model, tok.encode(text), stride=8, tokenizer=tok)
    assert math.isclose(json.loads((tmp_path / "r.json").read_text())["loss"], expected.loss, rel_tol=1e-6)
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == saved  # nothing written back
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["sample", "--model", str(tmp_path / "m"), "--dtype", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err


# --- f16: float16 weights, float32 math (CPU) ------------------------------------------------------
def test_f16_linear_is_the_layer_with_float16_rounded_weights_in_float32_math() -> None:
    import copy

    from gpt2model.quantize import Fp16Linear

    torch.manual_seed(0)
    lin = nn.Linear(64, 96)
    f16 = Fp16Linear.from_linear(lin)
    assert f16.weight.dtype == torch.float16 and f16.bias.dtype == torch.float32
    x = torch.randn(2, 5, 64)
    ref = F.linear(x, lin.weight.detach().half().float(), lin.bias.detach())
    out = f16(x)
    assert out.shape == (2, 5, 96) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (out - lin(x)).abs().max() > 0  # the weights really are rounded to float16
    with torch.no_grad():
        f16.weight.mul_(2)  # in place: the packed copy is stale and is made again
    torch.testing.assert_close(f16(x) - f16.bias, 2 * (ref - lin.bias.detach()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(copy.deepcopy(f16)(x), f16(x))
    from gpt2model import quantize as q

    if q._ATEN_FP16_GEMM:  # aten's fbgemm fp16 op pair (cheaper to call): the quantized op's exact results
        packed = torch.ops.quantized.linear_prepack_fp16(f16.weight.float(), f16.bias)
        assert torch.equal(f16(x), torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, 64), packed).view(2, 5, 96))


def test_f16_model_is_close_to_float32_and_generates_its_greedy_tokens() -> None:
    from gpt2model.quantize import Fp16Linear

    model = spiky(SMALL)
    ids = torch.randint(0, SMALL.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    prompt = [[1, 2, 3], [4, 5, 6, 7, 8]]
    with torch.no_grad():
        fp32_logits = model(ids)
    fp32 = generate(model, prompt, 20, temperature=0)
    assert model.quantize("f16", head=True) is model and is_quantized(model)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.lm_head, Fp16Linear) and model.transformer.wte.weight.dtype == torch.float32
    with torch.no_grad():
        logits = model(ids)
    assert ((logits - fp32_logits).norm() / fp32_logits.norm()) < 2e-3
    assert generate(model, prompt, 20, temperature=0) == fp32  # ragged prompts: lists of ids
    bf16 = spiky(SMALL).to(torch.bfloat16)
    with pytest.raises(ValueError, match="f16 .* is a CPU format for a float32 model"):
        bf16.quantize("f16")


@pytest.mark.slow
def test_compiled_f16_decode_runs_the_fp16_gemv_and_gives_eager_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    # In a compiled one-row CPU decode step an Fp16Linear runs inductor's fp16 GEMV (half_gemv:
    # 2 bytes per weight, fp32 math) instead of widening the weight to a float32 copy each step.
    from gpt2model import quantize

    model = spiky(SMALL).quantize("f16", head=True)
    prompt = torch.tensor([[1, 2, 3]])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="torch.compile of the decode step failed")
        assert torch.equal(generate(model, prompt, 20, temperature=0, compile=True),
                           generate(model, prompt, 20, temperature=0))
        # Routed through half_gemv: a GEMV of zeros makes every compiled step's logits 0 (token 0).
        monkeypatch.setattr(quantize, "half_gemv", lambda x, w, b=None: x.new_zeros(*x.shape[:-1], w.size(0)))
        eager = generate(model, prompt, 12, temperature=0)
        compiled = generate(model, prompt, 12, temperature=0, compile=True)
    assert eager[0, 4:].ne(0).any() and compiled[0, 4:].eq(0).all()  # token 3 comes from the prefill


def test_weight_only_int8_stays_accurate_on_outlier_channels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Why plain int8 keeps float activations: GPT-2-class models have a few feature channels far
    larger than the rest (LLM.int8()); one int8 grid per row of activations (int8-dynamic) then
    rounds the ordinary channels coarsely. With 3 channels of every LayerNorm weight at 20x, one
    decode step's logits stay within 4% of fp32 for int8, and int8-dynamic is clearly worse."""
    from gpt2model import quantize as quantize_module
    from gpt2model.generate import decode_step

    torch.manual_seed(0)
    cfg = GPTconfig(vocab_size=512, context_length=32, n_layer=2, n_head=4, d_model=128)
    base = GPT(cfg).eval()
    with torch.no_grad():
        for block in base.transformer.h:
            for ln in (block.ln_1, block.ln_2):
                ln.weight[[5, 77, 100]] = 20.0

    def step_logits(model: GPT) -> torch.Tensor:
        model.setup_cache(1, 8)
        try:
            with torch.no_grad():
                tok, pos = torch.tensor([[7]]), torch.zeros(1, 1, dtype=torch.long)
                _, logits = decode_step(model, tok, pos, torch.zeros(1, 1, 1, 8), pos, 0.0, None, None,
                                        torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
        finally:
            model.clear_cache()
        return logits[0]

    def error(mode: str) -> float:
        model = GPT(cfg)
        model.load_state_dict(base.state_dict())
        out = step_logits(model.eval().quantize(mode, head=True))
        return float((out - ref).norm() / ref.norm())

    ref = step_logits(base)
    assert error("int8") < 0.04
    if quantize_module._FBGEMM_INT8:
        assert error("int8-dynamic") > 2 * error("int8")
    monkeypatch.setattr(quantize_module, "_FBGEMM_INT8", False)
    with pytest.raises(ValueError, match="int8-dynamic .* x86 builds"):
        GPT(cfg).quantize("int8-dynamic")
