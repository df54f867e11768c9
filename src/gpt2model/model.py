"""GPT-2: causal self-attention, MLP, pre-norm block and the full language model.

Reads top to bottom like the paper: attention, MLP, block, GPT. Parameter names follow HF
transformers' ``GPT2LMHeadModel`` (``transformer.h.0.attn.c_attn`` ...) so weights map one to one;
the only difference is that we use ``nn.Linear`` where HF uses its transposed ``Conv1D``
(``hf.py`` is the one place that knows about that).

The KV cache lives here too because attention reads and writes it. Generation (``generate.py``)
drives it: ``setup_cache`` once, then a prefill forward over the prompt and one-token decode
forwards, each told which cache slots (``input_pos``) it writes.

Imports flow one way: ``model.py`` imports only ``config.py`` (and ``losskernel.py``, the training
loss's Triton kernel, where Triton is installed); ``checkpoint.py`` and
``generate.py`` import ``model.py``. The conveniences ``GPT.from_pretrained``/``save_pretrained``
(``checkpoint.py``) and ``GPT.generate``/``stream`` (``generate.py``) forward to those modules,
importing them when called, so the user-facing API lives on the model while the code lives where
it belongs and no import cycle exists at module load.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from torch.nn import functional as F

from . import cpukernels
from .config import GPTconfig

try:  # the fused cross-entropy kernel needs Triton (CUDA builds of torch ship it)
    from . import losskernel
except ImportError:  # CPU-only installs: the loss runs as torch ops
    losskernel = None
except Exception as e:  # a Triton that fails to load must not take the model down with it
    warnings.warn(f"the fused loss kernel could not be loaded ({type(e).__name__}: {e}); the training loss "
                  f"runs as torch ops (check that triton matches this torch)", stacklevel=1)
    losskernel = None

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence


def check_token_ids(ids: Any, vocab_size: int, *, ndim: int = 2, check_range: bool = True,
                    name: str = "input_ids") -> None:
    """The one check of token ids (the model's forward, generation, evaluation): a tensor of
    integers with ``ndim`` dimensions (2: ``(batch, seq_len)``; 1: one sequence), not empty, every
    id in ``[0, vocab_size)``. ``check_range=False`` skips the range check, which costs a
    device-to-host sync (callers that checked the ids once turn it off per step)."""
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids (torch.long), got dtype {ids.dtype}; "
                         f"convert with {name}.long()")
    if ids.dim() != ndim:
        if ndim == 2:
            hint = " (for one sequence use input_ids[None])" if ids.dim() == 1 else ""
            raise ValueError(f"{name} must have shape (batch, seq_len), got shape {tuple(ids.shape)}{hint}")
        raise ValueError(f"{name} must be one {ndim}-D sequence of token ids, got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError(f"{name} has no tokens (empty prompt): give at least one (e.g. the tokenizer's "
                         f"end-of-text id)")
    if check_range:
        lo, hi = (int(t) for t in torch.aminmax(ids))
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} is out of range: ids must be in [0, {vocab_size}) "
                             f"for this model's vocab_size {vocab_size}; were they encoded with this model's "
                             f"tokenizer?")


class KVCache(nn.Module):
    """Preallocated keys and values of one attention layer: ``(batch, n_head, max_len, head_dim)``.

    Static shapes (gpt-fast's design) mean decode never reallocates and can be compiled.
    """

    def __init__(self, batch_size: int, n_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        shape = (batch_size, n_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("rows", torch.arange(batch_size, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               cache_row: int | torch.Tensor = 0, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v`` (B, H, T, hd) into cache rows ``cache_row .. cache_row + B - 1`` (or, for a
        ``(B,)`` tensor ``cache_row``, rows ``cache_row[b]``: e.g. several requests prefilled into
        scattered free rows at once) at slots ``input_pos``: ``(T,)`` (the same slots for every row)
        or ``(B, T)`` (each row its own slots, e.g. rows at different lengths); return those rows'
        first ``length`` slots (default: all; views for an int ``cache_row``, a copy otherwise)."""
        kc, vc = self.k, self.v
        B = k.size(0)
        k, v = k.to(kc.dtype), v.to(vc.dtype)
        L = kc.size(2) if length is None else length
        if isinstance(cache_row, torch.Tensor):
            rows = cache_row.view(B, 1)
            pos = input_pos.expand(B, -1) if input_pos.dim() == 1 else input_pos
            kc.transpose(1, 2).index_put_((rows, pos), k.transpose(1, 2))
            vc.transpose(1, 2).index_put_((rows, pos), v.transpose(1, 2))
            return kc[:, :, :L][cache_row], vc[:, :, :L][cache_row]  # only the slots the mask covers
        if cache_row or kc.size(0) != B:
            kc, vc = kc[cache_row:cache_row + B], vc[cache_row:cache_row + B]  # views: writes land in the cache
        if input_pos.dim() == 1:
            kc.index_copy_(2, input_pos, k)
            vc.index_copy_(2, input_pos, v)
        else:  # row b writes slots input_pos[b]: index (row, slot) of the (B, L, H, hd) view
            rows = self.rows[:B, None]
            kc.transpose(1, 2).index_put_((rows, input_pos), k.transpose(1, 2))
            vc.transpose(1, 2).index_put_((rows, input_pos), v.transpose(1, 2))
        return kc[:, :, :L], vc[:, :, :L]


@dataclass
class Part:
    """One batch of a packed forward (``GPT.forward(..., parts=...)``): ``rows x length`` tokens,
    written at cache slots ``input_pos`` ``(rows, length)`` of cache rows ``cache_row`` (an int:
    the first of adjacent rows; a ``(rows,)`` tensor: scattered rows) and attending as ``mask``
    ``(rows, 1, length, L)`` says (the arguments of a cached forward of that batch alone)."""

    rows: int
    length: int
    input_pos: torch.Tensor
    mask: torch.Tensor
    cache_row: int | torch.Tensor = 0


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for the model's linear layers; inside a compiled CPU decode step of one row, a
    half-precision ``nn.Linear`` runs as the GEMV inductor generates from
    :func:`gpt2model.quantize.half_gemv` (fp32 arithmetic, 2 bytes read per weight) instead of
    PyTorch's bf16 kernel, which is slower than fp32 on CPUs without native bf16 arithmetic; an fp32
    one on one row without autograd, stored row-major, runs our AVX2 GEMV
    (:mod:`gpt2model.cpukernels`, where it is built; see ``quantize.decode_layout_is_column_major``)."""
    if x.device.type == "cpu" and type(layer) is nn.Linear and x.numel() == x.size(-1):
        if torch.compiler.is_compiling() and layer.weight.dtype in (torch.bfloat16, torch.float16):
            from .quantize import half_gemv

            return half_gemv(x, layer.weight, layer.bias)
        if layer.weight.dtype == torch.float32 and x.dtype == torch.float32 and layer.weight.is_contiguous() \
                and not torch.is_grad_enabled() and cpukernels.enabled():
            # One row, no autograd, a row-major fp32 weight (quantize.prepare_decode keeps the
            # blocks' weights so for one-row caches): our fp32 GEMV, eagerly and compiled (an op).
            y = torch.ops.gpt2model_kernels.f32_linear(x.reshape(1, x.size(-1)), layer.weight, layer.bias)
            return y.view(*x.shape[:-1], layer.out_features)
    return layer(x)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of one query per row and head, ``q`` ``(B, H, 1, hd)``, over ``k, v`` ``(B, H, L, hd)``
    with an additive float ``mask`` ``(B or 1, 1, 1, L)``, written as plain tensor ops (fp32 inside).

    For compiled CPU decode steps: inductor fuses these into a few small loops, where SDPA stays
    an external CPU flash-attention call per layer (~50-60 us each, mostly fixed cost, at one query)."""
    B, H, _, hd = q.shape
    scores = (q.float() * k.float()).sum(-1) * (1.0 / math.sqrt(hd)) + mask.float().view(mask.size(0), 1, -1)
    p = torch.softmax(scores, dim=-1)  # (B, H, L)
    return (p.unsqueeze(-1) * v.float()).sum(-2).unsqueeze(2).to(q.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head masked self-attention with one fused QKV projection and PyTorch SDPA."""

    def __init__(self, config: GPTconfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.d_model = config.d_model
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, cache_row: int | torch.Tensor = 0,
                parts: Sequence[Part] | None = None) -> torch.Tensor:
        qkv = linear(self.c_attn, x)
        if parts is None:
            y = self._attend(qkv, input_pos, mask, cache_row)
        else:  # x is (1, N): the parts' tokens one after the other; attention runs part by part
            ys, start = [], 0
            for p in parts:
                n = p.rows * p.length
                part = qkv[0, start:start + n].view(p.rows, p.length, -1)
                ys.append(self._attend(part, p.input_pos, p.mask, p.cache_row).view(1, n, -1))
                start += n
            y = torch.cat(ys, dim=1)
        return self.resid_dropout(linear(self.c_proj, y))

    def _attend(self, qkv: torch.Tensor, input_pos: torch.Tensor | None, mask: torch.Tensor | None,
                cache_row: int | torch.Tensor) -> torch.Tensor:
        """Attention of the fused projections ``qkv`` (B, T, 3C) -> (B, T, C), before ``c_proj``."""
        B, T, C = qkv.size(0), qkv.size(1), self.d_model
        q, k, v = qkv.split(self.d_model, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim): heads become a batch dimension for SDPA.
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if self.kv_cache is not None:
            assert input_pos is not None and mask is not None, "the KV cache needs input_pos and a mask"
            # Attend only to the slots the mask covers: while the cache is filling, the slots past
            # the mask's length are empty, and skipping them makes each decode step O(filled).
            k, v = self.kv_cache.update(input_pos, k, v, cache_row, mask.size(-1))
        dropout_p = self.attn_dropout if self.training else 0.0
        if mask is None:
            # Plain causal attention: SDPA picks its flash / memory-efficient kernels.
            if q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled():
                # Training in bf16 on CPU: PyTorch's CPU flash-attention backward is slower in
                # bf16 than in fp32 (torch 2.13, AVX-512: 1.4-1.9x per layer, forward+backward),
                # so attend in fp32 (also the more accurate choice); autocast would cast back.
                with torch.autocast("cpu", enabled=False):
                    y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                       dropout_p=dropout_p, is_causal=True).to(q.dtype)
            else:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif T == 1 and q.device.type == "cpu" and torch.compiler.is_compiling() and mask.is_floating_point():
            y = decode_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype) if mask.is_floating_point()
                                               else mask, dropout_p=dropout_p)
        return y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side


class MLP(nn.Module):
    """Position-wise feed-forward network: d_model -> 4*d_model -> d_model with tanh-GELU."""

    def __init__(self, config: GPTconfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, 4 * config.d_model, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.d_model, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(linear(self.c_proj, gelu_tanh(linear(self.c_fc, x))))


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation, as GPT-2 was trained ("gelu_new" in HF):
    ``0.5 x (1 + tanh(u))``, ``u = sqrt(2/pi) (x + 0.044715 x^3)``.

    Eagerly this is PyTorch's one fused kernel. Under ``torch.compile`` on a CPU it is written as
    ``x * sigmoid(2u)``, the same function (0.5 (1 + tanh(u)) = sigmoid(2u); within 5e-7 in fp32):
    inductor's CPU tanh is an accurate vector-math call (3.4 ns per element on a 2-core AVX2 EPYC,
    torch 2.13) while its sigmoid is exp-based, so the fused kernel takes 1.3 ns per element.
    Eagerly on a CPU without autograd (generation, serving) an fp32 input takes the same form in
    place, on one scratch tensor (each in-place op rounds to the tensor's dtype, so half-precision
    inputs keep F.gelu, which rounds once): PyTorch's tanh kernel is as slow (8 x 1536 values
    43 -> 29 us, 48 x 1536 254 -> 126 us, 1 thread; within 5.2e-7 of the float64 truth, F.gelu's
    fp32 within 4.3e-7)."""
    if torch.compiler.is_compiling() and x.device.type == "cpu":
        return x * torch.sigmoid((2.0 * _SQRT_2_OVER_PI) * (x + 0.044715 * x * x * x))
    if x.device.type == "cpu" and x.dtype == torch.float32 and not (x.requires_grad and torch.is_grad_enabled()):
        u = x * x
        u.mul_(2.0 * _SQRT_2_OVER_PI * 0.044715).add_(2.0 * _SQRT_2_OVER_PI).mul_(x)  # 2u
        return u.sigmoid_().mul_(x)
    return F.gelu(x, approximate="tanh")


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTconfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, cache_row: int | torch.Tensor = 0,
                parts: Sequence[Part] | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), input_pos, mask, cache_row, parts)
        x = x + self.mlp(self.ln_2(x))
        return x


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (B, T, V) against ``targets`` (B, T), skipping ``ignore_index``.

    Computed in fp32 even when the logits are bf16: the log-sum-exp needs the range. (A no-op for
    fp32 logits. Under autocast cross_entropy would upcast by itself, so this is the one cast either
    way; with bf16 weights and no autocast it is the needed one.) Training does not go through the
    logits: ``GPT.forward(ids, targets=...)`` uses ``linear_cross_entropy``, which gives the same loss.
    """
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index)


# The LM head's share of training memory: at the GPT-2 shape (16 x 1024 tokens, 50,257 ids) the
# bf16 logits take 1.6 GB and one fp32 copy 3.3 GB, and the plain path keeps several (bf16 logits,
# their fp32 upcast, the log-softmax saved for backward). ``linear_cross_entropy`` instead runs the
# head in chunks of rows whose logits stay under this many bytes, and computes the head's gradients
# chunk by chunk during the forward pass (the same three matmuls as the plain path, no recompute).
# A chunk's bytes are counted as they exist: the fused Triton kernel (``LOSS_KERNEL``) overwrites
# the logits with their gradient, and under torch.compile the torch ops fuse into two passes over
# the logits in the matmul's dtype (nothing fp32 is stored), so only those count; eager torch ops
# also store the fp32 upcast (when the matmul's dtype is not fp32). At the GPT-2 shape that is one
# chunk with the kernel or compiled, three with eager torch ops (H200, compiled step: 486,502
# tokens/s against 458,005 with the earlier seven fp32 chunks of 512 MiB and a scatter;
# docs/benchmarks.md).
LOSS_CHUNK_BYTES = 2 * 2**30
# Tensor cores want matmul dimensions in multiples of 64 (nanoGPT pads GPT-2's 50,257 ids to 50,304
# in the model). Here, on CUDA, only the head's transient training-time weight copy is padded, with
# zero rows whose logits are left out of the softmax: the loss is exact, and the parameters, every
# saved file and every logit a user sees keep the real vocabulary.
VOCAB_PAD_MULTIPLE = 64
# Which code computes each chunk's softmax, loss and gradient: "triton" is the fused kernel of
# ``losskernel.py`` (one read and one in-place write of the logits, no fp32 copy even eager),
# "torch" the ops in ``_chunked_loss`` (fused into two passes by inductor when compiled), "auto"
# the kernel on CUDA when Triton is installed, else torch. The two give the same loss and
# gradients (fp32 math; the gradient rounded once to the logits' dtype). A module setting so a
# benchmark can compare them (bench/gpu.py's "inductor loss" case sets "torch").
LOSS_KERNEL = "auto"


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         chunk_bytes: int | None = None, pad_multiple: int | None = None) -> torch.Tensor:
    """``next_token_loss(x @ weight.T, targets)`` without materialising the full logits.

    ``x`` (..., d) are the final hidden states, ``weight`` (V, d) the LM head, ``targets`` (...) the
    next ids (``ignore_index`` positions do not count). The softmax runs in fp32; the matmuls run
    in the autocast dtype when autocast is on (as ``nn.Linear`` would), else in ``weight``'s dtype.
    When gradients are needed, the chunks' gradients are summed in fp32 during this call and only
    scaled by the incoming gradient in backward, so no chunk's logits outlive its loop iteration.
    On CUDA each chunk's softmax, loss and gradient run in ``losskernel``'s fused Triton kernel
    (``LOSS_KERNEL``), which overwrites the chunk's logits with their gradient.
    ``chunk_bytes`` defaults to ``LOSS_CHUNK_BYTES``; ``pad_multiple`` to ``VOCAB_PAD_MULTIPLE`` on CUDA
    and 1 elsewhere (CPU BLAS gains nothing from it and would pay for the extra rows).
    """
    chunk_bytes = chunk_bytes or LOSS_CHUNK_BYTES
    if pad_multiple is None:
        pad_multiple = VOCAB_PAD_MULTIPLE if x.device.type == "cuda" else 1
    x2, t = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    if t.size(0) != x2.size(0):
        raise ValueError(f"targets {tuple(targets.shape)} do not match the hidden states {tuple(x.shape)}")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(x.dtype, weight.dtype)
    fused = _use_loss_kernel(x.device)
    if torch.is_grad_enabled() and (x2.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(x2, weight, t, ignore_index, dtype, chunk_bytes, pad_multiple, fused)
    with torch.autocast(device_type, enabled=False):
        return _chunked_loss(x2, weight, t, ignore_index, dtype, chunk_bytes, pad_multiple, fused, grads=False)[0]


def _use_loss_kernel(device: torch.device) -> bool:
    """Whether ``LOSS_KERNEL`` picks the fused Triton kernel for logits on ``device``."""
    if LOSS_KERNEL == "auto":
        return device.type == "cuda" and losskernel is not None
    if LOSS_KERNEL == "triton":
        if losskernel is None:
            raise RuntimeError("model.LOSS_KERNEL = 'triton' needs Triton (pip install triton); "
                               "set it to 'auto' or 'torch' to use the torch ops")
        return True
    if LOSS_KERNEL == "torch":
        return False
    raise ValueError(f"model.LOSS_KERNEL must be 'auto', 'triton' or 'torch', got {LOSS_KERNEL!r}")


def _chunked_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                  dtype: torch.dtype, chunk_bytes: int, pad_multiple: int, fused: bool,
                  grads: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Mean loss and, if ``grads``, its fp32 gradients with respect to ``x`` (N, d) and ``weight`` (V, d);
    ``fused``: each chunk's softmax, loss and gradient by ``losskernel``'s Triton kernel."""
    N, d = x.shape
    V = weight.size(0)
    Vp = -(-V // pad_multiple) * pad_multiple if pad_multiple > 1 else V
    w = weight.to(dtype)
    if Vp != V:
        w = torch.cat([w, w.new_zeros(Vp - V, d)])  # zero rows; their logits are sliced off below
    xc = x.to(dtype)
    # Equal chunks of rows, each under chunk_bytes (see LOSS_CHUNK_BYTES for what counts).
    itemsize = torch.finfo(dtype).bits // 8
    per_logit = itemsize if fused or torch.compiler.is_compiling() or dtype == torch.float32 else itemsize + 4
    n_chunks = max(1, -(-N * Vp * per_logit // chunk_bytes))
    rows = -(-N // n_chunks)
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    grad_x = torch.empty(N, d, dtype=torch.float32, device=x.device) if grads else None
    grad_w = None
    for start in range(0, N, rows):
        end = min(start + rows, N)
        logits = xc[start:end] @ w.t()  # (n, Vp) in the compute dtype
        loss_sum, g = _rows_loss(logits, targets[start:end], V, ignore_index, fused, grads)
        total += loss_sum
        if grads:
            grad_x[start:end] = g @ w
            part = (g.t() @ xc[start:end]).float()
            grad_w = part if grad_w is None else grad_w.add_(part)
    count = (targets != ignore_index).sum()
    loss = total / count
    if grads:
        scale = 1.0 / count.float()
        return loss, grad_x.mul_(scale), grad_w.mul_(scale)[:V]
    return loss, None, None


def _rows_loss(logits: torch.Tensor, targets: torch.Tensor, n_real: int, ignore_index: int, fused: bool,
               grads: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed fp32 cross-entropy of the rows of ``logits`` (n, Vp) against ``targets`` (n,) over
    their first ``n_real`` columns (``ignore_index`` rows count 0) and, if ``grads``, its gradient
    with respect to the logits, in their dtype: ``softmax - onehot``, zero on ignored rows and
    padded columns, left unnormalised (entries in [-1, 1]) so that fp16/bf16 matmuls keep their
    precision (the 1/count is applied in fp32 by the caller). ``fused``: ``losskernel``'s Triton
    kernel, which writes the gradient over the logits; else torch ops (eager: in place on one
    fp32 copy; compiled: inductor fuses them into two passes over the logits)."""
    if fused:
        losses = losskernel.cross_entropy_rows_(logits, targets, n_real, ignore_index, grads)
        return losses.sum(), (logits if grads else None)
    ok = targets != ignore_index
    tgt = torch.where(ok, targets, 0)
    g = logits.float()  # (the same tensor when that is fp32)
    real = g[:, :n_real]
    lse = torch.logsumexp(real, dim=-1)
    picked = real.gather(1, tgt[:, None]).squeeze(1)
    loss_sum = torch.where(ok, lse - picked, 0.0).sum()
    if not grads:
        return loss_sum, None
    g = g.sub_(lse[:, None]).exp_()
    if g.size(1) != n_real:
        g[:, n_real:] = 0.0
    if torch.compiler.is_compiling():
        # A comparison, not a scatter: a scatter splits inductor's fused pass in two, with the
        # fp32 gradient stored in between (measured on an H200: 2.5x the bytes).
        columns = torch.arange(g.size(1), device=g.device)
        g.sub_((columns == tgt[:, None]).to(g.dtype))
    else:
        g.scatter_add_(1, tgt[:, None], torch.full_like(tgt[:, None], -1, dtype=g.dtype))
    return loss_sum, g.mul_(ok[:, None]).to(logits.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """Autograd wrapper of ``_chunked_loss``: gradients computed in forward, scaled in backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                dtype: torch.dtype, chunk_bytes: int, pad_multiple: int, fused: bool) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            loss, grad_x, grad_w = _chunked_loss(x, weight, targets, ignore_index, dtype, chunk_bytes,
                                                 pad_multiple, fused, grads=True)
        ctx.save_for_backward(grad_x, grad_w)
        ctx.dtypes = (x.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_x, grad_w = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        return ((grad_x * grad_loss).to(x_dtype), (grad_w * grad_loss).to(w_dtype), None, None, None, None, None,
                None)


class GPT(nn.Module):
    """The GPT-2 language model. ``GPT(config)(input_ids)`` returns logits ``(B, T, vocab_size)``."""

    def __init__(self, config: GPTconfig | None = None) -> None:
        super().__init__()
        if config is None:
            config = GPTconfig()
        if not isinstance(config, GPTconfig):
            raise ValueError(f"GPT expects a GPTconfig, got {type(config).__name__}")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.d_model),  # token embedding
            wpe=nn.Embedding(config.context_length, config.d_model),  # learned position embedding
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        # Weight tying (as GPT-2): the output projection is the token embedding matrix.
        self.lm_head.weight = self.transformer.wte.weight
        # Range-checking ids costs a device->host sync; the trainer turns it off once it has
        # checked the dataset (and torch.compile would graph-break on it).
        self.check_inputs = True
        # Under bf16 autocast, keep the residual stream in bf16, as llm.c and Megatron-LM do (the
        # trainer's bf16_residual option, on by default under bf16). The embeddings are fp32
        # parameters, so without it every residual add, LayerNorm input and their gradients move fp32
        # values through memory (as in nanoGPT). LayerNorm still computes in fp32 (autocast runs it
        # so), and weights, gradients and optimizer state stay fp32. Measured on an H200 (GPT-2 124M,
        # batch 16 x 1024, compiled, one run): 505,956 -> 530,812 tokens/s, 8.37 -> 7.78 GiB, 1.06x ->
        # 1.11x nanoGPT. It changes the rounding, not the result: the shakespeare_char GPU recipe's
        # val loss after 2,000 steps, two seeds each way in that run, was 1.4746 / 1.4644 with it and
        # 1.4745 / 1.4675 without (docs/benchmarks.md). A model built here leaves it off (inference
        # and HF parity are unchanged); the trainer sets it. fp16 ignores it: its range is too small
        # for GPT-2's large residual activations.
        self.bf16_residual = False
        self.apply(self._init_weights)
        # GPT-2 scales the init of the projections that write into the residual stream by
        # 1/sqrt(2 * n_layer): there are two such additions per block.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self._packed_head = None  # a decode layout of the LM head (quantize.PackedHead), or None
        self._cache_len = 0  # slots per row of the live KV cache (0: none)
        self._cache_batch = 0  # its rows

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    # --- information ---------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        """Number of parameters, the tied head counted once; ``non_embedding`` leaves out the
        position embedding (the usual convention for scaling laws and FLOP counts)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6N + 12·L·T·d (PaLM appendix B)."""
        cfg = self.config
        T = seq_len or cfg.context_length
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * T * cfg.d_model

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.wte.weight.dtype

    # --- forward -------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, input_pos: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache_row: int | torch.Tensor = 0, targets: torch.Tensor | None = None,
                logits_to_keep: int = 0, parts: Sequence[Part] | None = None) -> torch.Tensor:
        """Logits ``(B, T, vocab_size)`` for token ids ``(B, T)``; with ``targets`` (B, T) the mean
        next-token loss instead (see ``loss``), computed without materialising the logits.

        ``logits_to_keep=n > 0`` (HF's argument of that name) applies the LM head to the last ``n``
        positions only and returns ``(B, n, vocab_size)``, the same values as the last ``n`` of the
        full output: a prefill needs only its last row, and at 50,257 ids the head over every prompt
        position costs as much as the whole body (``0``, the default, keeps all).

        Plain use needs only ``input_ids``. With a KV cache (``setup_cache``) every forward says
        which cache slots it writes: ``input_pos`` ``(T,)`` (the same slots for all rows) or
        ``(B, T)`` (each row its own, e.g. rows of different lengths decoding together). These are
        also the positions unless ``position_ids`` (``(T,)`` or ``(B, T)``) says otherwise, e.g.
        for left-padded rows. ``mask`` ``(B or 1, 1, T, L)`` says which of the first ``L`` cache
        slots each token attends to: boolean (True = may attend) or additive float in the model's
        dtype (0 or -inf; the decode loops keep one such buffer, so no mask is built per step).
        Only those ``L <= cache_len`` slots are read, so a caller can skip empty slots. Without a
        mask a token at slot t sees slots 0..t. ``cache_row`` is the first cache row this batch
        uses (rows ``cache_row .. cache_row + B - 1``; e.g. to prefill one request into its slot),
        or a ``(B,)`` tensor of rows (e.g. several requests prefilled together into scattered free
        rows; the caller keeps its entries distinct and in range: they are not checked here, as
        that would sync the device).

        ``parts`` (with a KV cache): several such batches in ONE forward, e.g. the serving engine's
        running rows (one decode token each) and new prompts' prefill chunks, so that every linear
        layer reads its weights once for all of them. ``input_ids`` ``(1, N)`` holds the parts'
        tokens one after the other (part ``i``'s ``rows x length`` tokens row by row); each
        :class:`Part` carries its ``input_pos``, ``mask`` and ``cache_row`` (the ``input_pos``,
        ``mask``, ``cache_row`` arguments must be left out), positions are the parts' ``input_pos``
        unless ``position_ids`` ``(1, N)`` says otherwise, and the LM head runs on each row's last
        token only: the result is ``(1, R, vocab_size)``, ``R`` = all parts' rows in order. Parts
        are written to the cache in order, so a later part's write to a slot wins.
        """
        if parts is not None:
            return self._forward_parts(input_ids, parts, position_ids)
        self._check_input_ids(input_ids)
        if input_ids.dtype not in (torch.int64, torch.int32):  # uint8/int16/uint16...: the lookup takes these only
            input_ids = input_ids.long()
        B, T = input_ids.shape
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an integer >= 0 (0 = every position), got {logits_to_keep!r}")
        if self._cache_len:
            if input_pos is None:
                raise ValueError("the KV cache is set up: pass input_pos (the cache slots to write), "
                                 "or call model.clear_cache() first")
            if isinstance(cache_row, torch.Tensor):
                if cache_row.shape != (B,) or cache_row.dtype != torch.long:
                    raise ValueError(f"a tensor cache_row must be int64 of shape ({B},) (one cache row per input "
                                     f"row), got {cache_row.dtype} {tuple(cache_row.shape)}")
            elif cache_row < 0 or cache_row + B > self._cache_batch:
                raise ValueError(f"cache rows {cache_row}..{cache_row + B - 1} are outside the KV cache's "
                                 f"{self._cache_batch} rows")
            if mask is None:
                mask = self.causal_mask[input_pos]  # (T, L) or (B, T, L)
                mask = mask[None, None] if input_pos.dim() == 1 else mask[:, None]
            if mask.dtype == torch.bool:
                # One additive float mask for all layers; SDPA would convert a bool mask in every layer.
                mask = torch.zeros(mask.shape, dtype=self.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
            pos = input_pos if position_ids is None else position_ids
        else:
            if input_pos is not None:
                raise ValueError("input_pos is only meaningful with a KV cache; call model.setup_cache() first "
                                 "(for nanoGPT's model(idx, targets) use model.loss(idx, targets); model(idx) "
                                 "gives the logits)")
            pos = torch.arange(T, device=input_ids.device) if position_ids is None else position_ids
        if self._cache_len and T == 1 and targets is None:
            logits = self._fused_decode(input_ids, input_pos, mask, pos, cache_row)
            if logits is not None:
                return logits
        x = self._embed(input_ids, pos)
        for block in self.transformer.h:
            x = block(x, input_pos, mask, cache_row)
        x = self.transformer.ln_f(x)
        if targets is not None:
            # Training goes through forward (DDP and torch.compile wrap forward), so the loss is here.
            targets = self._checked_targets(targets, input_ids.shape)
            if type(self.lm_head) is nn.Linear:
                return linear_cross_entropy(x, self.lm_head.weight, targets)
            return next_token_loss(self.lm_head(x), targets)  # a swapped-in head (e.g. quantized): its own matmul
        if 0 < logits_to_keep < T:
            x = x[:, -logits_to_keep:]
        return self._head(x)

    def _embed(self, input_ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The residual stream's start: token + position embeddings (dropout in training), in bf16
        under bf16 autocast with ``bf16_residual`` set, else in the embeddings' dtype."""
        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(pos))
        device_type = x.device.type
        if (self.bf16_residual and torch.is_autocast_enabled(device_type)
                and torch.get_autocast_dtype(device_type) == torch.bfloat16):
            x = x.to(torch.bfloat16)
        return x

    def _fused_decode(self, input_ids: torch.Tensor, input_pos: torch.Tensor, mask: torch.Tensor,
                      pos: torch.Tensor, cache_row: int | torch.Tensor) -> torch.Tensor | None:
        """Logits ``(B, 1, V)`` of a one-token decode forward computed by ONE op, our whole-step CPU
        kernel (``gpt2model_kernels::decode_step``, :mod:`gpt2model.cpukernels`), or None where it
        does not apply; then the layers below run as usual.

        It applies on a CPU without autograd, in eval mode, for up to ``KERNEL_MAX_ROWS`` rows that
        are the cache's first rows (``cache_row`` 0), with a float mask, where every linear is one
        the kernel reads (int8 :class:`~gpt2model.quantize.Int8Linear` on our kernel, row-major fp32
        or bf16 ``nn.Linear``; fp32 weights are row-major for one-row caches, see
        ``quantize.prepare_decode``) and ``cpukernels.fused_step_enabled()`` (off: the layers, the
        reference the tests compare it with). Eagerly it is the decode step's whole forward, one
        op call per token (see :meth:`fused_decode_applies` and ``generate.step_for``: a CPU step
        it applies to is not compiled, as torch.compile's per-call guards and wrappers cost more
        than everything around the op). Its arguments are gathered once per cache
        (:meth:`setup_cache` clears them). Why one op: see the comment above ``decode_step`` in
        ``cpukernels.cpp``."""
        B = input_ids.size(0)
        if input_ids.device.type != "cpu" or torch.is_grad_enabled() or self.training \
                or not cpukernels.fused_step_enabled() or torch.is_autocast_enabled("cpu"):
            return None
        if B > cpukernels.KERNEL_MAX_ROWS or self._cache_batch < B or isinstance(cache_row, torch.Tensor) \
                or cache_row != 0 or mask.dtype not in (torch.float32, torch.bfloat16) or mask.dim() != 4 \
                or mask.shape[1:3] != (1, 1) or mask.size(0) not in (1, B):
            return None
        if torch.compiler.is_compiling():
            args = self._fused_decode_args()
        else:  # gathered once per cache: ~40 tensors' checks would cost more than the rest of a step's Python
            args = self.__dict__.get("_fused_args", False)
            if args is False:
                args = self._fused_args = self._fused_decode_args()
        if args is None:
            return None
        # slots ``input_pos`` and positions ``pos``: (1,) (the same for every row) or (B, 1), as given
        return torch.ops.gpt2model_kernels.decode_step(input_ids, input_pos, pos, mask, *args)

    def fused_greedy_step(self, out: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, counters: torch.Tensor,
                          done: torch.Tensor, eot: torch.Tensor, finished: torch.Tensor, length: int | None,
                          vocab_limit: int | None) -> bool:
        """``generate.generation_step`` of a greedy token (no repetition penalty) in ONE op call
        (``gpt2model_kernels::greedy_step``: the whole-step op plus the argmax and the loop's
        bookkeeping on ``generate._Buffers``, the same results bit for bit) where the whole-step op
        applies (:meth:`_fused_decode`); False, having done nothing, where it does not. Why: the
        ~20 small eager torch ops around the op cost 0.3-0.6 ms per token, a fifth of a 2-core
        decode step of the 6x384 BPE model; in C++ they take microseconds."""
        B = out.size(0)
        if out.device.type != "cpu" or torch.is_grad_enabled() or self.training or torch.compiler.is_compiling() \
                or not cpukernels.fused_step_enabled() or torch.is_autocast_enabled("cpu"):
            return False
        if B > cpukernels.KERNEL_MAX_ROWS or self._cache_batch < B or not self._cache_len \
                or mask.dtype not in (torch.float32, torch.bfloat16) or mask.dim() != 4 or mask.size(0) != B \
                or not mask.is_contiguous():
            return False
        args = self.__dict__.get("_fused_args", False)
        if args is False:
            args = self._fused_args = self._fused_decode_args()
        if args is None:
            return False
        torch.ops.gpt2model_kernels.greedy_step(out, mask, pos, counters, done, eot, finished, length or 0,
                                                vocab_limit or 0, *args)
        return True

    def _fused_decode_args(self) -> tuple[Any, ...] | None:
        """The whole-step op's arguments after the per-step ones, or None where it does not apply."""
        found = self._fused_decode_params()
        if found is None:
            return None
        params, interleaved, caches = found
        return (self.transformer.wte.weight, self.transformer.wpe.weight, params, [c.k for c in caches],
                [c.v for c in caches], interleaved, self.config.n_head, self.config.layer_norm_eps)

    def fused_decode_applies(self, batch_size: int) -> bool:
        """Whether a CPU decode step of up to ``batch_size`` rows on this model (as it is now, in
        eval mode, with the weight layouts :meth:`setup_cache` gives such a cache) runs as one op
        (:meth:`_fused_decode`). ``generate.step_for`` asks it: such a step is not compiled."""
        if self.device.type != "cpu" or self.training or not cpukernels.fused_step_enabled() \
                or not 0 < batch_size <= cpukernels.KERNEL_MAX_ROWS:
            return False
        from .quantize import decode_layout_is_column_major

        fp32 = [m.weight for m in self.modules() if type(m) is nn.Linear and m.weight.dtype == torch.float32]
        if any(decode_layout_is_column_major(w.device, w.dtype, tuple(w.shape), batch_size) for w in fp32):
            return False  # such a cache re-lays fp32 weights column-major (MKL's faster layout at several rows)
        return self._fused_decode_params(check_caches=False) is not None

    def _fused_decode_params(self, check_caches: bool = True
                             ) -> tuple[list[torch.Tensor], list[int], list[KVCache]] | None:
        """The whole-step kernel's arguments (see ``decode_step`` in ``cpukernels.cpp``): per layer
        ln_1 (w, b), c_attn (w, scales, b), attn.c_proj, ln_2, c_fc, mlp.c_proj, then ln_f and the
        head (absent biases and float weights' scales as empty tensors), each linear's
        ``interleaved`` flag, and the KV caches; None if some layer is not one the kernel reads
        (or, ``check_caches``, some cache is not one it writes; without, the caches are not
        looked at)."""
        from .quantize import Int8Linear

        floats = (torch.float32, torch.bfloat16)
        empty = torch.empty(0, device=self.device)
        params: list[torch.Tensor] = []
        interleaved: list[int] = []

        def linear_ok(layer: nn.Module) -> bool:
            if type(layer) is nn.Linear and layer.weight.dtype in floats and layer.weight.is_contiguous():
                params.extend([layer.weight, empty, empty if layer.bias is None else layer.bias])
                interleaved.append(0)
            elif isinstance(layer, Int8Linear) and layer.use_kernel and not layer.dynamic \
                    and layer.scales.dtype == torch.float32 and layer.weight.is_contiguous():
                params.extend([layer.weight, layer.scales, empty if layer.bias is None else layer.bias])
                interleaved.append(int(layer.interleaved))
            else:
                return False
            return (layer.bias is None or (layer.bias.dtype in floats and layer.bias.is_contiguous()))

        def norm_ok(ln: nn.Module) -> bool:
            if type(ln) is not nn.LayerNorm or ln.weight is None or ln.weight.dtype not in floats \
                    or ln.eps != self.config.layer_norm_eps or ln.normalized_shape != (self.config.d_model,):
                return False
            params.extend([ln.weight, empty if ln.bias is None else ln.bias])
            return True

        caches = []
        for block in self.transformer.h:
            attn, mlp = block.attn, block.mlp
            if not (norm_ok(block.ln_1) and linear_ok(attn.c_attn) and linear_ok(attn.c_proj) and norm_ok(block.ln_2)
                    and linear_ok(mlp.c_fc) and linear_ok(mlp.c_proj)):
                return None
            if check_caches:
                if attn.kv_cache is None:
                    return None
                caches.append(attn.kv_cache)
        if not (norm_ok(self.transformer.ln_f) and linear_ok(self.lm_head)):
            return None
        if self.config.head_dim % 8 or any(
                c.k.dtype not in floats or c.k.dtype != caches[0].k.dtype or not c.k.is_contiguous()
                or not c.v.is_contiguous() for c in caches) \
                or self.transformer.wte.weight.dtype not in floats or self.transformer.wpe.weight.dtype not in floats:
            return None
        return params, interleaved, caches

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        if self._cache_len and self._packed_head is not None:
            from .quantize import packed_head_logits  # a several-row decode step's head (quantize.py)

            logits = packed_head_logits(self, x)
            if logits is not None:
                return logits
        return linear(self.lm_head, x)

    def _forward_parts(self, input_ids: torch.Tensor, parts: Sequence[Part],
                       position_ids: torch.Tensor | None) -> torch.Tensor:
        """``forward(..., parts=...)``: the packed forward of several cached batches (see forward)."""
        check_token_ids(input_ids, self.config.vocab_size, check_range=self.check_inputs)
        if not self._cache_len:
            raise ValueError("parts need a KV cache: call model.setup_cache() first")
        N = sum(p.rows * p.length for p in parts)
        if not parts or input_ids.shape != (1, N):
            raise ValueError(f"with parts, input_ids must be (1, {N}): the parts' tokens one after the other, "
                             f"got {tuple(input_ids.shape)}")
        if position_ids is None:
            position_ids = torch.cat([p.input_pos.reshape(1, -1) for p in parts], dim=1)
        x = self._embed(input_ids, position_ids)
        for block in self.transformer.h:
            x = block(x, parts=parts)
        # Each row's last token: the index after each row of each part, minus one.
        last, start = [], 0
        for p in parts:
            last.extend(range(start + p.length - 1, start + p.rows * p.length, p.length))
            start += p.rows * p.length
        x = self.transformer.ln_f(x[:, torch.tensor(last, device=x.device)])  # layer norm is per token
        return self._head(x)

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean next-token cross-entropy: ``targets[b, t]`` is the id that should follow
        ``input_ids[b, :t+1]`` (usually ``input_ids`` shifted left by one); positions whose
        target is ``ignore_index`` do not count."""
        if ignore_index != -100:
            targets = targets.masked_fill(targets == ignore_index, -100)
        return self(input_ids, targets=targets)

    def _checked_targets(self, targets: Any, shape: torch.Size) -> torch.Tensor:
        """``targets`` checked as the loss reads them: integer ids of ``shape``, each in ``[0,
        vocab_size)`` or -100 (ignored), as int64. The range check (a device-to-host sync) follows
        ``check_inputs``, as the input ids' does; out of range, cross-entropy fails with an opaque
        device error or, in a fused kernel, reads past the logits."""
        if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point or targets.dtype.is_complex \
                or targets.dtype == torch.bool:
            what = f"dtype {targets.dtype}" if isinstance(targets, torch.Tensor) else type(targets).__name__
            raise ValueError(f"targets must be a tensor of integer token ids (torch.long), got {what}")
        if targets.shape != shape:
            raise ValueError(f"targets must have the shape of input_ids {tuple(shape)}, got {tuple(targets.shape)}")
        if targets.dtype != torch.int64:  # cross-entropy indexes with int64 only
            targets = targets.long()
        if self.check_inputs:
            V = self.config.vocab_size
            lo, hi = (int(t) for t in torch.aminmax(targets.masked_fill(targets == -100, 0)))
            if lo < 0 or hi >= V:
                bad = targets[(targets != -100) & ((targets < 0) | (targets >= V))].unique()
                shown = ", ".join(str(int(t)) for t in bad[:8]) + (", ..." if bad.numel() > 8 else "")
                raise ValueError(f"targets hold ids outside [0, {V}) (this model's vocab_size {V}): {shown}; a "
                                 f"target must be a token id of the model's vocabulary, or -100 (the ignore "
                                 f"index) for a position that does not count")
        return targets

    def _check_input_ids(self, input_ids: torch.Tensor) -> None:
        check_token_ids(input_ids, self.config.vocab_size, check_range=self.check_inputs)
        T = input_ids.size(1)
        limit = self._cache_len or self.config.context_length
        if limit < T:
            raise ValueError(f"sequence length {T} exceeds the model's context_length {limit}; "
                             f"crop the input to its last {limit} tokens (input_ids[:, -{limit}:])")

    # --- KV cache ------------------------------------------------------------------------------
    def setup_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                    caches: Sequence[KVCache] | None = None) -> None:
        """Allocate a KV cache for ``batch_size`` rows of up to ``max_len`` tokens (default:
        ``context_length``). Until ``clear_cache()`` every forward must say its ``input_pos``.
        ``caches``: one :class:`KVCache` per layer to use again where their shapes match (a CUDA
        graph reads the cache at fixed addresses: ``generate``'s loop keeps them between calls);
        their old contents are never read (each slot is written before a mask shows it)."""
        if self._cache_len:
            raise RuntimeError("this model already has a live KV cache (another generate/stream or an Engine is "
                               "using it, e.g. an unfinished stream() iterator): finish or close() that first, or "
                               "call model.clear_cache() if it was abandoned; a model serves one generation at a "
                               "time (batch prompts together, or use gpt2model.engine.Engine for many requests)")
        max_len = max_len or self.config.context_length
        if not 0 < max_len <= self.config.context_length:
            raise ValueError(f"cache length must be in [1, context_length={self.config.context_length}], got {max_len}")
        dtype = dtype or self.dtype
        if not self.training:  # an eval-mode model: decode-friendly weight layouts until .train() (quantize.py)
            from .quantize import prepare_decode

            prepare_decode(self, batch_size)
        shape = (batch_size, self.config.n_head, max_len, self.config.head_dim)
        if caches is not None and (len(caches) != len(self.transformer.h) or not all(
                c.k.shape == shape and c.k.dtype == dtype and c.k.device == self.device for c in caches)):
            caches = None
        for i, block in enumerate(self.transformer.h):
            block.attn.kv_cache = caches[i] if caches is not None else \
                KVCache(batch_size, self.config.n_head, max_len, self.config.head_dim, dtype, self.device)
        # Row t of the causal mask says which cache slots a token at slot t may see.
        self.register_buffer("causal_mask",
                             torch.tril(torch.ones(max_len, max_len, dtype=torch.bool, device=self.device)),
                             persistent=False)
        self._cache_len = max_len
        self._cache_batch = batch_size
        self.__dict__.pop("_fused_args", None)  # the whole-step op's arguments: gathered at its first call

    def clear_cache(self) -> None:
        """Free the KV cache and return to plain (cache-less) forwards (and the buffers a
        CUDA-graph ``generate`` keeps for its next call)."""
        self.__dict__.pop("_decode_buffers", None)
        self.__dict__.pop("_fused_args", None)
        for block in self.transformer.h:
            block.attn.kv_cache = None
        if hasattr(self, "causal_mask"):
            del self.causal_mask
        self._cache_len = 0
        self._cache_batch = 0

    def train(self, mode: bool = True) -> GPT:
        """``nn.Module.train``; training also gets the weights' usual row-major layout back (see
        ``gpt2model.quantize.prepare_decode``), so it never sees the decode layout."""
        self.__dict__.pop("_fused_args", None)  # layouts change: gathered again at the next eval-mode step
        if mode:
            from .quantize import restore_layout

            restore_layout(self)
        return super().train(mode)

    def quantize(self, mode: str = "int8", head: bool | None = None) -> GPT:
        """Quantize the weights in place for inference (``"int8"``: weight-only, per-output-channel)
        and return the model; ``head``: the LM head too (default: where it is a sizeable part of
        the weights); see ``gpt2model.quantize.quantize``. Quantized models cannot be saved."""
        from .quantize import quantize

        return quantize(self, mode, head)

    # --- weights in and out (HF format; see checkpoint.py) --------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **kwargs: Any) -> GPT:
        """Load a model folder (ours or HF's GPT-2 layout) or an OpenAI name (``gpt2``,
        ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``; downloaded only where a network exists).
        Keyword arguments: ``context_length`` (crop), ``dropout``, ``device``, ``dtype``."""
        from .checkpoint import load_model

        return load_model(name_or_path, **kwargs)

    def save_pretrained(self, directory: str | Path, tokenizer: Any = None) -> None:
        """Write ``config.json`` and ``model.safetensors`` in HF's GPT-2 layout, so that
        ``transformers.GPT2LMHeadModel.from_pretrained(directory)`` loads them too."""
        from .checkpoint import save_model

        save_model(self, directory, tokenizer=tokenizer)

    # --- generation (generate.py) ----------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs: Any) -> torch.Tensor:
        """Continue ``input_ids`` by ``max_new_tokens`` tokens; see ``gpt2model.generate.generate``."""
        from .generate import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)

    def stream(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs: Any) -> Iterator[torch.Tensor]:
        """Yield new tokens as they are produced; see ``gpt2model.generate.stream``."""
        from .generate import check_hf_arguments, stream

        check_hf_arguments(kwargs, "stream")
        return stream(self, input_ids, max_new_tokens, **kwargs)
