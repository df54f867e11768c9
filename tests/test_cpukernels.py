"""Our AVX2 decode kernel (``cpukernels.cpp``, loaded by ``gpt2model.cpukernels``): the int8
weight-only linear against a float64 reference on odd shapes, every row's bits independent of the
rows beside it, the build cache and the fallback, and that eager and compiled decode steps of an
int8 model really run it."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

from gpt2model import GPT, GPTconfig, cpukernels
from gpt2model.generate import generate
from gpt2model.quantize import Int8Linear, restore_layout

needs_kernels = pytest.mark.skipif(not cpukernels.load(),
                                   reason=f"CPU kernels off here: {cpukernels._state.get('why')}")


def kernel(x: torch.Tensor, layer: Int8Linear) -> torch.Tensor:
    return torch.ops.gpt2model_kernels.int8_linear(x, layer.weight, layer.scales, layer.bias, layer.interleaved)


def reference(x: torch.Tensor, layer: Int8Linear) -> torch.Tensor:
    """The exact product in float64 with the dequantized weight (and the bias)."""
    w = layer.int8_weight().double() * layer.scales.double()[:, None]
    y = x.double() @ w.T
    return y if layer.bias is None else y + layer.bias.double()


@needs_kernels
@pytest.mark.parametrize("in_features,out_features", [(12, 5), (100, 37), (388, 50), (384, 1153), (4100, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kernel_is_the_dequantized_product_on_odd_shapes(in_features: int, out_features: int,
                                                              dtype: torch.dtype) -> None:
    """in not a multiple of 16 / 32 / 64 (a tail loop), above 4,096 (the int32 lanes are added up
    per chunk), out not a multiple of the 4-row block, 1..16 rows, strided inputs, fp32 and bf16
    activations, with and without a bias, interleaved weights (in % 4 == 0) and plain ones."""
    torch.manual_seed(in_features + out_features)
    layer = Int8Linear.from_linear(nn.Linear(in_features, out_features, bias=in_features != 100))
    assert layer.interleaved == (in_features % 4 == 0)
    wabs = layer.dequantize().double().abs().sum(dim=1)  # sum |w| per output
    for rows in (1, 2, 3, 8, 16):
        wide = (torch.randn(rows, 2 * in_features) * torch.logspace(-2, 2, rows)[:, None]).to(dtype)
        for x in (wide[:, :in_features], wide[:, ::2]):  # a row-strided and an element-strided input
            assert rows == 1 or not x.is_contiguous()
            y = kernel(x, layer)
            assert y.dtype == dtype and y.shape == (rows, out_features)
            exact = reference(x, layer)
            # Each activation is off by at most half a step of its row's 15-bit grid (max|x| / 32767);
            # then one fp32 rounding of the sum (or bf16's, for bf16 outputs).
            step = x.double().abs().amax(dim=1, keepdim=True) / 32767
            out_ulp = (2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -23) * exact.abs()
            bound = step / 2 * wabs + out_ulp + 1e-30
            assert torch.all((y.double() - exact).abs() <= bound * 1.01), (rows, x.stride())
            assert torch.equal(layer(x), y)  # the layer takes the kernel for these rows


@needs_kernels
def test_int8_kernel_gives_each_row_the_same_bits_alone_or_in_any_batch() -> None:
    """The dot products are exact integer sums, so a row's output never depends on the rows beside
    it, their count or the threads (the engine's "same tokens alone or batched")."""
    torch.manual_seed(3)
    layer = Int8Linear.from_linear(nn.Linear(384, 203))
    x = torch.randn(16, 384) * torch.logspace(-4, 4, 16)[:, None]
    x[5] = 0.0
    together = kernel(x, layer)
    assert torch.equal(together[5], layer.bias)  # a zero row: just the bias
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for r in range(16):
                assert torch.equal(kernel(x[r:r + 1], layer)[0], together[r])
                neighbours = torch.randn(r % 7 + 1, 384) * 1e3
                assert torch.equal(kernel(torch.cat([neighbours, x[r:r + 1]]), layer)[-1], together[r])
    finally:
        torch.set_num_threads(threads)
    # A call big enough to be split between threads (>= 4 MB of weights: cpukernels.cpp's
    # SERIAL_BELOW_BYTES; smaller ones run on one thread) gives the same bits too.
    big = Int8Linear.from_weight(torch.randn(4099, 1024))
    xb = torch.randn(1, 1024)
    try:
        torch.set_num_threads(1)
        one = kernel(xb, big)
        torch.set_num_threads(2)
        assert torch.equal(kernel(xb, big), one)
    finally:
        torch.set_num_threads(threads)
    # inf or NaN in a row shows in its outputs, as in a float matmul; other rows are unaffected.
    bad = x[:3].clone()
    bad[1, 7] = float("inf")
    y = kernel(bad, layer)
    assert torch.isnan(y[1]).all() and torch.equal(y[0], together[0]) and torch.equal(y[2], together[2])


@needs_kernels
def test_int8_kernel_activation_grid_rounds_half_to_even_exactly() -> None:
    """Each activation row goes on its 15-bit grid by rounding half to even (the vectorized
    conversion and the scalar tail alike), then the integer dot product is exact: the kernel's
    output equals that computation redone here bit for bit, halfway values included."""
    torch.manual_seed(5)
    layer = Int8Linear.from_linear(nn.Linear(40, 24))  # 40 inputs: two 16-wide vector blocks and a scalar tail
    x = torch.randint(-300, 300, (1, 40)).float() + 0.5  # every value a halfway point of the grid ...
    x[0, 7] = 32767.0  # ... whose step is exactly 1 (max|x| = 32767)
    q = torch.round(x * (32767.0 / 32767.0))  # torch.round: half to even
    assert (q - x).abs().max() == 0.5 and not torch.equal(q, torch.trunc(x))
    acc = (q.long() @ layer.int8_weight().long().T).double()  # exact integer sums
    expected = (acc * 1.0 * layer.scales.double()).float() + layer.bias  # one rounding to fp32, then the bias
    assert torch.equal(kernel(x, layer), expected)


@needs_kernels
def test_compiled_and_eager_int8_decode_run_the_kernel_and_match_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every linear of a compiled one-row and batched decode step calls the kernel (one graph, no
    fallback to eager; with the whole-step op switched off, as where it does not apply), eager
    steps too; the fallback (torch's kernels) gives the same greedy tokens."""
    from test_quantize import spiky

    monkeypatch.setattr(cpukernels, "fused_step", False)

    cfg = GPTconfig(context_length=64, vocab_size=3000, n_layer=2, n_head=2, d_model=64)
    model = spiky(cfg).quantize("int8")
    linears = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == 2 * 4 + 1 and all(m.use_kernel for m in linears)
    prompt = torch.tensor([[5, 6, 7]])
    batch = torch.tensor([[5, 6, 7], [8, 9, 10], [11, 12, 13]])
    runs = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*decode step failed")
        for compile in (False, True):
            for name, ids in (("one", prompt), ("batch", batch)):
                before = cpukernels.calls()
                runs[name, compile] = generate(model, ids, 21, temperature=0, compile=compile)
                # 20 decode steps after the prefill, each calling the kernel for every linear
                # (compiling calls none: it runs on fake tensors).
                assert cpukernels.calls() - before >= 20 * len(linears), (name, compile)
    assert torch.equal(runs["one", True], runs["one", False])
    assert torch.equal(runs["batch", True], runs["batch", False])
    assert torch.equal(runs["batch", False][:1], runs["one", False])
    for m in linears:
        m.use_kernel = False
    before = cpukernels.calls()
    fallback = generate(model, prompt, 21, temperature=0)
    assert cpukernels.calls() == before and torch.equal(fallback, runs["one", False])


def test_kernels_off_by_environment_or_when_the_build_fails(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """GPT2MODEL_CPU_KERNELS=0 turns them off silently; a failed build (no compiler) warns once,
    saying why, and the int8 layers use torch's kernels."""
    code = ("import warnings; warnings.simplefilter('error'); from gpt2model import cpukernels, quantize; "
            "import torch; assert not cpukernels.load(); "
            "l = quantize.Int8Linear.from_linear(torch.nn.Linear(8, 4)); assert not l.use_kernel; print('ok')")
    env = {**os.environ, "GPT2MODEL_CPU_KERNELS": "0", "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]

    monkeypatch.setattr(cpukernels, "_state", {})
    monkeypatch.setattr(cpukernels, "_compiler", lambda: None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("GPT2MODEL_CPU_KERNELS", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cpukernels._unsupported() is None:
            assert cpukernels.load() is False and cpukernels.load() is False
            assert [str(w.message) for w in caught if "CPU decode kernels are off" in str(w.message)] == [
                "gpt2model's CPU decode kernels are off (RuntimeError: no C++ compiler found (set CXX, or install "
                "g++)); int8 decode uses torch's kernels instead, slower (set GPT2MODEL_CPU_KERNELS=0 to silence "
                "this)"]
            layer = Int8Linear.from_linear(nn.Linear(16, 8))
            assert not layer.use_kernel
            x = torch.randn(1, 16)
            assert torch.allclose(layer(x), reference(x, layer).float(), rtol=1e-2, atol=1e-2)


def test_kernel_cache_dir_follows_xdg_and_falls_back_to_a_temporary_one(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert cpukernels.cache_dir() == tmp_path / "cache" / "gpt2model" / "kernels"
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the directory should be: not creatable
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    folder = cpukernels.cache_dir()
    assert folder.is_dir() and not str(folder).startswith(str(blocker))


@needs_kernels
def test_kernel_build_is_cached_and_renamed_into_place(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The built object is found again by its key (no second compile), and a build writes a
    temporary file that it renames: no partial file is ever under the final name."""
    calls = []
    real_run = subprocess.run

    def spy(cmd, *a, **k):  # noqa: ANN001, ANN002, ANN003
        calls.append(cmd)
        return real_run(cmd, *a, **k)

    cached = cpukernels.build()
    monkeypatch.setattr(subprocess, "run", spy)
    assert cpukernels.build() == cached and calls == []
    monkeypatch.setattr(cpukernels, "SOURCE", tmp_path / "cpukernels.cpp")
    (tmp_path / "cpukernels.cpp").write_text("// an empty library\n")  # builds in well under a second
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    target = cpukernels.build()
    assert len(calls) == 1 and target.exists() and target != cached
    out = calls[0][calls[0].index("-o") + 1]
    assert out != str(target) and ".tmp" in out and not os.path.exists(out)
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


@needs_kernels
@pytest.mark.parametrize("in_features,out_features", [(12, 5), (100, 37), (384, 1153)])
def test_f32_kernel_is_the_float_product_on_odd_shapes(in_features: int, out_features: int) -> None:
    """The fp32 GEMV: in not a multiple of 8 (a tail loop), out not a multiple of the 4-row block,
    1..3 rows, a strided input, with and without a bias: the float64 product within fp32 rounding."""
    torch.manual_seed(in_features)
    lin = nn.Linear(in_features, out_features, bias=in_features != 100)
    for rows in (1, 2, 3):
        x = torch.randn(rows, 2 * in_features)[:, :in_features]
        y = torch.ops.gpt2model_kernels.f32_linear(x, lin.weight.detach(), lin.bias)
        exact = x.double() @ lin.weight.double().T + (0 if lin.bias is None else lin.bias.double())
        bound = 1e-6 * (x.double().abs() @ lin.weight.double().abs().T) + 1e-6
        assert y.dtype == torch.float32 and torch.all((y.double() - exact).abs() <= bound)
        for r in range(rows):  # a row's bits do not depend on the other rows
            assert torch.equal(torch.ops.gpt2model_kernels.f32_linear(x[r:r + 1], lin.weight.detach(), lin.bias)[0],
                               y[r])


@needs_kernels
def test_fp32_one_row_decode_runs_the_f32_kernel_on_row_major_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-row fp32 cache keeps every weight row-major for our GEMV (a cache of more rows re-lays
    them column-major for MKL); compiled (without the whole-step op) and eager steps call it for
    every linear and give the same greedy tokens; a forward with autograd never does."""
    from gpt2model import GPT

    monkeypatch.setattr(cpukernels, "fused_step", False)

    cfg = GPTconfig(context_length=64, vocab_size=20000, n_layer=2, n_head=2, d_model=32)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    prompt = torch.tensor([[5, 6, 7]])
    before = cpukernels.calls()
    eager = generate(model, prompt, 21, temperature=0)
    assert cpukernels.calls() - before >= 20 * (2 * 4 + 1)
    model.setup_cache(1, 32)
    assert model.transformer.h[0].mlp.c_fc.weight.is_contiguous() and model.lm_head.weight.is_contiguous()
    model.clear_cache()
    model.setup_cache(4, 32)
    assert not model.transformer.h[0].mlp.c_fc.weight.is_contiguous()  # column-major: MKL's GEMM at 4 rows
    model.clear_cache()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*decode step failed")
        before = cpukernels.calls()
        assert torch.equal(generate(model, prompt, 21, temperature=0, compile=True), eager)
        assert cpukernels.calls() - before >= 20 * (2 * 4 + 1)
    model.train()  # row-major everywhere again (restore_layout): a one-row no-grad call runs all 9 linears on it
    before = cpukernels.calls()
    with torch.no_grad():
        model(prompt[:, :1])
    assert cpukernels.calls() - before == 2 * 4 + 1
    model(prompt[:, :1]).sum().backward()  # autograd: torch's matmuls
    assert cpukernels.calls() - before == 2 * 4 + 1


@needs_kernels
def test_int8_kernel_integer_sums_do_not_overflow_at_the_extremes() -> None:
    """Every product at its largest (weights -128 or 127, activations at their grid's +-32767) over
    two int32 chunks and a tail: still the exact sum (an int32 overflow would be off by ~2^32)."""
    in_features = 2 * 4096 + 12
    for value in (127, -128):
        q = torch.full((5, in_features), value, dtype=torch.int8)
        layer = Int8Linear(q, torch.full((5,), 0.5))
        x = torch.ones(2, in_features)
        x[1] = -1.0
        y = kernel(x, layer)
        expected = torch.tensor([[1.0], [-1.0]]) * (value * 0.5 * in_features)
        assert torch.allclose(y, expected.expand(2, 5), rtol=1e-6, atol=0)


# --- the whole decode step as one op (gpt2model_kernels::decode_step, model.GPT._fused_decode) ---------------
def _fused_model(dtype: str, n_head: int = 4) -> GPT:
    from gpt2model import GPT

    torch.manual_seed(0)
    model = GPT(GPTconfig(context_length=32, vocab_size=300, n_layer=2, n_head=n_head, d_model=64)).eval()
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    elif dtype == "int8":
        model.quantize("int8", head=True)
    return model


def _fused(model: GPT, ids: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The op called directly (as the compiled step calls it) on the model's live cache."""
    params, interleaved, caches = model._fused_decode_params()
    return torch.ops.gpt2model_kernels.decode_step(
        ids, slots, slots, mask, model.transformer.wte.weight, model.transformer.wpe.weight, params,
        [c.k for c in caches], [c.v for c in caches], interleaved, model.config.n_head, model.config.layer_norm_eps)


@needs_kernels
@pytest.mark.parametrize("dtype", ["fp32", "int8", "bf16"])
def test_fused_decode_step_matches_the_layers_and_is_the_same_for_any_threads_or_rows(
        dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole-step op gives the eager layers' logits and KV-cache writes (ragged rows: each its
    own slot and mask; fp32 and int8 to ~1e-5, bf16 to its rounding), and the same bits at 1 and 2
    threads and for a row alone (a one-row cache holding that row's history) or beside others."""
    model = _fused_model(dtype)
    B, P, L = 3, 9, 16
    prompts = torch.randint(0, 300, (B, P + 1), generator=torch.Generator().manual_seed(1))
    lengths = [9, 5, 7]  # row b's history fills slots 0..lengths[b]-1; its new token goes to slot lengths[b]
    mask = torch.full((B, 1, 1, L), float("-inf"), dtype=model.dtype)
    for b, n in enumerate(lengths):
        mask[b, ..., :n + 1] = 0
    slots = torch.tensor(lengths).view(B, 1)
    ids = prompts[torch.arange(B), torch.tensor(lengths)].view(B, 1)
    threads = torch.get_num_threads()
    with torch.no_grad():
        model.setup_cache(B, L)
        restore_layout(model)  # fp32: row-major weights (a 3-row cache re-lays them column-major for MKL)
        try:
            model(prompts[:, :P], input_pos=torch.arange(P))  # rows' histories (row b reads its first lengths[b])
            saved = [(c.k.clone(), c.v.clone()) for c in (blk.attn.kv_cache for blk in model.transformer.h)]
            monkeypatch.setattr(cpukernels, "fused_step", False)
            ref = model(ids, input_pos=slots, mask=mask)  # the eager layers, the reference
            monkeypatch.setattr(cpukernels, "fused_step", True)
            ref_cache = [(c.k.clone(), c.v.clone()) for c in (blk.attn.kv_cache for blk in model.transformer.h)]
            outs = []
            # 1 thread; 2 threads, always both (the op's thread policy 1; 0, the default, picks by
            # measured time) and on the calling thread alone (policy 2)
            for n, policy in ((1, 0), (2, 1), (2, 2)):
                torch.set_num_threads(n)
                previous = torch.ops.gpt2model_kernels.thread_policy(policy)
                for blk, (k, v) in zip(model.transformer.h, saved, strict=True):
                    blk.attn.kv_cache.k.copy_(k)
                    blk.attn.kv_cache.v.copy_(v)
                before, split = cpukernels.calls(), torch.ops.gpt2model_kernels.thread_steps()
                try:
                    outs.append(model(ids, input_pos=slots, mask=mask))  # eager forward: the op
                finally:
                    torch.ops.gpt2model_kernels.thread_policy(previous)
                assert cpukernels.calls() - before == 1  # one op for the whole step
                # thread_steps: [steps on all threads, on one] of multi-threaded runs (benchmarks read it)
                ran = [a - b for a, b in zip(torch.ops.gpt2model_kernels.thread_steps(), split, strict=True)]
                assert ran == ([0, 0] if n == 1 else [1, 0] if policy == 1 else [0, 1]), (n, policy, ran)
            assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
            tol = 0.02 if dtype == "bf16" else 2e-5
            assert outs[0].dtype == ref.dtype and outs[0].shape == (B, 1, 300)
            torch.testing.assert_close(outs[0].float(), ref.float(), rtol=tol, atol=tol)
            for blk, (k, v) in zip(model.transformer.h, ref_cache, strict=True):
                torch.testing.assert_close(blk.attn.kv_cache.k.float(), k.float(), rtol=tol, atol=tol)
                torch.testing.assert_close(blk.attn.kv_cache.v.float(), v.float(), rtol=tol, atol=tol)
            # The first rows of a larger cache (the serving engine's running rows): the same bits.
            for blk, (k, v) in zip(model.transformer.h, saved, strict=True):
                blk.attn.kv_cache.k.copy_(k)
                blk.attn.kv_cache.v.copy_(v)
            assert torch.equal(model(ids[:2], input_pos=slots[:2], mask=mask[:2]), outs[0][:2])
        finally:
            torch.set_num_threads(threads)
            model.clear_cache()
        for b in range(B):  # each row alone in a one-row cache with its history: the same bits
            model.setup_cache(1, L)
            try:
                for blk, (k, v) in zip(model.transformer.h, saved, strict=True):
                    blk.attn.kv_cache.k.copy_(k[b:b + 1])
                    blk.attn.kv_cache.v.copy_(v[b:b + 1])
                alone = _fused(model, ids[b:b + 1], slots[b:b + 1], mask[b:b + 1])
            finally:
                model.clear_cache()
            assert torch.equal(alone[0], outs[0][b]), b


def _no_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any compilation of a decode step fail the test."""
    import gpt2model.generate as gen

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the decode step was compiled")

    monkeypatch.setattr(gen, "compiled_decode_step", refuse)


@needs_kernels
@pytest.mark.parametrize("dtype", ["fp32", "int8", pytest.param("bf16", marks=pytest.mark.slow)])
def test_decode_runs_as_one_op_per_token_and_gives_the_layers_tokens(dtype: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """generate at one row runs each decode step as ONE kernel call, eagerly even with
    compile=True (nothing is compiled), and gives the per-layer path's greedy tokens over 60
    tokens, past the context (the sliding window re-prefills), at 1 and 2 threads."""
    model = _fused_model(dtype)
    prompt = torch.tensor([[5, 6, 7, 8]])
    monkeypatch.setattr(cpukernels, "fused_step", False)
    layers = generate(model, prompt, 60, temperature=0)
    monkeypatch.setattr(cpukernels, "fused_step", True)
    _no_compile(monkeypatch)
    threads = torch.get_num_threads()
    try:
        for n, compile in ((1, False), (2, True)):
            torch.set_num_threads(n)
            before = cpukernels.calls()
            assert torch.equal(generate(model, prompt, 60, temperature=0, compile=compile), layers), (n, compile)
            steps = cpukernels.calls() - before
            # 59 decode steps minus the re-prefills of the sliding window (context 32), one call each,
            # + a prefill's kernel calls (int8: 9 linears; fp32: the head's one row); the layers
            # would make >= 9 per step.
            assert 50 <= steps < 100, steps
    finally:
        torch.set_num_threads(threads)


@needs_kernels
def test_ragged_batch_runs_as_one_op_and_each_row_gets_its_tokens_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompts of different lengths (left-padded rows) decode as one op per step with the
    per-layer path's greedy tokens, and with sampling a row gets the same tokens alone (seeded
    seed + i) as in the batch (the seed promise); a row stops at one of a list of eos ids."""
    model = _fused_model("int8")
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    monkeypatch.setattr(cpukernels, "fused_step", False)
    layers = generate(model, prompts, 40, temperature=0)
    monkeypatch.setattr(cpukernels, "fused_step", True)
    before = cpukernels.calls()
    fused = generate(model, prompts, 40, temperature=0)
    assert fused == layers
    assert 30 <= cpukernels.calls() - before < 40 + 9 * 4  # one op per decode step
    # (Within the context: past it, a padded row's window slides at other steps than alone.)
    batch = generate(model, prompts, 24, temperature=1.0, top_k=50, seed=7)
    for i, p in enumerate(prompts):
        assert generate(model, [p], 24, temperature=1.0, top_k=50, seed=7 + i)[0] == batch[i], i
    new = batch[1][len(prompts[1]):]
    eos = new[3]  # row 1 stops at its first such token (a list of eos ids, HF's form)
    stopped = generate(model, prompts, 24, temperature=1.0, top_k=50, seed=7, eot_id=[eos, 299])
    assert stopped[1] == batch[1][:len(prompts[1]) + new.index(eos) + 1]


@needs_kernels
def test_fused_decode_falls_back_where_it_does_not_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    """Autograd, training mode, the switch off, more rows than the kernel takes, a head_dim not a
    multiple of 8, int8-dynamic layers and fp32 caches of several rows (column-major weights)
    keep the layers; where it does not apply, compile=True still compiles the step."""
    model = _fused_model("fp32", n_head=8)  # head_dim 8: applies
    ids, slots, mask = torch.tensor([[3]]), torch.tensor([[0]]), torch.zeros(1, 1, 1, 1)
    assert model.fused_decode_applies(1) and not model.fused_decode_applies(3)  # fp32, 3 rows: MKL's layout
    assert not model.fused_decode_applies(cpukernels.KERNEL_MAX_ROWS + 1)
    model.setup_cache(1, 16)
    try:
        with torch.no_grad():
            assert model._fused_decode(ids, slots, mask, slots, 0) is not None
            monkeypatch.setattr(cpukernels, "fused_step", False)
            assert model._fused_decode(ids, slots, mask, slots, 0) is None and not model.fused_decode_applies(1)
            monkeypatch.setattr(cpukernels, "fused_step", True)
        assert model._fused_decode(ids, slots, mask, slots, 0) is None  # autograd on
        with torch.no_grad():
            model.train()
            assert model._fused_decode(ids, slots, mask, slots, 0) is None and not model.fused_decode_applies(1)
            model.eval()
    finally:
        model.clear_cache()
    big = _fused_model("int8")
    big.setup_cache(cpukernels.KERNEL_MAX_ROWS + 1, 16)
    try:
        with torch.no_grad():
            n = cpukernels.KERNEL_MAX_ROWS + 1
            assert big._fused_decode(ids.expand(n, 1), slots.expand(n, 1), mask, slots.expand(n, 1), 0) is None
    finally:
        big.clear_cache()
    odd = _fused_model("fp32", n_head=16)  # head_dim 4
    dyn = _fused_model("fp32")
    for blk in dyn.transformer.h:
        blk.mlp.c_fc = Int8Linear.from_linear(blk.mlp.c_fc, dynamic=True)
    for m in (odd, dyn):
        assert not m.fused_decode_applies(1)
        m.setup_cache(1, 16)
        try:
            with torch.no_grad():
                assert m._fused_decode(ids, slots, mask, slots, 0) is None
        finally:
            m.clear_cache()
    import gpt2model.generate as gen

    compiled = []
    monkeypatch.setattr(gen, "compiled_decode_step", lambda device, fn=None: compiled.append(fn) or fn)
    assert gen.step_for(odd, True, gen.generation_step, rows=1) is gen.generation_step and compiled
    compiled.clear()
    assert gen.step_for(model, True, gen.generation_step, rows=1) is gen.generation_step and not compiled


@needs_kernels
def test_argmax_kernel_is_torch_argmax_exactly() -> None:
    """The vectorized argmax (greedy decoding's) gives torch.argmax's index: the first maximum,
    ties across lanes and the tail, -inf rows, a NaN counting as the maximum (the first one)."""
    g = torch.Generator().manual_seed(0)
    for V in (1, 7, 8, 15, 16, 17, 50257, 1000):
        x = torch.randn(5, V, generator=g)
        x[1] = x[1].round()  # many ties
        x[2] = float("-inf")
        if V > 3:
            x[3, V // 2] = float("nan")
            x[3, V - 1] = float("nan")
            x[4, -1] = x[4].max() + 1  # the maximum in the tail
        got = torch.ops.gpt2model_kernels.argmax_rows(x)
        assert torch.equal(got, x.argmax(dim=-1)), V
    x = torch.zeros(2, 100)
    x[0, [3, 40, 97]] = 5.0
    x[1, [9, 10, 99]] = 5.0
    assert torch.ops.gpt2model_kernels.argmax_rows(x).tolist() == [3, 9]
    wide = torch.randn(3, 300, generator=g)[:, :257]  # rows with a stride (a vocab limit's view)
    assert torch.equal(torch.ops.gpt2model_kernels.argmax_rows(wide), wide.argmax(dim=-1))


@needs_kernels
def test_engine_decodes_with_one_op_per_step_and_compiles_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The serving engine's decode steps (compile=True asked for) run as the whole-step op, eagerly,
    and each request gets what generate gives it alone (sampled with its seed)."""
    import copy

    from gpt2model.engine import Engine, FinishEvent, SamplingParams

    model = _fused_model("int8")
    reference = copy.deepcopy(model)
    _no_compile(monkeypatch)
    eng = Engine(model, max_batch=3, compile=True)
    eng.start()
    try:
        assert eng.ready.wait(60) and not eng.compile
        before = cpukernels.calls()
        params = [SamplingParams(max_tokens=12, temperature=0), SamplingParams(max_tokens=12, seed=3, top_k=20)]
        prompts = [[3, 1, 4, 1, 5], [9, 2]]
        requests = [eng.submit(p, s) for p, s in zip(prompts, params, strict=True)]
        got = [[e.token for e in r.events() if not isinstance(e, FinishEvent)] for r in requests]
        # One op per decode step (11 to 22 steps) + the prefills' int8 linears (9 per forward); the
        # per-layer ops would make 9 calls per step (>= 99).
        assert 11 <= cpukernels.calls() - before < 60
    finally:
        eng.shutdown(timeout=5)
    for p, s, tokens in zip(prompts, params, got, strict=True):
        expected = generate(reference, [p], s.max_tokens, temperature=s.temperature, top_k=s.top_k, seed=s.seed)[0]
        assert tokens == expected[len(p):]



@needs_kernels
@pytest.mark.parametrize("dtype", ["int8", "bf16"])
def test_greedy_generation_step_as_one_op_gives_the_torch_ops_results(dtype: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A greedy generation step runs as one op (GPT.fused_greedy_step: the decode step, the argmax
    and the loop's bookkeeping) with the same tokens, step by step, as the torch ops of
    generation_step: ragged rows, a vocab limit (row 2 would repeat id 270 without it), a row that
    finishes at one of a list of eos ids and is padded with the first while the others go on,
    past the context (the sliding window re-prefills)."""
    from gpt2model.generate import stream

    model = _fused_model(dtype)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 270]]

    def run(**kwargs: object) -> list[list[int]]:
        return [t.tolist() for t in stream(model, prompts, 45, temperature=0, vocab_limit=250, **kwargs)]

    calls = []
    fused = GPT.fused_greedy_step
    monkeypatch.setattr(GPT, "fused_greedy_step", lambda self, *a: calls.append(fused(self, *a)) or calls[-1])
    free = run()
    assert len(calls) >= 40 and all(calls)  # every decode step but the window's re-prefills: one op
    monkeypatch.setattr(GPT, "fused_greedy_step", lambda self, *a: False)  # generation_step's torch ops
    reference = [run(), run(eot_id=[11, 299])]
    monkeypatch.setattr(GPT, "fused_greedy_step", fused)
    got = [run(), run(eot_id=[11, 299])]
    assert got == reference and reference[0] == free
    assert len(got[1]) == 45 and {t[0] for t in got[1]} == {11} and {t[1] for t in got[1]} != {11}
    assert max(map(max, free)) < 250 and free[0][2] != 270
