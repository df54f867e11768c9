"""Device and precision: which device to compute on, in which dtype, with TF32 or not, and the
measured matmul peak that MFU divides by.

One place for these choices, used by training, sampling, evaluation and the benchmarks. TF32 is an
explicit argument: training turns it on (a 10-bit mantissa is fine for gradient steps); sampling and
evaluation leave it off, so ``--dtype float32`` there means true fp32 matmuls.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from dataclasses import dataclass

import torch

DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclass
class DeviceSetup:
    """Where and in which precision to compute. ``dtype`` is the autocast dtype; float32 means plain
    fp32 (no autocast). Weights and optimizer state always stay fp32."""

    device: torch.device
    dtype: torch.dtype

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context to run forward passes (and the loss) in."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """fp16's narrow exponent range needs loss scaling; for bf16/fp32 the scaler is a no-op."""
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: cuda, then mps, then cpu; under torchrun a bare ``cuda`` is GPU ``LOCAL_RANK``.
    A device that is asked for but absent is an error naming the fix."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but no CUDA GPU is visible; use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' asked for, but MPS is not available; use --device cpu")
    return dev


def setup_device(device: str = "auto", dtype: str = "auto", *, tf32: bool = False) -> DeviceSetup:
    """The device (see :func:`resolve_device`) and the compute dtype (``auto``: bf16 on GPUs that
    have it, fp16 on older GPUs, fp32 elsewhere). ``tf32=True`` lets CUDA run the remaining fp32
    matmuls on TF32 tensor cores; only training asks for it."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    if dtype == "auto":
        if dev.type == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "float32"
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto or one of {', '.join(DTYPE_NAMES)}")
    if dtype == "float16" and dev.type != "cuda":
        raise ValueError("float16 training needs a CUDA GPU (it relies on a grad scaler); use --dtype bfloat16 "
                         "or float32 on this device")
    if dtype == "bfloat16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU has no bfloat16 support; use --dtype float16")
    return DeviceSetup(dev, getattr(torch, dtype))


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (for timing); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure_matmul_peak(dtype: torch.dtype, device: str | torch.device) -> float:
    """Peak matmul FLOP/s of this device for a run computing in ``dtype``, measured with a short
    square-matmul probe and cached per (dtype, device) for the life of the process.

    A measured peak, not a datasheet number, is what MFU divides by here: it works on any CPU or
    GPU, and on a shared CPU it reflects the cores this process actually gets. For bf16/fp16 it is
    the faster of that dtype's probe and fp32's: a CPU without bf16 matmul units runs bf16 through
    fp32 arithmetic, and its bf16 kernels reach different speeds at different sizes (on a 2-core
    AVX2 EPYC: 2.5 GFLOP/s at n = 64, 1 GFLOP/s at n = 512, fp32 66 GFLOP/s), so the bf16 probe
    alone is no peak and training logged an MFU of 160%. On GPUs the bf16 probe is the larger."""
    dev = str(torch.device(device))
    fp32 = _matmul_peak(torch.float32, dev)
    return max(fp32, _matmul_peak(dtype, dev)) if dtype in (torch.bfloat16, torch.float16) else fp32


@functools.cache
def _matmul_peak(dtype: torch.dtype, device: str) -> float:
    dev = torch.device(device)
    # Big enough to reach the BLAS kernel's steady state (1024^2 reads ~40% low on a CPU), but no
    # bigger than one matmul taking ~0.2 s: a dtype without fast kernels here (bf16 on a CPU
    # without AVX512-BF16 runs at ~0.5 GFLOP/s) would otherwise make the probe take minutes.
    n_max = 2048 if dev.type == "cpu" else 4096
    n = 256
    while True:
        # Constant inputs: matmul speed doesn't depend on the values, and no RNG stream is consumed.
        a = torch.full((n, n), 0.5, dtype=dtype, device=dev)
        a @ a  # warm up kernels / thread pools
        synchronize(dev)
        start = time.perf_counter()
        a @ a
        synchronize(dev)
        if n >= n_max or time.perf_counter() - start >= 0.2:
            break
        n *= 2
    # Best of several short timings: a peak is what the hardware can do, and on a shared machine
    # the best sample is the one least disturbed by other processes.
    best, deadline = 0.0, time.perf_counter() + 1.0
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(2):
            a @ a
        synchronize(dev)
        best = max(best, 2 * 2 * n**3 / (time.perf_counter() - start))
    return best
