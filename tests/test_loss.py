"""The training loss path: ``linear_cross_entropy`` (chunked LM head + cross-entropy, padded vocab)
must equal the plain ``next_token_loss(x @ W.T)`` in value and gradients, and use less memory."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

import gpt2model.model as model_module
from gpt2model import GPT, GPTconfig
from gpt2model.model import linear_cross_entropy, next_token_loss


def _plain(x: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return next_token_loss((x @ w.t())[None], t[None])


def _grads(loss_fn: Any, x: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = loss_fn(x, w, t)
    (3.0 * loss).backward()  # a non-unit incoming gradient: backward must scale by it
    return loss.detach(), x.grad, w.grad


@pytest.mark.parametrize(("rows", "vocab", "chunk_bytes", "pad"), [
    (37, 65, 1, 64),          # one row per chunk, 65 ids padded to 128
    (100, 50, 30 * 64 * 4, 64),  # chunks of 30 rows: the last one is shorter
    (64, 128, 2**30, 64),     # one chunk; a vocabulary already a multiple of 64 (no padding)
    (53, 77, 10 * 77 * 4, 1),   # no padding at all
])
def test_chunked_loss_and_gradients_equal_the_plain_path(rows: int, vocab: int, chunk_bytes: int, pad: int) -> None:
    torch.manual_seed(0)
    x, w = torch.randn(rows, 24), torch.randn(vocab, 24)
    t = torch.randint(0, vocab, (rows,))
    t[::4] = -100  # ignored positions count neither in the mean nor in the gradients
    loss, gx, gw = _grads(_plain, x, w, t)
    loss_c, gx_c, gw_c = _grads(lambda a, b, c: linear_cross_entropy(a, b, c, chunk_bytes=chunk_bytes,
                                                                        pad_multiple=pad), x, w, t)
    torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx_c, gx, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw_c, gw, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # evaluation takes the gradient-free loop
        torch.testing.assert_close(linear_cross_entropy(x, w, t, chunk_bytes=chunk_bytes, pad_multiple=pad),
                                   loss, rtol=1e-6, atol=1e-6)


def test_compiled_chunked_loss_equals_the_plain_path() -> None:
    """Under torch.compile the one-hot is a comparison instead of a scatter (so inductor fuses the
    softmax gradient into one pass) and chunks are sized by the compute dtype: same loss and
    gradients, several chunks and a padded vocabulary included."""
    torch.manual_seed(0)
    x, w = torch.randn(37, 24), torch.randn(65, 24)
    t = torch.randint(0, 65, (37,))
    t[::4] = -100
    loss, gx, gw = _grads(_plain, x, w, t)
    compiled = torch.compile(lambda a, b, c: linear_cross_entropy(a, b, c, chunk_bytes=10 * 128 * 4, pad_multiple=64))
    loss_c, gx_c, gw_c = _grads(compiled, x, w, t)
    torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx_c, gx, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw_c, gw, rtol=1e-5, atol=1e-7)


def test_chunked_loss_under_bf16_autocast_matches_plain_autocast() -> None:
    torch.manual_seed(0)
    x, w, t = torch.randn(96, 32), torch.randn(70, 32) * 0.2, torch.randint(0, 70, (96,))

    def autocast(fn: Any) -> Any:
        def run(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(a, b, c)
        return run

    loss, gx, gw = _grads(autocast(_plain), x, w, t)
    loss_c, gx_c, gw_c = _grads(autocast(lambda a, b, c: linear_cross_entropy(a, b, c, chunk_bytes=40 * 128 * 4)),
                                x, w, t)
    assert loss_c.dtype == torch.float32 and gx_c.dtype == gw_c.dtype == torch.float32
    torch.testing.assert_close(loss_c, loss, rtol=1e-3, atol=1e-3)
    # bf16 matmuls: both paths round the same products, the chunked one sums the weight gradient in fp32.
    torch.testing.assert_close(gx_c, gx, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(gw_c, gw, rtol=2e-2, atol=2e-3)


def test_model_training_loss_equals_loss_of_its_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    """``model(ids, targets=...)`` (the trainer's call) = cross-entropy of ``model(ids)``, with every
    parameter's gradient equal, the tied embedding/head included, over several chunks."""
    monkeypatch.setattr(model_module, "LOSS_CHUNK_BYTES", 7 * 50 * 4)  # chunks of 7 rows of 50 fp32 logits
    torch.manual_seed(0)
    config = GPTconfig(context_length=16, vocab_size=50, n_layer=2, n_head=2, d_model=32)
    model = GPT(config)
    x = torch.randint(0, 50, (3, 16))
    y = torch.randint(0, 50, (3, 16))
    y[0, :5] = -100
    plain = next_token_loss(model(x), y)
    plain.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = model(x, targets=y)
    loss.backward()
    torch.testing.assert_close(loss, plain, rtol=1e-6, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    assert model(x).shape == (3, 16, 50)  # the logits a user sees keep the real vocabulary
    assert model.transformer.wte.weight.shape == (50, 32)  # and so do the parameters (saved files)
    # GPT.loss is the same function; a custom ignore_index is honoured.
    y2 = y.masked_fill(y == -100, 7)
    y2[1, 3] = 7
    torch.testing.assert_close(model.loss(x, y2, ignore_index=7),
                               next_token_loss(model(x), y2.masked_fill(y2 == 7, -100)), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="targets must have the shape"):
        model(x, targets=y[:, :3])


def _peak_growth_mib(fn: Any) -> float:
    """How far this process's peak RSS rises above its current RSS while ``fn`` runs (Linux: writing
    5 to /proc/self/clear_refs resets the peak, VmHWM)."""
    def status(key: str) -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS:")
    fn()
    return status("VmHWM:") - before


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_chunked_loss_never_holds_the_full_logits() -> None:
    """Peak memory of forward + backward over 2048 x 8192 logits (64 MiB in fp32): the plain path
    holds full copies (logits, log-softmax, their gradient), the chunked one 4 MiB chunks.
    (Tensors this large are mmap-ed by the allocator, so a full copy always shows in the RSS.)"""
    torch.manual_seed(0)
    x = torch.randn(2048, 32, requires_grad=True)
    w = torch.randn(8192, 32, requires_grad=True)
    t = torch.randint(0, 8192, (2048,))
    plain = _peak_growth_mib(lambda: _plain(x, w, t).backward())
    chunked = _peak_growth_mib(lambda: linear_cross_entropy(x, w, t, chunk_bytes=4 * 2**20).backward())
    # At least two full fp32 copies of the logits (how many more are live at once depends on when the
    # allocator returns freed ones: 2-3 measured).
    assert plain > 1.5 * 64, (plain, chunked)
    assert chunked < 48, (plain, chunked)  # less than one


def test_a_swapped_in_head_computes_its_own_logits() -> None:
    """A head that is not a plain nn.Linear (a quantized one, say) is called as a module, not
    bypassed through its ``.weight``."""

    class HalvedHead(torch.nn.Module):
        def __init__(self, linear: torch.nn.Linear) -> None:
            super().__init__()
            self.linear = linear

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x) * 0.5

    torch.manual_seed(0)
    model = GPT(GPTconfig(context_length=8, vocab_size=40, n_layer=1, n_head=2, d_model=16)).eval()
    model.lm_head = HalvedHead(model.lm_head)
    x, y = torch.randint(0, 40, (2, 8)), torch.randint(0, 40, (2, 8))
    torch.testing.assert_close(model(x, targets=y), next_token_loss(model(x), y))


def test_loss_kernel_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """``model.LOSS_KERNEL``: "auto" takes the Triton kernel on CUDA only, and only where Triton is
    installed; asking for it without Triton, or for an unknown kernel, is a clear error."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(model_module, "losskernel", object())  # as where Triton is installed
    assert model_module._use_loss_kernel(cuda) and not model_module._use_loss_kernel(cpu)
    monkeypatch.setattr(model_module, "losskernel", None)  # no Triton
    assert not model_module._use_loss_kernel(cuda)
    x, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    monkeypatch.setattr(model_module, "LOSS_KERNEL", "triton")
    with pytest.raises(RuntimeError, match=r"needs Triton \(pip install triton\)"):
        linear_cross_entropy(x, w, t)
    monkeypatch.setattr(model_module, "LOSS_KERNEL", "torch")
    torch.testing.assert_close(linear_cross_entropy(x, w, t), _plain(x, w, t))
    monkeypatch.setattr(model_module, "LOSS_KERNEL", "fast")
    with pytest.raises(ValueError, match="LOSS_KERNEL must be 'auto', 'triton' or 'torch', got 'fast'"):
        linear_cross_entropy(x, w, t)


@pytest.mark.parametrize(("triton_init", "warning"), [
    ("raise ImportError('no triton here')", None),  # CPU-only installs: silently the torch ops
    ("raise RuntimeError('0 active drivers')", "the fused loss kernel could not be loaded (RuntimeError: 0 active "
                                                "drivers); the training loss runs as torch ops"),
])
def test_model_loads_without_a_working_triton(tmp_path: Any, triton_init: str, warning: str | None) -> None:
    """A missing Triton leaves the torch ops; a broken one too, with a warning, rather than making
    ``import gpt2model`` fail (a fresh process: the module imports the kernel when it loads)."""
    import subprocess
    import sys

    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text(triton_init + "\n")
    code = ("import warnings; warnings.simplefilter('always')\n"
            "import gpt2model.model as m\n"
            "assert m.losskernel is None and not m._use_loss_kernel(__import__('torch').device('cuda'))\n")
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), src])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    if warning is None:
        assert "fused loss kernel" not in proc.stderr
    else:
        assert warning in proc.stderr


def _stream_dtypes(model: GPT, x: torch.Tensor, **autocast: Any) -> set[torch.dtype]:
    """The dtypes of the residual stream entering each block and the final LayerNorm."""
    seen: set[torch.dtype] = set()
    modules = [*model.transformer.h, model.transformer.ln_f]
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.add(args[0].dtype)) for m in modules]
    try:
        with torch.autocast("cpu", **autocast) if autocast else torch.autocast("cpu", enabled=False):
            model(x, targets=x).backward()
    finally:
        for h in hooks:
            h.remove()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())  # weights and grads stay fp32
    return seen


def test_bf16_residual_keeps_the_stream_in_bf16_under_bf16_autocast_only() -> None:
    torch.manual_seed(0)
    model = GPT(GPTconfig(context_length=16, vocab_size=50, n_layer=2, n_head=2, d_model=32))
    x = torch.randint(0, 50, (2, 16))
    assert _stream_dtypes(model, x, dtype=torch.bfloat16) == {torch.float32}  # the default: as nanoGPT
    model.bf16_residual = True
    assert _stream_dtypes(model, x, dtype=torch.bfloat16) == {torch.bfloat16}
    assert _stream_dtypes(model, x, dtype=torch.float16) == {torch.float32}  # fp16's range is too small
    assert _stream_dtypes(model, x) == {torch.float32}  # no autocast: the weights' dtype


def test_bf16_residual_stream_trains_to_the_same_loss() -> None:
    """The bf16 residual stream changes rounding, not what the model learns: the same 60 AdamW steps
    under bf16 autocast, with and without it, end at the same loss (and far below the start)."""
    torch.manual_seed(0)
    # A learnable stream: each sequence counts up from a random start, modulo the vocabulary.
    data = (torch.randint(0, 64, (32, 1)) + torch.arange(33)) % 64

    def train(bf16_residual: bool) -> tuple[float, float]:
        torch.manual_seed(1)
        model = GPT(GPTconfig(context_length=32, vocab_size=64, n_layer=2, n_head=2, d_model=32))
        model.bf16_residual = bf16_residual
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for step in range(60):
            batch = data[(step * 8) % 32:(step * 8) % 32 + 8]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(batch[:, :-1], targets=batch[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses[0], sum(losses[-10:]) / 10

    start, end_bf16 = train(True)
    _, end_fp32 = train(False)
    assert end_bf16 < start / 4 and end_fp32 < start / 4
    assert abs(end_bf16 - end_fp32) < 0.05 * max(end_fp32, 0.05), (end_bf16, end_fp32)
