"""The fused Triton cross-entropy kernel (``losskernel.py``, ``model.LOSS_KERNEL``): the same loss
and gradients as the torch ops it replaces.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported); without Triton (CI, CPU-only installs) these tests
skip: the model then uses the torch ops, which tests/test_loss.py checks. The CUDA tests compare
the compiled kernel with the torch path on the GPU, under ``torch.compile(fullgraph=True)`` too.

One interpreter quirk: it converts fp32 to bf16 by truncation where the GPU rounds to nearest even
(LLVM's fptrunc), so on CPU a bf16 gradient entry may sit one bf16 step from the reference; the
tolerances allow that, and the CUDA test checks the rounding itself.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import gpt2model.model as model_module
from gpt2model import GPT, GPTconfig
from gpt2model.model import linear_cross_entropy

losskernel = model_module.losskernel
cuda = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(losskernel is None, reason="needs Triton (pip install triton; CUDA builds of "
                                "torch ship it): without it the loss uses the torch ops (tests/test_loss.py)")
needs_kernel_here = pytest.mark.skipif(
    losskernel is not None and not cuda and not losskernel.INTERPRETED,
    reason="no GPU and Triton's interpreter is off (TRITON_INTERPRET=1 must be set before triton's first import)")
needs_cuda = pytest.mark.skipif(not cuda, reason="needs a CUDA device (the compiled Triton kernel)")
DEVICE = "cuda" if cuda else "cpu"


def _reference(logits: torch.Tensor, targets: torch.Tensor, n_real: int,
               ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Row losses and the unnormalised fp32 gradient (softmax - onehot, zero on ignored rows and
    padded columns), as ``_chunked_loss``'s torch ops compute them."""
    real = logits.float()[:, :n_real]
    lse = torch.logsumexp(real, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    losses = torch.where(valid, lse - real.gather(1, safe[:, None]).squeeze(1), 0.0)
    grad = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    grad[:, :n_real] = (real - lse[:, None]).exp()
    grad.scatter_add_(1, safe[:, None], torch.full_like(grad[:, :1], -1.0))
    return losses, grad * valid[:, None]


def _grad_tolerance(dtype: torch.dtype) -> dict[str, float]:
    # Entries in [-1, 1] rounded once to the logits' dtype: one step of that dtype, relative.
    return {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2**-7, atol=1e-6),
            torch.float16: dict(rtol=2**-10, atol=1e-7)}[dtype]


def _logits(rows: int, n_padded: int, n_real: int, dtype: torch.dtype, device: str = DEVICE) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, n_padded, generator=g) * 4
    logits[1, n_real - 1] = 40.0  # a row whose max comes in its last block (the running sum is rescaled)
    logits[2, 0] = 40.0  # and one whose max comes first
    logits[:, n_real:] = 1e4  # padded columns: ignored however large (the head's zero rows give 0 there)
    return logits.to(device=device, dtype=dtype)


@needs_kernel_here
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("rows", "n_padded", "n_real", "block"), [
    (37, 128, 65, 32),    # padded vocabulary, 4 blocks per pass, the last real block holds one column
    (19, 100, 100, 32),   # no padding, a partial last block
    (5, 300, 257, 4096),  # the default block: one iteration, mostly masked
])
def test_kernel_matches_the_torch_ops(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, rows: int,
                                      n_padded: int, n_real: int, block: int) -> None:
    monkeypatch.setattr(losskernel, "BLOCK", block)
    logits = _logits(rows, n_padded, n_real, dtype)
    targets = torch.randint(0, n_real, (rows,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    targets[::4] = -100  # ignored rows: zero loss, zero gradient
    targets[1] = n_real - 1
    losses_ref, grad_ref = _reference(logits, targets, n_real)

    untouched = logits.clone()
    losses = losskernel.cross_entropy_rows_(untouched, targets, n_real, -100, False)
    assert torch.equal(untouched, logits)  # no gradient asked: the logits stay as they were
    assert losses.dtype == torch.float32
    torch.testing.assert_close(losses, losses_ref, rtol=1e-6, atol=1e-5)

    losses = losskernel.cross_entropy_rows_(logits, targets, n_real, -100, True)
    torch.testing.assert_close(losses, losses_ref, rtol=1e-6, atol=1e-5)
    assert logits.dtype == dtype  # overwritten in place, in its own dtype
    torch.testing.assert_close(logits.float(), grad_ref, **_grad_tolerance(dtype))
    assert not logits[::4].any() and not logits[:, n_real:].any()  # exact zeros there


@needs_kernel_here
def test_kernel_honours_a_custom_ignore_index_and_strided_targets_and_rejects_strided_rows() -> None:
    logits = _logits(6, 64, 50, torch.float32)
    targets = torch.tensor([3, 1, 7, 1, 7, 1, 0, 1, 49, 1, 7, 1], device=DEVICE)[::2]  # a view with stride 2
    losses_ref, grad_ref = _reference(logits, targets, 50, ignore_index=7)
    losses = losskernel.cross_entropy_rows_(logits, targets, 50, 7, True)
    torch.testing.assert_close(losses, losses_ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(logits, grad_ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="contiguous rows"):
        losskernel.cross_entropy_rows_(logits.t(), targets, 50, 7, True)


def _loss_and_grads(kernel: str, x: torch.Tensor, w: torch.Tensor, t: torch.Tensor, fn: Any,
                    monkeypatch: pytest.MonkeyPatch) -> tuple[torch.Tensor, ...]:
    monkeypatch.setattr(model_module, "LOSS_KERNEL", kernel)
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(x, w, t)
    (3.0 * loss).backward()
    return loss.detach(), x.grad, w.grad


@needs_kernel_here
@pytest.mark.parametrize("autocast", [False, True])
def test_linear_cross_entropy_with_the_kernel_equals_the_torch_ops(monkeypatch: pytest.MonkeyPatch,
                                                                   autocast: bool) -> None:
    """Several chunks, a padded vocabulary, ignored rows; fp32 and bf16 autocast; loss and gradients,
    and the gradient-free (evaluation) loop."""
    monkeypatch.setattr(losskernel, "BLOCK", 64)
    torch.manual_seed(0)
    x, w = torch.randn(45, 24, device=DEVICE), torch.randn(77, 24, device=DEVICE) * 0.5
    t = torch.randint(0, 77, (45,), device=DEVICE)
    t[::5] = -100

    def fn(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            return linear_cross_entropy(a, b, c, chunk_bytes=10 * 128 * 4, pad_multiple=64)  # 10-row chunks

    loss, gx, gw = _loss_and_grads("torch", x, w, t, fn, monkeypatch)
    loss_k, gx_k, gw_k = _loss_and_grads("triton", x, w, t, fn, monkeypatch)
    assert loss_k.dtype == gx_k.dtype == gw_k.dtype == torch.float32
    torch.testing.assert_close(loss_k, loss, rtol=1e-6, atol=1e-6)
    # fp32: the same math, summed in another order; bf16: a gradient entry may differ by one bf16 step.
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gx_k, gx, **tol)
    torch.testing.assert_close(gw_k, gw, **tol)
    with torch.no_grad():
        torch.testing.assert_close(fn(x, w, t), loss, rtol=1e-6, atol=1e-6)


@needs_kernel_here
def test_model_training_loss_with_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """``model(ids, targets=...)``: every parameter's gradient the same with either loss kernel."""
    torch.manual_seed(0)
    model = GPT(GPTconfig(context_length=16, vocab_size=50, n_layer=1, n_head=2, d_model=32)).to(DEVICE)
    x, y = torch.randint(0, 50, (2, 16), device=DEVICE), torch.randint(0, 50, (2, 16), device=DEVICE)
    y[0, :5] = -100
    results = {}
    for kernel in ("torch", "triton"):
        monkeypatch.setattr(model_module, "LOSS_KERNEL", kernel)
        model.zero_grad()
        loss = model(x, targets=y)
        loss.backward()
        results[kernel] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-6, atol=1e-6)
    for name, grad in results["torch"][1].items():
        torch.testing.assert_close(results["triton"][1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


# --- on a GPU: the compiled kernel, at the GPT-2 vocabulary -------------------------------------------
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_at_the_gpt2_vocabulary(dtype: torch.dtype) -> None:
    """50,257 ids padded to 50,304, the default block; the bf16 gradient rounded to nearest."""
    logits = _logits(256, 50304, 50257, dtype)
    targets = torch.randint(0, 50257, (256,), device="cuda")
    targets[::7] = -100
    losses_ref, grad_ref = _reference(logits, targets, 50257)
    losses = losskernel.cross_entropy_rows_(logits, targets, 50257, -100, True)
    torch.testing.assert_close(losses, losses_ref, rtol=1e-6, atol=1e-5)
    tol = dict(rtol=2**-8, atol=1e-6) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.float(), grad_ref, **tol)  # fp32, or half a bf16 step...
    if dtype == torch.bfloat16:  # ...exactly: nearly every entry is the reference rounded to nearest
        assert (logits != grad_ref.to(dtype)).float().mean().item() < 1e-3


ROWS, T = 16, 512  # 8,192 positions: bf16 logits of 824 MB, far larger than anything else in the step


def _cuda_model_grads(kernel: str, compiled: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, ...]:
    monkeypatch.setattr(model_module, "LOSS_KERNEL", kernel)
    torch.manual_seed(0)
    model = GPT(GPTconfig(context_length=T, vocab_size=50257, n_layer=2, n_head=4, d_model=128)).cuda()
    model.check_inputs = False  # the trainer's setting: the id range check is a host sync (a graph break)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 50257, (ROWS, T), generator=g).cuda()
    y = torch.randint(0, 50257, (ROWS, T), generator=g).cuda()
    y[0, :30] = -100
    torch._dynamo.reset()
    net = torch.compile(model, fullgraph=True) if compiled else model
    for _ in range(2):  # the second call is measured (the first compiles, and inductor's tuning allocates)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = net(x, targets=y)
        loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, peak


@needs_cuda
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_model_step_with_the_kernel_equals_the_torch_ops(monkeypatch: pytest.MonkeyPatch, compiled: bool) -> None:
    """The training step's loss and every gradient, eager and under torch.compile(fullgraph=True),
    and the kernel's write stays in place: one (N, 50,304) bf16 buffer at a time, never a copy."""
    loss, grads, peak = _cuda_model_grads("torch", compiled, monkeypatch)
    loss_k, grads_k, peak_k = _cuda_model_grads("triton", compiled, monkeypatch)
    torch.testing.assert_close(loss_k, loss, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_k[name], grad, rtol=2e-2, atol=1e-4, msg=name)
    logits_bytes = ROWS * T * 50304 * 2
    assert peak_k < 1.5 * logits_bytes, (peak_k / 2**20, peak / 2**20, logits_bytes / 2**20)
    assert peak_k <= peak + 2**20, (peak_k / 2**20, peak / 2**20)
