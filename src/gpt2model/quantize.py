"""Decode weights: weight-only int8 linears and the weight layout each decode matmul is fastest in.

Decoding reads every weight once per step for a handful of rows, so its speed is memory
bandwidth and the matmul kernel's layout, not FLOPs. Two mechanisms live here, both applied to a
:class:`~gpt2model.model.GPT` once, never per step:

* :func:`quantize` (``model.quantize("int8")``): every ``nn.Linear`` of the blocks and (where it is
  a sizeable part of the weights: a BPE vocabulary, not a character one) the tied LM head become
  :class:`Int8Linear`: per-output-channel symmetric int8 weights, ``w ≈ q · scale``
  with ``q ∈ [-127, 127]`` and one fp32 scale per output row (a quarter of the fp32 bytes). The
  token embedding stays in the model's dtype for the lookup; the head gets its own int8 copy of
  it (so the tie is dropped). Inference only: quantized weights take no gradients and there is no
  quantized save format (quantize at load time; ``save_pretrained`` refuses a quantized model).
* :func:`prepare_decode` (called by ``GPT.setup_cache`` in eval mode, undone by ``GPT.train()``): puts
  the decode weights in the layout their matmuls are fastest in for the cache's row count, as
  measured per matrix, rows and dtype on a 2-core AVX2 EPYC (torch 2.13; ``python
  bench/bench_decode.py --matmuls``, README): an fp32 ``F.linear(x, W)`` reads the 50,257-row
  head ~1.7x faster with ``W`` stored column-major (``W.t()`` contiguous, HF's Conv1D layout) at
  one row, and 1.2-1.7x faster still from a oneDNN-packed copy at 2-16 rows; whole batch-1 decode
  steps are 6-12% faster with the body column-major too; bf16 wants row-major everywhere (its
  column-major kernel is 4-10x slower on CPUs without native bf16). The weights are re-laid in place at the first cache
  setup of an eval-mode model (same ``Parameter``, shape and values; only the strides differ)
  and kept until ``model.train()``: no second copy, one re-lay per model rather than per generate
  call, a model that trains after generating sees exactly the tensors it had, and a saved folder
  is byte-for-byte the same either way (``checkpoint`` writes contiguous copies). The packed copy
  (:class:`PackedHead`) is the one layout that costs memory: one more copy of the head.

The int8 matmul on an x86-64 CPU with AVX2 + FMA: for inputs of up to
``cpukernels.KERNEL_MAX_ROWS`` (16) rows — decode steps, eagerly and inside ``torch.compile`` —
our own kernel (:mod:`gpt2model.cpukernels`, built at the first int8 layer of a process): int8
weights times each activation row on its own 15-bit integer grid, exact integer sums, 4 weight
streams. 6x384 BPE model, batch 1, 1 thread, compiled: 3.1 -> 2.35 ms per token (the inductor GEMV
below); the 50,257 x 384 head 0.9-1.1 ms (~20 GB/s) against 2.4 for ``_weight_int8pack_mm``.
Where it cannot be built or run (no compiler, no AVX2, ``GPT2MODEL_CPU_KERNELS=0``), torch's
kernels as follows. On CPU, eagerly, ``torch._weight_int8pack_mm`` (PyTorch's int8-weight kernel,
also what torchao uses there) with bf16 activations — its fp32-activation path is ~10x slower, so
the activations are cast to bf16 around it (relative error ~2^-9, well under int8's own). It is a
per-row kernel: steps of up to 16 rows use it, longer inputs (prefills) dequantize, then multiply.
The opt-in ``"int8-dynamic"`` mode quantizes the activations too, per row, and multiplies int8 by
int8 in FBGEMM's GEMM (:func:`int8_rows_linear`: 2.3x faster compiled 8-row decode steps, 1.5-2.2x
faster prefills, less accurate: see ``QUANTIZATION_MODES``' comment).
Inside ``torch.compile`` (``compile=True``) a one-row CPU decode step uses an int8 GEMV that
inductor generates from :meth:`Int8Linear._compiled_gemv` (1 byte read per weight, fp32
activations and accumulation): ~1.6x ``_weight_int8pack_mm`` on the 124M head, and the reason a
compiled int8 decode beats fp32 by >= 2x on this AVX2 CPU. On other devices (CUDA) a compiled
one-row decode step multiplies in :meth:`Int8Linear._compiled_reduction`, which inductor makes
one fused Triton reduction per layer reading each int8 weight once (gpt-fast's route past bf16);
elsewhere the weight is dequantized, then multiplied. Measured on an H200 (torch 2.11, the
50,257 x 768 head, one row): bf16 ``F.linear`` 34 us, dequantize + ``F.linear`` 143 us, CUDA's
``_weight_int8pack_mm`` 230 us; whole 124M decode steps: see ``COMPILED_REDUCTION_MAX_ROWS``.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch.nn import functional as F

from . import cpukernels

if TYPE_CHECKING:
    from .model import GPT

QUANTIZATION_MODES = ("int8", "int8-dynamic", "f16")
# What ``--dtype`` accepts where a saved model is run (sample, eval, serve): float dtypes, or a
# quantization applied after loading in float32.
WEIGHT_DTYPES = ("float32", "bfloat16", "float16", *QUANTIZATION_MODES)

# ``quantize(head=None)`` quantizes the LM head where it holds at least this share of the linear weights.
HEAD_MIN_SHARE = 0.1
# ``_weight_int8pack_mm`` is a per-row kernel: up to this many rows it beats dequantize + GEMM
# (measured at 16 rows: 2.2 vs 4.9 ms for 2,304 x 768, 56 vs 352 ms for the 50,257 x 768 head;
# 1,536 x 384 ties), so decode steps of up to 16 rows use it and longer prefills dequantize.
INT8_KERNEL_MAX_ROWS = 16
# ``"int8-dynamic"`` (an opt-in mode, CPU with FBGEMM): int8 weights as ``"int8"``, and the activations
# quantized too, per row and per call, so that every eager input (one row, a batched step, a
# prefill) and every compiled step of more than ``COMPILED_GEMV_MAX_ROWS`` rows multiplies int8 by
# int8 in FBGEMM's GEMM (:func:`int8_rows_linear`): 2.3x faster whole decode steps at 8 rows and
# 1.5-2.2x faster prefills than ``"int8"`` on a 2-core AVX2 EPYC (6x384 BPE and 124M shapes), and a
# row gets the same bits alone or batched. The price is accuracy: one 7-bit grid per row over all
# of a layer's inputs is LLM.int8()'s "vector-wise absmax" scheme, which real GPT-2-class models'
# outlier feature channels hurt (measured on a 4 x 384 model, one decode step, logits' relative
# error against fp32: 0.049 against ``"int8"``'s 0.020; with 3 channels of every LayerNorm weight
# at 20x, 0.102 against 0.017). Hence weight-only ``"int8"`` is the default.
# Inside torch.compile on a CPU, up to this many rows use :meth:`Int8Linear._compiled_gemv`
# (inductor's int8 GEMV; it reads the weight once per row, so it is for single-row decode steps).
COMPILED_GEMV_MAX_ROWS = 1
# Inside torch.compile on other devices (CUDA), up to this many rows use
# :meth:`Int8Linear._compiled_reduction`: one fused reduction kernel reading each int8 weight once;
# more rows dequantize, then multiply. Measured on an H200 (torch 2.11, 124M shape, CUDA graphs,
# 200 greedy tokens): at batch 1 the reduction gives 2,053 tokens/s against bf16's 1,900; at batch 8
# inductor's reduction kernel for 8 rows is slow (3,312 against bf16's 12,208; dequantize + matmul
# gave 9,353), so only one-row steps use it.
COMPILED_REDUCTION_MAX_ROWS = 1
# :func:`half_gemv` reads the weight as this many concurrent sequential streams (row r of each
# quarter in turn) rather than one: a single stream of rows reaches ~16 GB/s from memory on a
# 2-core AVX2 EPYC, four reach ~24 (the bf16 50,257 x 384 head: 2.41 -> 1.62 ms; two 1.96,
# eight 1.99), as MKL's fp32 GEMV does with its 8 column streams (~29 GB/s).
GEMV_STREAMS = 4


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``(q, scales)`` with ``weight ≈ q * scales[:, None]``.

    ``q`` is int8 ``(out, in)`` in ``[-127, 127]`` (-128 unused, so the grid is symmetric) and
    ``scales`` fp32 ``(out,)`` is each row's absolute maximum over 127, so the rounding error of
    every weight is at most half a step: ``|weight - q * scale| <= scale / 2``. An all-zero row
    gets scale 1 (its q is 0) instead of a division by zero.
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize_int8 expects a 2-D (out_features, in_features) weight, got shape "
                         f"{tuple(weight.shape)}")
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scales


def _interleave(q: torch.Tensor) -> torch.Tensor:
    """``q`` ``(out, in)`` with its columns in decode order: column ``4k + j`` holds input feature
    ``j * in/4 + k``, so each 32-bit word of a row holds one weight of each quarter of the input."""
    out_features, in_features = q.shape
    return q.view(out_features, 4, in_features // 4).transpose(1, 2).reshape(out_features, in_features)


def _deinterleave(q: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_interleave`: back to input-feature order."""
    out_features, in_features = q.shape
    return q.view(out_features, in_features // 4, 4).transpose(1, 2).reshape(out_features, in_features)


def _in_decode_order(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Activations ``(rows, in)`` permuted (and cast to ``dtype``) like an interleaved weight's
    columns, so ``x' @ q'.T == x @ q.T``: one small copy of the activations, never of the weights."""
    rows, in_features = x.shape
    out = torch.empty((rows, in_features // 4, 4), dtype=dtype or x.dtype, device=x.device)
    out.copy_(x.view(rows, 4, in_features // 4).transpose(1, 2))  # the permutation and the cast in one op
    return out.view(rows, in_features)


class Int8Linear(nn.Module):
    """``y = x @ (q * scales[:, None]).T + bias`` with int8 ``q``: a drop-in, inference-only
    replacement of an ``nn.Linear`` (built with :meth:`from_linear` or :meth:`from_weight`).

    Buffers: ``weight`` int8 ``(out, in)``, ``scales`` fp32 ``(out,)``, ``bias`` (or None) and the
    CPU kernel's bf16 copy of the scales. The output has the input's dtype. When ``in`` is a
    multiple of 4 and the layer is made on a CPU (``interleaved``), ``weight`` holds each row's columns in decode order
    (:func:`_interleave`: word ``k`` of a row holds the weights of inputs ``k, k + in/4, k + in/2,
    k + 3in/4``), a permutation of the same bytes (no extra memory): a compiled decode step then
    reads each word once with one aligned vector load and splits it into 4 weights that multiply
    4 contiguous runs of the activations (see :meth:`_compiled_gemv`). The other paths permute
    the activations instead (a copy of ``in`` numbers per row). :meth:`dequantize` gives the
    weight in the usual order.
    """

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                 dynamic: bool = False) -> None:
        super().__init__()
        if q.dtype != torch.int8 or q.dim() != 2 or scales.shape != (q.size(0),):
            raise ValueError(f"Int8Linear needs an int8 (out, in) weight and (out,) scales, got {q.dtype} "
                             f"{tuple(q.shape)} and {tuple(scales.shape)}")
        self.out_features, self.in_features = q.shape
        self.dynamic = dynamic  # int8 activations too, per row (``quantize("int8-dynamic")``, CPU)
        # The interleaved layout serves the CPU decode kernels; elsewhere (CUDA) the plain order.
        self.interleaved = self.in_features % 4 == 0 and q.device.type == "cpu"
        self.register_buffer("weight", (_interleave(q) if self.interleaved else q).contiguous())
        self.register_buffer("scales", scales.float())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        # The CPU kernel wants scales in the activations' dtype (bf16); made once here.
        self.register_buffer("scales_bf16", self.scales.to(torch.bfloat16), persistent=False)
        # Our AVX2 kernel (cpukernels.py, built at the first CPU int8 layer of the process) for CPU
        # decode steps of up to cpukernels.KERNEL_MAX_ROWS rows; False: torch's kernels (below).
        self.use_kernel = q.device.type == "cpu" and not dynamic and cpukernels.load()

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, dynamic: bool = False) -> Int8Linear:
        """Quantize a float ``(out, in)`` weight (and keep ``bias`` as it is)."""
        q, scales = quantize_int8(weight)
        return cls(q, scales.to(weight.device), bias, dynamic)

    @classmethod
    def from_linear(cls, linear: nn.Linear, dynamic: bool = False) -> Int8Linear:
        return cls.from_weight(linear.weight, linear.bias, dynamic)

    def int8_weight(self) -> torch.Tensor:
        """The int8 weight ``q`` ``(out, in)`` in input-feature order."""
        return _deinterleave(self.weight) if self.interleaved else self.weight

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``q * scales`` that this layer computes with, ``(out, in)``."""
        return self.int8_weight().to(dtype) * self.scales.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        x2 = x.reshape(rows, self.in_features)
        on_cpu = x.device.type == "cpu"
        if (self.use_kernel and on_cpu and 0 < rows <= cpukernels.KERNEL_MAX_ROWS
                and x.dtype in (torch.float32, torch.bfloat16)):
            # Eagerly and inside torch.compile (an op: the compiled step stays one graph).
            y = torch.ops.gpt2model_kernels.int8_linear(x2, self.weight, self.scales, self.bias, self.interleaved)
            return y.view(*x.shape[:-1], self.out_features)
        if on_cpu and self.interleaved and 0 < rows <= COMPILED_GEMV_MAX_ROWS and torch.compiler.is_compiling():
            y = self._compiled_gemv(x2)
        elif not on_cpu and 0 < rows <= COMPILED_REDUCTION_MAX_ROWS and torch.compiler.is_compiling():
            y = self._compiled_reduction(_in_decode_order(x2) if self.interleaved else x2)
        elif on_cpu and self.dynamic and _FBGEMM_INT8:
            y = int8_rows_linear(x2, self.weight, self.scales, self.interleaved, self.bias)
            return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        elif (on_cpu and 0 < rows <= INT8_KERNEL_MAX_ROWS and self.in_features % 8 == 0
                and x.dtype in (torch.float32, torch.bfloat16)):
            # (The kernel crashes for in_features not a multiple of 8, hence that guard.)
            xb = _in_decode_order(x2, torch.bfloat16) if self.interleaved else x2.to(torch.bfloat16).contiguous()
            y = torch._weight_int8pack_mm(xb, self.weight, self.scales_bf16)
            if self.bias is not None and self.bias.dtype == x.dtype:
                # One op instead of two: the add promotes the bf16 product to the bias's (= the
                # input's) dtype exactly, as a separate cast would. Decode pays per op, not per byte.
                return (y + self.bias).view(*x.shape[:-1], self.out_features)
            y = y.to(x.dtype)
        else:
            # Dequantize (in the stored column order), then the matmul. Not ``F.linear(x, q.to(dtype))
            # * scales`` (gpt-fast's form): torch.compile pattern-matches that as weight-only int8 and,
            # with bf16 activations, its lowering fails (torch 2.11-2.13, CPU and CUDA: "AssertionError:
            # Pointwise"), which made every compiled int8 decode on CUDA fall back to eager.
            xs = _in_decode_order(x2) if self.interleaved else x2
            y = F.linear(xs, self.weight.to(x.dtype) * self.scales.to(x.dtype)[:, None])
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def _compiled_gemv(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ (q * scales).T`` for a few rows ``x`` ``(rows, in)``, written for inductor (only
        traced inside ``torch.compile``; eager, it would materialise 4 float copies of the weight).

        Inductor turns it into one vectorized C++ reduction per row that loads 8 words (32 int8
        weights) per AVX2 load, sign-extends each byte with two shifts, converts to fp32 and
        multiplies 4 contiguous 8-wide runs of ``x``, accumulating in fp32: 1 byte read per
        weight, no bf16 rounding of the activations, ~2x the speed of the fp32 GEMV and of
        ``_weight_int8pack_mm`` on an AVX2 CPU (README, Benchmarks). The int8 -> float32 -> int32
        view matters: a direct int8 -> int32 view makes inductor's loads go through a scalar copy
        (4x slower); the float32 view gets its plain vector load.
        """
        rows, quarter = x.size(0), self.in_features // 4
        words = self.weight.view(torch.float32).view(torch.int32)  # (out, in/4): the same bytes
        xq = x.float().view(rows, 4, quarter)
        acc = None
        for j in range(4):  # byte j of every word: arithmetic shifts sign-extend it
            qj = (words >> 24) if j == 3 else ((words << (24 - 8 * j)) >> 24)
            term = xq[:, None, j, :] * qj.float()[None]
            acc = term if acc is None else acc + term
        return (acc.sum(-1) * self.scales).to(x.dtype)

    def _compiled_reduction(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ (q * scales).T`` for a decode step's rows ``x`` ``(rows, in)`` (in the stored
        column order), written for inductor on GPUs (only traced inside ``torch.compile``; eager,
        it would materialise a float ``(out, rows, in)`` product).

        Inductor makes it one Triton reduction over ``in`` per layer, the outputs indexed
        ``(out, row)`` with the row fastest, so the programs that load a weight row serve every
        activation row with it: each int8 weight is read once per step (1 byte instead of bf16's
        2), converted and multiplied in fp32 in registers, the scales applied in the epilogue. No
        dequantized copy of the weight is written, and no matmul is pattern-matched (the
        ``mm(x, q.to(dtype)) * scales`` form's lowering fails on bf16 activations, see forward).
        gpt-fast's int8 weight-only decode is ~1.5x its bf16 for this reason: decode reads weights.
        """
        y = (self.weight.float()[:, None, :] * x.float()[None, :, :]).sum(-1) * self.scales[:, None]  # (out, rows)
        return y.t().to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, int8 per-output-channel"
                + (", int8 activations per row" if self.dynamic else ""))


# --- FBGEMM's int8 x int8 GEMM for decode steps of a few rows (CPU) -------------------------------
# FBGEMM (PyTorch's x86 quantized backend) multiplies uint8 activations by int8 weights with
# vpmaddubsw / vpmaddwd: the int8 x int8 path llama.cpp's q8_0 takes, which no inductor loop can
# emit. It quantizes the activations per call to uint8 over their range, and on AVX2 without VNNI
# a pair of full 8-bit products overflows vpmaddubsw's int16 sums (measured: an 8-bit activation
# grid is off by 0.07 on outputs of std 0.4); :func:`int8_rows_linear` keeps them to [0, 128].
_FBGEMM_INT8 = "fbgemm" in torch.backends.quantized.supported_engines and \
    hasattr(torch, "fbgemm_linear_int8_weight_fp32_activation") and hasattr(torch, "fbgemm_pack_quantized_matrix")
# FBGEMM's packed weights: id(weight) -> (weak reference to the weight, the state it was packed
# in, the packed copy). Kept beside the weights, not on the layers, so that the ops below (all a
# compiled graph can call) find them from the weight tensor alone.
_FBGEMM_PACKED: dict[int, tuple[weakref.ref, tuple[int, ...], object]] = {}


def _packed_copy(weight: torch.Tensor, state: tuple[int, ...], pack: Callable[[], object]) -> object:
    """The packed copy of ``weight`` made by ``pack()``, made at the first call and kept while the
    weight lives and ``state`` (versions and addresses of what it was made from:
    ``Tensor._version`` counts in-place writes) is unchanged. Another copy of the weights in
    memory, for the layers that run these kernels."""
    key = id(weight)
    entry = _FBGEMM_PACKED.get(key)
    if entry is not None and entry[0]() is weight and entry[1] == state:
        return entry[2]
    packed = pack()
    if entry is None or entry[0]() is not weight:
        weakref.finalize(weight, _FBGEMM_PACKED.pop, key, None)  # the packed copy goes with the weight
    _FBGEMM_PACKED[key] = (weakref.ref(weight), state, packed)
    return packed


def _fbgemm_packed(weight: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FBGEMM's packed copy of an int8 ``weight`` ``(out, in)`` (stored :func:`_interleave`-d when
    ``interleaved``), its rows' sums and a zero bias: the arguments of
    ``torch.fbgemm_linear_int8_weight_fp32_activation`` (see :func:`_packed_copy`)."""
    def pack() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = (_deinterleave(weight) if interleaved else weight).contiguous()
        with warnings.catch_warnings():  # deprecated in torch 2.13 (like Fp16Linear's pair); warned once, here
            warnings.simplefilter("ignore", UserWarning)
            packed = torch.fbgemm_pack_quantized_matrix(q)
            row_sums = q.sum(dim=1, dtype=torch.int32)
            zeros = torch.zeros(q.size(0))
            torch.fbgemm_linear_int8_weight_fp32_activation(torch.zeros(1, q.size(1)), q, packed, row_sums, 1.0, 0,
                                                            zeros)
        return packed, row_sums, zeros

    return _packed_copy(weight, (weight._version,), pack)


_LIBRARY = torch.library.Library("gpt2model", "DEF")  # the op below, for torch.compile
_LIBRARY.define("int8_gemm_fbgemm(Tensor x, Tensor weight, Tensor scales, bool interleaved) -> Tensor")


def _int8_gemm_fbgemm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, interleaved: bool) -> torch.Tensor:
    # The aten op rather than ``torch.ops.quantized.linear_dynamic`` (per-channel scales, but a
    # TorchScript-class call: 121 vs 55 us per one-row 1152 x 384 call, 172 vs 99 at 8 rows). It
    # takes one weight scale: 1, and the rows' scales multiply its output. (``weight`` gives it
    # the shape only.)
    packed, row_sums, zeros = _fbgemm_packed(weight, interleaved)
    return torch.fbgemm_linear_int8_weight_fp32_activation(x, weight, packed, row_sums, 1.0, 0, zeros).mul_(scales)


_LIBRARY.impl("int8_gemm_fbgemm", _int8_gemm_fbgemm, "CPU")
# An op, not a Python call, so that a compiled decode step stays one graph (the packed weight is
# no tensor dynamo could trace); its shape function:
torch.library.register_fake("gpt2model::int8_gemm_fbgemm", lib=_LIBRARY)(
    lambda x, weight, scales, interleaved: x.new_empty(x.size(0), weight.size(0)))


def int8_rows_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, interleaved: bool,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (q * scales).T + bias`` in fp32 for a few rows ``x`` ``(rows, in)`` on a CPU, by
    FBGEMM's int8 x int8 GEMM (eager and inside ``torch.compile``, as the op
    ``gpt2model::int8_gemm_fbgemm``).

    Each row's activations are quantized on their own grid: the row is divided by its absolute
    maximum and FBGEMM quantizes the rows together with one extra row holding +3 and -1, so its
    per-call range is always [-1, 3], whatever the other rows hold (FBGEMM scales the whole call
    by one range: without this a request's tokens would depend on its neighbours' values); the
    products are multiplied back by each row's maximum. On that range's 8-bit grid (step 4/255,
    zero at 64) a row's values land in [0, 128], so no pair of products overflows vpmaddubsw's
    int16 sums (128 * 127 * 2 < 2^15). So a row's result is bit-for-bit the same alone or in any
    batch (tested), on a 7-bit grid of its own range (~1.5% relative error of the
    product on random data, on top of the weights' int8 rounding; decode-path perplexity of a
    trained character model within 0.01% of fp32, greedy tokens unchanged).

    Measured (2-core AVX2 EPYC, 1 thread, 6x384 BPE model, whole decode steps, interleaved): at 8
    rows 16.9 -> 7.3 ms compiled, 18.3 -> 9.5 ms eager (the head 50,257 x 384: 8.2 ms with
    ``_weight_int8pack_mm``, 2.4 with FBGEMM); prefills (time to the first token, eager) of 64 /
    200 tokens 34 / 85 -> 23 / 55 ms, on the 124M shape 242 / 555 -> 109 / 319 ms (against
    dequantize + GEMM); at one row FBGEMM is slower (a fixed ~20 us per call: 4.3 vs 3.2 ms per
    compiled step), so compiled one-row steps keep inductor's GEMV (:class:`Int8Linear`)."""
    rows, in_features = x.shape
    x = x.detach().float()
    # (Eagerly each op is a dispatch of several us, 25 linears a step: few ops, in place where possible.)
    amax = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True).clamp_min_(torch.finfo(torch.float32).tiny)
    if torch.compiler.is_compiling():
        gemm, span = torch.ops.gpt2model.int8_gemm_fbgemm, _span_row(in_features, x.device)
    else:  # the constant row is made once
        gemm, span = _int8_gemm_fbgemm, _cached_span_row(in_features, x.device)
    y = gemm(torch.cat([x / amax, span]), weight, scales, interleaved)[:rows].mul_(amax)
    return y if bias is None else y.add_(bias)


_SPAN_ROWS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _span_row(in_features: int, device: torch.device) -> torch.Tensor:
    """``(1, in_features)``: +3, zeros, -1 (see :func:`int8_rows_linear`)."""
    span = torch.zeros(1, in_features, device=device)
    span[0, 0], span[0, -1] = 3.0, -1.0
    return span


def _cached_span_row(in_features: int, device: torch.device) -> torch.Tensor:
    key = (in_features, device)
    if key not in _SPAN_ROWS:
        _SPAN_ROWS[key] = _span_row(in_features, device)
    return _SPAN_ROWS[key]


# Fp16Linear's CPU GEMM: FBGEMM's fp16-weight kernel through aten's plain op pair
# (``fbgemm_pack_gemm_matrix_fp16`` / ``fbgemm_linear_fp16_weight_fp32_activation``) rather than
# ``torch.ops.quantized.linear_dynamic_fp16``: the same kernel and bit-identical results, but the
# quantized op's TorchScript-class (boxed) call costs ~25 us more per call (8 x 384 -> 1152 at 1
# thread: 81 vs 110 us; a decode step makes 25 such calls). torch 2.13 marks the aten pair
# deprecated, so the quantized op remains the path where a torch lacks it.
_ATEN_FP16_GEMM = hasattr(torch, "fbgemm_linear_fp16_weight_fp32_activation") and \
    hasattr(torch, "fbgemm_pack_gemm_matrix_fp16")


def _fp16_gemm_fbgemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` in fp32 by FBGEMM's fp16-weight GEMM (``x`` fp32 ``(rows, in)``,
    ``weight`` fp16, ``bias`` fp32 or None), on the weight's packed copy (:func:`_packed_copy`)."""
    def pack() -> object:
        if not _ATEN_FP16_GEMM:
            return torch.ops.quantized.linear_prepack_fp16(weight.float(), None)
        with warnings.catch_warnings():  # deprecated in torch 2.13 (see _ATEN_FP16_GEMM); warned once, here
            warnings.simplefilter("ignore", UserWarning)
            packed = torch.fbgemm_pack_gemm_matrix_fp16(weight.float())
            torch.fbgemm_linear_fp16_weight_fp32_activation(torch.zeros(1, weight.size(1)), packed, None)
        return packed

    packed = _packed_copy(weight, (weight._version, weight.data_ptr()), pack)
    if _ATEN_FP16_GEMM:
        return torch.fbgemm_linear_fp16_weight_fp32_activation(x, packed, bias)
    y = torch.ops.quantized.linear_dynamic_fp16(x, packed)
    return y if bias is None else y + bias


_LIBRARY.define("fp16_gemm_fbgemm(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_LIBRARY.impl("fp16_gemm_fbgemm", _fp16_gemm_fbgemm, "CPU")
torch.library.register_fake("gpt2model::fp16_gemm_fbgemm", lib=_LIBRARY)(
    lambda x, weight, bias: x.new_empty(x.size(0), weight.size(0)))


class Fp16Linear(nn.Module):
    """``y = x @ w.T + bias`` with the weight ``w`` stored in float16 and everything else in
    float32 (activations, accumulation, bias, output): llama.cpp's ``f16`` on a CPU. A drop-in,
    inference-only replacement of an ``nn.Linear`` (:meth:`from_linear`).

    On a CPU the matmul is FBGEMM's fp16 GEMM (``torch.ops.quantized.linear_dynamic_fp16``, the
    weight prepacked once in fp16 and widened to fp32 in registers): half the bytes of an fp32
    weight and, at the few rows of a decode step, a faster kernel than the fp32 ones (6x384 BPE,
    1 thread: the 50,257-row head at 8 rows 5.7 ms vs 9.8 ms oneDNN-packed fp32; whole decode step
    at 8 rows 15.2 vs 22.0 ms, at 1 row 7.4 vs 10.3; a 40-token prefill 19.6 vs 25.3). The
    rounding is the weights' alone (relative 2^-11; logits within ~6e-4 of fp32): no activation
    is quantized, so a row's result depends on no other row's values (FBGEMM's W8A8 int8 GEMM
    scales the activations per call; :func:`int8_rows_linear` gives each row its own scale).
    Inside ``torch.compile`` the same GEMM runs as an op (``gpt2model::fp16_gemm_fbgemm``), except
    for one-row steps (:func:`half_gemv`); on other devices (CUDA) it computes ``F.linear`` with the
    weight widened to the input's dtype. Buffers: ``weight`` fp16 ``(out, in)``, ``bias`` (or
    None); the packed copy (:func:`_packed_copy`) is rebuilt when the weight changes.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"Fp16Linear needs an (out, in) weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach().to(torch.float16).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Fp16Linear:
        """The layer of a float ``(out, in)`` weight, stored in float16 (``bias`` kept in float32)."""
        return cls(weight, bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp16Linear:
        return cls.from_weight(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if torch.compiler.is_compiling() and x.numel() == self.in_features:
            return half_gemv(x, self.weight, self.bias)  # a compiled one-row decode step: inductor's fp16 GEMV
        # FBGEMM's fp16 GEMM, eagerly or (as an op) inside a compiled step of several rows, where
        # ``F.linear`` of the weight widened to fp32 would widen the whole weight every step (80
        # ms per 8-row step of the 6x384 BPE model; 12 with the op).
        gemm = torch.ops.gpt2model.fp16_gemm_fbgemm if torch.compiler.is_compiling() else _fp16_gemm_fbgemm
        y = gemm(x.reshape(-1, self.in_features).float(), self.weight, self.bias)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"float16 weight, float32 math"


def half_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for one row ``x`` ``(..., in)`` and a bf16 or fp16 ``weight``
    ``(out, in)``, written for inductor (only traced inside ``torch.compile`` on a CPU: eagerly it
    would make fp32 copies of the weight). Inductor turns it into one vectorised loop per output
    that reads 2 bytes per weight, widens them to fp32 in registers, multiplies the fp32
    activations and accumulates in fp32; output in ``x``'s dtype (rounded once, from the fp32 sum).

    The activations are stored in fp32 once, before the loop (an identity ``as_strided`` makes
    inductor materialise them): inlined instead, a cheap producer (a layer norm's affine part)
    would be recomputed, or a bf16 row re-widened, once per output row inside the loop (bf16 6x384
    BPE decode: 14.4 ms per token recomputed, 6.5 with bf16 stored, see below for fp32 stored).

    bf16 (a contiguous weight, ``in`` even): each 32-bit word of a row holds two weights, and a
    bf16 is the top half of its fp32, so ``word << 16`` is the even weight and ``word & 0xFFFF0000``
    the odd one, exactly, in fp32: two integer ops per 16 weights instead of inductor's widening
    (zero-extend + shift per half, shuffle-bound on AVX2); the activations are stored split into
    their even and odd features to match. fp16 widens with F16C (one instruction per 8 weights).
    The rows are read as ``GEMV_STREAMS`` interleaved sequential streams (an index the loop reads
    rows through; the output is put back in order after), which streams memory ~1.5x faster than
    one stream. The bf16 50,257 x 384 head on a 2-core AVX2 EPYC, 1 thread: 3.75 ms (bf16
    activations widened in the loop) -> 2.57 (fp32 activations) -> 2.09 (the bit split) -> 1.62
    (4 streams); fp16 2.60 -> 2.04 with 4 streams. Whole bf16 6x384 BPE decode step: 6.4 -> 3.8 ms."""
    out_features, in_features = weight.shape
    shape = (*x.shape[:-1], out_features)
    # The rows in stream order: row r of each of the GEMV_STREAMS equal parts of the weight in
    # turn (the last part padded by repeating the last row); the loop reads them through this index.
    parts = GEMV_STREAMS if out_features >= GEMV_STREAMS else 1
    per_part = -(-out_features // parts)
    rows = torch.arange(per_part * parts, device=weight.device)
    rows = ((rows % parts) * per_part + rows // parts).clamp(max=out_features - 1)
    if weight.dtype == torch.bfloat16 and weight.is_contiguous() and in_features % 2 == 0:
        # (1, 2, in/2): the even features, then the odd ones, in fp32.
        xs = x.reshape(1, in_features // 2, 2).transpose(1, 2).float().contiguous()
        xs = torch.as_strided(xs, xs.size(), xs.stride())
        words = weight.view(torch.float32).view(torch.int32)[rows]  # (rows, in/2): the same bytes
        even = (words << 16).view(torch.float32)
        odd = (words & -65536).view(torch.float32)  # 0xFFFF0000: the high half of each word
        y = (xs[:, 0, None, :] * even[None] + xs[:, 1, None, :] * odd[None]).sum(-1)
    else:
        xs = x.reshape(1, in_features).float()
        xs = torch.as_strided(xs, xs.size(), xs.stride())
        y = (xs.unsqueeze(-2) * weight[rows].float()).sum(-1)
    # Back to output order: (per_part, parts) -> (parts, per_part), the padding dropped.
    y = y.view(per_part, parts).t().reshape(-1)[:out_features]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(shape)


def weights_dtype(name: str) -> tuple[torch.dtype, str | None]:
    """``(dtype to load the weights in, quantization to apply after or None)`` for a ``--dtype``
    name: ``"bfloat16"`` -> ``(torch.bfloat16, None)``, ``"int8"`` -> ``(torch.float32, "int8")``."""
    if name not in WEIGHT_DTYPES:
        raise ValueError(f"unknown weights dtype {name!r}; choose one of {', '.join(WEIGHT_DTYPES)}")
    if name in QUANTIZATION_MODES:
        return torch.float32, name
    return getattr(torch, name), None


def quantize(model: GPT, mode: str = "int8", head: bool | None = None) -> GPT:
    """Quantize ``model`` in place (every linear of the blocks and, see ``head``, the LM head) and
    return it.

    ``mode``: ``"int8"`` (weight-only, per-output-channel symmetric; see :class:`Int8Linear`),
    ``"int8-dynamic"`` (the same weights, and int8 activations per row on a CPU: faster batched
    steps and prefills, less accurate; see ``QUANTIZATION_MODES``' comment) or ``"f16"`` (float16
    weights, float32 math, for CPUs: see :class:`Fp16Linear`; needs PyTorch's
    FBGEMM, i.e. an x86 build, and a float32 model on the CPU).
    ``head``: quantize the LM head too (``True``), keep it in the model's float dtype (``False``),
    or ``None`` (default): quantize it where it holds at least ``HEAD_MIN_SHARE`` of the linear
    weights, i.e. where it matters for decode speed (GPT-2's 50,257-id head: 31% of the 124M
    model's linear weights, 65% of a 6 x 384 model's), and keep it float where it is small (a
    character vocabulary: 0.2% of the seed model). The output layer is the most sensitive to
    rounding, since near-tied logits flip the greedy token (HF's quantizers skip ``lm_head``
    altogether): on a seed model trained 300 steps, an int8 head changed the greedy text at the
    7th token (an fp32 top-2 margin of 0.012) while int8 body layers alone kept all of the first 50.
    The model is put in eval mode and any KV cache is kept. Quantizing twice is an error.
    """
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(QUANTIZATION_MODES)}")
    if is_quantized(model):
        raise ValueError("the model is already quantized; load the float model again to quantize it differently")
    if mode == "f16":
        if model.device.type != "cpu" or model.dtype != torch.float32:
            raise ValueError(f"f16 (float16 weights, float32 math) is a CPU format for a float32 model, got a "
                             f"{model.dtype} model on {model.device}: on a GPU use dtype float16 or bfloat16")
        if "fbgemm" not in torch.backends.quantized.supported_engines:
            raise ValueError("f16 needs PyTorch's FBGEMM fp16 kernels (x86 builds), which this PyTorch lacks: "
                             "use float32 or int8")
    if mode == "int8-dynamic" and (model.device.type != "cpu" or not _FBGEMM_INT8):
        raise ValueError(f"int8-dynamic (int8 activations in FBGEMM's GEMM) is a CPU format for x86 builds of "
                         f"PyTorch, got a model on {model.device}"
                         f"{'' if _FBGEMM_INT8 else ' and a PyTorch without FBGEMM'}: use int8 (weight-only)")
    def make(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        if mode == "f16":
            return Fp16Linear.from_weight(weight, bias)
        return Int8Linear.from_weight(weight, bias, dynamic=mode == "int8-dynamic")

    model.eval()
    body = 0
    for block in model.transformer.h:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    body += child.weight.numel()
                    setattr(parent, name, make(child.weight, child.bias))
    if head is None:
        head_size = model.lm_head.weight.numel()
        head = head_size >= HEAD_MIN_SHARE * (head_size + body)
    if head:
        # The head is tied to the token embedding: quantize a copy for the head and leave the
        # embedding (a lookup, one row per token) in full precision.
        model.lm_head = make(model.lm_head.weight, model.lm_head.bias)
    return model


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of ``model`` holds quantized weights."""
    return any(isinstance(m, (Int8Linear, Fp16Linear)) for m in model.modules())


# From this many rows a decode step's fp32 LM head runs on a oneDNN-packed copy of its weight
# (the 50,257 x 768 head at 2 / 4 / 8 / 16 rows: 12 / 16 / 20 / 30 ms instead of 15 / 26 / 31 / 43
# ms column-major; at one row column-major wins, 7.2 vs 9.4-10.4 ms).
PACKED_HEAD_MIN_ROWS = 2
# ... for heads of at least this many rows (measured at 50,257; a small head gains nothing worth a copy).
PACKED_HEAD_MIN_OUT = 16384


# A narrowing fp32 matrix (fewer outputs than inputs: the MLP's down projection) decodes faster
# row-major for caches of up to this many rows, column-major from more (MKL GEMV, 1 thread,
# each call streaming its weight from memory: 384 x 1,536 at 1 / 2 / 8 rows 103 / 178 / 272 us
# row-major vs 169 / 252 / 270 column-major; 768 x 3,072 at 1 / 8 rows 407 / 1,373 vs 578 / 1,271).
NARROW_ROW_MAJOR_MAX_ROWS = 2


# One-row fp32 CPU decode steps multiply every linear in our GEMV (``gpt2model_kernels::f32_linear``,
# :mod:`gpt2model.cpukernels`: 4 row streams, fp32 FMA) on row-major weights where the kernels are
# built, which beats MKL's GEMV in either layout there (2-core AVX2 EPYC, 1 thread, each weight
# streamed from memory, us: 1152x384 84-91 vs 104-127 column-major, 384x384 34-36 vs 60-71,
# 1536x384 120-124 vs 145-174, 384x1536 111-115 vs 131-161 row-major, 2304x768 338-354 vs 341-444,
# 768x3072 436-447 vs 472-555; the 50,257 x 384 head 3.5-3.8 ms vs 3.9-4.4 column-major).

def decode_layout_is_column_major(device: torch.device, dtype: torch.dtype, shape: tuple[int, ...] | None = None,
                                  rows: int = 1) -> bool:
    """Whether a float ``nn.Linear`` weight of ``shape`` ``(out, in)`` decodes faster stored
    column-major (``W.t()`` contiguous) on ``device`` in ``dtype`` for steps of up to ``rows``
    rows: fp32 on CPU (see the module docstring), except a narrowing matrix (``out < in``) at
    ``rows <= NARROW_ROW_MAJOR_MAX_ROWS`` and, where our CPU kernels run, every matrix at one row
    (our fp32 GEMV reads row-major). Elsewhere the
    usual row-major layout (cuBLAS reads both at full speed; CPU bf16 kernels want row-major,
    4-10x faster)."""
    if device.type != "cpu" or dtype != torch.float32:
        return False
    if shape is not None and rows <= 1 and cpukernels.load():
        return False  # one-row steps: our fp32 GEMV (model.linear), which reads row-major weights
    return shape is None or shape[0] >= shape[1] or rows > NARROW_ROW_MAJOR_MAX_ROWS


class PackedHead:
    """A oneDNN-packed copy of an fp32 CPU LM head weight for decode steps of several rows (made
    by :func:`prepare_decode` for a cache of ``>= PACKED_HEAD_MIN_ROWS`` rows; one extra copy of
    the head's weight in memory, 154 MB for GPT-2's). It remembers which weight and which version
    of it (``Tensor._version`` counts in-place writes, e.g. ``load_state_dict``) it copied:
    :meth:`matches` is False once the weight changed, and the model then uses the head itself."""

    def __init__(self, weight: torch.Tensor, rows: int) -> None:
        self.weight, self.rows = weight, rows
        self.version = weight._version
        self.data_ptr = weight.data_ptr()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows)

    def __reduce__(self) -> tuple:
        # A packed tensor has no storage to copy: deepcopy/pickle pack the (copied) weight again.
        return PackedHead, (self.weight, self.rows)

    def matches(self, weight: torch.Tensor) -> bool:
        return weight is self.weight and weight._version == self.version and weight.data_ptr() == self.data_ptr

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


def packed_head_logits(model: GPT, x: torch.Tensor) -> torch.Tensor | None:
    """The LM head of ``x`` ``(B, T, d)`` on the model's :class:`PackedHead` when it applies (a live
    cache, eager code, at least ``PACKED_HEAD_MIN_ROWS`` rows, the weight unchanged), else None."""
    packed = getattr(model, "_packed_head", None)
    if packed is None or torch.compiler.is_compiling() or x.numel() < PACKED_HEAD_MIN_ROWS * x.size(-1):
        return None
    head = model.lm_head
    if not isinstance(head, nn.Linear) or head.bias is not None or not packed.matches(head.weight) \
            or x.dtype != torch.float32:
        return None
    return packed(x)


def prepare_decode(model: GPT, batch_size: int = 1) -> None:
    """Store the decode weights of ``model`` in their fastest layouts for steps of up to
    ``batch_size`` rows, until :func:`restore_layout` (``GPT.setup_cache`` of an eval-mode model
    and ``GPT.train()`` call the two). Measured per matrix, rows and dtype (``python
    bench/bench_decode.py --matmuls``, README):

    * fp32 on CPU, a one-row cache, our kernels built: every weight stays row-major for our fp32
      GEMV (see the comment above ``decode_layout_is_column_major``).
    * fp32 on CPU otherwise: every linear weight is re-laid column-major in place (values, shape,
      ``Parameter`` and the tie to the embedding unchanged; only the strides move; no second
      copy): 1.7x faster for the 50,257-row head at one row, 1.1-1.5x for the widening body
      matrices (QKV, MLP up), measured one by one streaming from memory; a narrowing matrix (the
      MLP's down projection) stays row-major for caches of up to ``NARROW_ROW_MAJOR_MAX_ROWS``
      rows (1.4-1.6x faster at one row; a tie or slower at 8). For
      caches of ``PACKED_HEAD_MIN_ROWS`` rows or more a oneDNN-packed copy of the head is added
      (:class:`PackedHead`, one extra copy of the head) for steps of that many rows.
    * bf16, other devices: the usual row-major layout everywhere.
    * int8 (:class:`Int8Linear`): its interleaved layout, made at quantisation.

    Nothing is done per step, and nothing when the layout is already right.
    """
    relaid = getattr(model, "_decode_relaid", [])
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        w = module.weight
        column_major = decode_layout_is_column_major(w.device, w.dtype, tuple(w.shape), batch_size)
        if column_major and w.is_contiguous() and min(w.shape) > 1:
            with torch.no_grad():
                # .data swaps the storage under the same Parameter (optimizer state, ties and
                # references stay valid); the tied embedding sees the same storage.
                w.data = w.data.t().contiguous().t()
            if not any(w is r for r in relaid):
                relaid.append(w)
        elif not column_major and not w.is_contiguous() and any(w is r for r in relaid):
            with torch.no_grad():
                w.data = w.data.contiguous()  # re-laid for a cache of more rows before: row-major again
    model._decode_relaid = relaid
    head = model.lm_head
    if not isinstance(head, nn.Linear) or not decode_layout_is_column_major(head.weight.device, head.weight.dtype):
        return
    w = head.weight
    packed = getattr(model, "_packed_head", None)
    if batch_size >= PACKED_HEAD_MIN_ROWS and w.size(0) >= PACKED_HEAD_MIN_OUT and head.bias is None \
            and torch.backends.mkldnn.is_available() and (packed is None or not packed.matches(w)):
        model._packed_head = PackedHead(w, batch_size)


def restore_layout(model: GPT) -> None:
    """Undo :func:`prepare_decode`: the weights it re-laid are row-major (contiguous) again, so a
    model that goes on training after generating sees exactly the tensors it had before, and the
    packed copy of the head is dropped."""
    for w in getattr(model, "_decode_relaid", []):
        with torch.no_grad():
            w.data = w.data.contiguous()
    model._decode_relaid = []
    model._packed_head = None
