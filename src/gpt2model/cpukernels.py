"""Hand-written CPU decode kernels (``cpukernels.cpp``), built at first use and loaded as torch ops.

What: ``torch.ops.gpt2model_kernels.int8_linear`` — the int8 weight-only linear of a decode step's
few rows on x86 CPUs with AVX2 + FMA (each activation row on its own 15-bit integer grid, int8 x
int16 products summed exactly in integers, 4 weight streams; the source's header says why).
:class:`~gpt2model.quantize.Int8Linear` calls it for CPU inputs of up to ``KERNEL_MAX_ROWS`` rows,
eagerly and inside ``torch.compile`` (an op with a fake implementation: the compiled step stays
one graph, and inductor's C++ wrapper calls it through the dispatcher). And
``gpt2model_kernels::f32_linear``, an fp32 GEMV on row-major weights (4 streams, FMA) that
``model.linear`` runs for one-row fp32 decode steps (see ``quantize.decode_layout_is_column_major``).

How it is built (decided by measuring, 2-core AVX2 EPYC, torch 2.13, g++ 12):

* A C++ ``TORCH_LIBRARY`` op compiled against torch's headers, not a plain C ABI library called
  through ``ctypes`` from a Python ``custom_op``: a decode step makes ~25 of these calls, and
  per call (25 chained calls on a 16 x 16 weight, 1 thread, process time, a loaded machine) the
  C++ op costs 8.4 us eagerly and 11.1 us inside a compiled step (inductor's C++ wrapper calls it
  through ``aoti_torch_call_dispatcher``), a Python ``custom_op`` doing nothing at all 22.5 and
  28.9 us (the wrapper takes the GIL and calls back into Python), before any ``ctypes`` call:
  ~0.45 ms more per decode step of ~3 ms. ``at::parallel_for`` also gives the kernel torch's own
  thread pool (it honors ``torch.set_num_threads``; calls under 4 MB of weights x rows stay on one
  thread, see ``SERIAL_BELOW_BYTES`` in the source). The price is the first build: ~10-12 s once
  per machine and torch version (a plain C file would take ~1 s).
* Nothing at install time (the package stays pure Python; no build dependency): the first
  :func:`load` compiles the source with the machine's C++ compiler (``$CXX``, else ``g++`` /
  ``c++`` / ``clang++``: inductor's CPU backend needs one anyway) straight to a shared object,
  without ninja or ``torch.utils.cpp_extension`` (ninja is not a dependency of this package).
* Cached in ``$XDG_CACHE_HOME/gpt2model/kernels`` (``~/.cache/...``; a temporary directory if that
  is not writable) under a name made of the hash of the source, the flags, the compiler and the
  torch version, so a changed source or a new torch builds anew; written to a temporary name and
  renamed into place, so two processes building at once both end up loading a complete file.
* Off where it cannot run: ``GPT2MODEL_CPU_KERNELS=0``, a CPU without AVX2 (torch's
  ``get_cpu_capability()``), a non-x86-64 machine, or a failed build (no compiler, headers
  missing): then :func:`load` returns False, warns once saying why, and the callers use torch's
  kernels (``Int8Linear``'s other paths) with unchanged results up to rounding.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

# Decode steps of up to this many rows use the kernel (it reads each weight once per call, and
# from L1 again for each further pair of rows: a GEMV kernel, not a GEMM for prefills).
KERNEL_MAX_ROWS = 16
ENV_SWITCH = "GPT2MODEL_CPU_KERNELS"
# The whole-step op (``gpt2model_kernels::decode_step``, see model.GPT._fused_decode) on or off
# within the kernels: ``GPT2MODEL_CPU_FUSED_STEP=0`` keeps the per-layer ops (benchmarks compare
# the two; tests switch it with :data:`fused_step`; read at each step).
FUSED_ENV_SWITCH = "GPT2MODEL_CPU_FUSED_STEP"
_OFF = ("0", "false", "no", "off")
fused_step = os.environ.get(FUSED_ENV_SWITCH, "1").strip().lower() not in _OFF
SOURCE = Path(__file__).with_name("cpukernels.cpp")
# -O2 (see cpukernels.cpp's dot_chunk: -O3 spilled accumulators to the stack) and the ISA the
# kernel is written for; C++20 because torch 2.13's headers use it.
CXX_FLAGS = ["-O2", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-std=c++20", "-shared", "-fPIC", "-w", "-DNDEBUG"]

_state: dict[str, object] = {}  # "ok": bool, "why": str (why not), "path": the shared object


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cache_dir() -> Path:
    """Where built kernels are kept: ``$XDG_CACHE_HOME/gpt2model/kernels`` (default ``~/.cache``),
    or a per-user temporary directory where that is not writable."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for folder in (Path(base) / "gpt2model" / "kernels",
                   Path(tempfile.gettempdir()) / f"gpt2model-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            return folder
        except OSError:
            continue
    raise OSError("no writable directory for the CPU kernels (tried $XDG_CACHE_HOME and the temporary directory)")


def _build_flags(torch_dir: Path) -> list[str]:
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    return [*CXX_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            f"-I{torch_dir / 'include'}", f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
            f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}"]


def _unsupported() -> str | None:
    """Why this machine cannot run the kernels, or None."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in _OFF:
        return f"{ENV_SWITCH}=0"
    if platform.machine().lower() not in ("x86_64", "amd64") or not sys.platform.startswith("linux"):
        return f"they are written for x86-64 Linux, this is {platform.machine()} {sys.platform}"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"this CPU lacks AVX2/FMA (torch's CPU capability: {capability})"
    return None


def build() -> Path:
    """The kernels' shared object: from the cache, or compiled now (see the module docstring)."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    torch_dir = Path(torch.__file__).parent
    flags = _build_flags(torch_dir)
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), cxx.encode(),
                                     torch.__version__.encode()])).hexdigest()[:16]
    folder = cache_dir()
    target = folder / f"cpukernels-{key}.so"
    if target.exists():
        return target
    partial = folder / f".cpukernels-{key}.{os.getpid()}.tmp.so"
    try:
        run = subprocess.run([cxx, str(SOURCE), "-o", str(partial), *flags], capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"{Path(cxx).name} failed to build {SOURCE.name}:\n{run.stderr[-2000:]}")
        os.replace(partial, target)  # atomic: a concurrent build's reader sees the old name or a whole file
    finally:
        partial.unlink(missing_ok=True)
    return target


def load() -> bool:
    """Make the ops available (building them at the first call of the process if needed); False,
    with one warning per process saying why, where they cannot be (the callers then use torch's
    kernels). Cheap after the first call."""
    if "ok" in _state:
        return bool(_state["ok"])
    why = _unsupported()
    if why is None:
        try:
            path = build()
            torch.ops.load_library(str(path))
            _register_fakes()
            _state["path"] = path
        except Exception as error:  # noqa: BLE001 -- any failure means the fallback, said once
            why = f"{type(error).__name__}: {error}"
    _state["ok"], _state["why"] = why is None, why
    if why is not None and not why.startswith(ENV_SWITCH):
        warnings.warn(f"gpt2model's CPU decode kernels are off ({why}); int8 decode uses torch's kernels instead, "
                      f"slower (set {ENV_SWITCH}=0 to silence this)", RuntimeWarning, stacklevel=2)
    return why is None


def enabled() -> bool:
    """Whether the kernels are loaded (no build, no warning: :func:`load` decides that)."""
    return bool(_state.get("ok", False))


def fused_step_enabled() -> bool:
    """Whether CPU decode steps may run as one op (:data:`fused_step` is on and the kernels load:
    built at the first call of a process if needed, see :func:`load`; cheap after that)."""
    return fused_step and load()


def calls() -> int:
    """How many times the kernel ops ran in this process (tests check that a path really uses them)."""
    return int(torch.ops.gpt2model_kernels.calls()) if enabled() else 0


def _register_fakes() -> None:
    @torch.library.register_fake("gpt2model_kernels::int8_linear")
    def _(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
          interleaved: bool) -> torch.Tensor:
        return x.new_empty(x.size(0), weight.size(0))

    @torch.library.register_fake("gpt2model_kernels::decode_step")
    def _(tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, wte: torch.Tensor,
          wpe: torch.Tensor, params: list[torch.Tensor], k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
          interleaved: list[int], n_head: int, eps: float) -> torch.Tensor:
        return wte.new_empty(tokens.size(0), 1, params[-3].size(0))

    @torch.library.register_fake("gpt2model_kernels::argmax_rows")
    def _(x: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.size(0), dtype=torch.long)

    @torch.library.register_fake("gpt2model_kernels::f32_linear")
    def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return x.new_empty(x.size(0), weight.size(0))
