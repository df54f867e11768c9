"""The LM head's cross-entropy in one Triton kernel: each row's loss, and its logits overwritten in
place by the loss's gradient (``linear_cross_entropy``'s inner step on CUDA).

Why a kernel: at the GPT-2 training shape the logits are 16,384 x 50,304 bf16 (1.65 GB). Inductor
compiles the chunk's softmax and its gradient into two kernels (the log-sum-exp, then the
gradient), each reading the whole logits from device memory, the gradient written as a new
tensor: ~5 GB of traffic, 2.7 ms of a 33 ms step on an H200. Here one program owns one row: pass 1
reads the row once (an online max / sum of exponentials, as in Liger-Kernel's cross-entropy),
pass 2 reads it again while it is still in L2 and overwrites it with ``exp(x - lse) - onehot``:
one read and one write of the logits from device memory, and no second buffer.

The math is ``linear_cross_entropy``'s torch path, in fp32 whatever the logits' dtype: row loss
``lse - x[target]``, gradient left unnormalised (entries in [-1, 1], the mean's 1/count applied
later in fp32), zero on rows whose target is ``ignore_index`` and on the padded columns.

Importing this module needs Triton (CUDA builds of torch ship it); ``model.py`` falls back to its
torch ops without it. Triton has no CPU backend: with ``TRITON_INTERPRET=1`` set before triton is
first imported, its interpreter runs the same kernel on CPU tensors (numpy, one program after
another: slow, but the same code), which is how the tests check it on machines without a GPU
(tests/conftest.py sets it there). ``model.LOSS_KERNEL = "auto"`` never picks the kernel on CPU.
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

# Columns per loop iteration and warps per program (one program per row). At 50,304 bf16 columns
# 4096 columns take 13 iterations per pass (16 per thread at 8 warps, two 16-byte loads each).
# Compiled for sm_90 it uses 48 registers, no spills: five rows in flight per SM. Measured on an
# H200 (torch 2.11, 16,384 x 50,304 bf16, the whole loss pass): 4096/8 1.28 ms (2.57 TB/s of
# logits read + written once), 8192/16 1.45, 8192/32 1.48, 16384/32 1.81, 32768/32 2.03;
# inductor's two kernels 2.58 ms. Module settings (read when the op runs or is traced) so a
# benchmark can try others (bench/gpu.py --only loss).
BLOCK = 4096
NUM_WARPS = 8


@triton.jit
def _cross_entropy_rows_kernel(logits_ptr, row_stride, targets_ptr, target_stride, losses_ptr, n_cols, n_padded,
                               ignore_index, GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_ptr = logits_ptr + row * row_stride
    target = tl.load(targets_ptr + row * target_stride)
    cols = tl.arange(0, BLOCK)
    if target == ignore_index:  # counts for nothing: zero loss, zero gradient
        tl.store(losses_ptr + row, 0.0)
        if GRAD:
            for start in range(0, n_padded, BLOCK):
                c = start + cols
                tl.store(x_ptr + c, tl.zeros([BLOCK], dtype=x_ptr.dtype.element_ty), mask=c < n_padded)
        return
    # Pass 1: max and sum of exp(x - max) over the real columns, fp32. The running max is a scalar
    # (one block-wide reduction per iteration); the sums stay per lane, rescaled when the max grows,
    # and are added up once at the end. Loads are masked by the padded width (a multiple of 64 on
    # CUDA, which Triton sees divisible by 16, so they stay vectorised) and the padded columns
    # dropped by value. evict_last: keep the row in L2 for pass 2.
    m = tl.full([], float("-inf"), tl.float32)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_padded, BLOCK):
        c = start + cols
        x = tl.load(x_ptr + c, mask=c < n_padded, other=float("-inf"), eviction_policy="evict_last")
        x = tl.where(c < n_cols, x.to(tl.float32), float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        acc = acc * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    lse = m + tl.log(tl.sum(acc, axis=0))
    # An out-of-range target reads nothing (its row gets no -1); the model checks ids elsewhere.
    in_range = (target >= 0) & (target < n_cols)
    picked = tl.load(x_ptr + target, mask=in_range, other=0.0).to(tl.float32)
    tl.store(losses_ptr + row, lse - picked)
    if GRAD:
        # Pass 2: the row (mostly still in L2) becomes softmax - onehot, zero past the real columns.
        for start in range(0, n_padded, BLOCK):
            c = start + cols
            mask = c < n_padded
            x = tl.load(x_ptr + c, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
            g = tl.where(c < n_cols, tl.exp(x - lse) - tl.where(c == target, 1.0, 0.0), 0.0)
            tl.store(x_ptr + c, g.to(x_ptr.dtype.element_ty), mask=mask)


# Whether @triton.jit made interpreter functions (TRITON_INTERPRET=1): then the kernel takes CPU tensors.
INTERPRETED = not isinstance(_cross_entropy_rows_kernel, triton.runtime.jit.JITFunction)


# (No ``from __future__ import annotations`` here: torch.library reads the op's schema from the real
# annotation objects.)
@triton_op("gpt2model::cross_entropy_rows_", mutates_args={"logits"})
def cross_entropy_rows_(logits: torch.Tensor, targets: torch.Tensor, n_real: int, ignore_index: int,
                        grad: bool) -> torch.Tensor:
    """Per-row fp32 losses of ``logits`` (N, Vp) against ``targets`` (N,) over the first ``n_real``
    columns (the rest are padding), 0 where the target is ``ignore_index``; with ``grad`` the
    logits are overwritten by the unnormalised gradient of the summed loss (``softmax - onehot``,
    zero on ignored rows and padded columns), in their own dtype.

    A ``torch.library`` op (the mutation declared), so ``torch.compile`` traces through it with
    ``fullgraph=True`` and inductor launches the kernel itself.
    """
    n_rows, n_padded = logits.shape
    if logits.stride(1) != 1 or targets.shape != (n_rows,):
        raise ValueError(f"need logits (N, V) with contiguous rows and targets (N,), got {tuple(logits.shape)} "
                         f"(strides {logits.stride()}) and {tuple(targets.shape)}")
    losses = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows:
        if logits.device.type == "cpu" and not INTERPRETED:
            raise RuntimeError("Triton kernels run on CPU tensors only in Triton's interpreter: set "
                               "TRITON_INTERPRET=1 before the first import of triton, or use CUDA tensors")
        wrap_triton(_cross_entropy_rows_kernel)[(n_rows,)](
            logits, logits.stride(0), targets, targets.stride(0), losses, n_real, n_padded, ignore_index,
            GRAD=grad, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return losses

