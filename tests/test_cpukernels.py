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

from gpt2model import GPTconfig, cpukernels
from gpt2model.generate import generate
from gpt2model.quantize import Int8Linear

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
def test_compiled_and_eager_int8_decode_run_the_kernel_and_match_the_fallback() -> None:
    """Every linear of a compiled one-row and batched decode step calls the kernel (one graph, no
    fallback to eager), eager steps too; the fallback (torch's kernels) gives the same greedy tokens."""
    from test_quantize import spiky

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
def test_fp32_one_row_decode_runs_the_f32_kernel_on_row_major_weights() -> None:
    """A one-row fp32 cache keeps every weight row-major for our GEMV (a cache of more rows re-lays
    them column-major for MKL); compiled and eager steps call it for every linear and give the same
    greedy tokens; a forward with autograd never does."""
    from gpt2model import GPT

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
