"""Decode cost per token at batch 1, against the two floors it cannot beat.

For each shape and weights dtype (fp32, bf16, int8 weight-only): our eager decode step and the
``compile=True`` one (``torch.compile``, with its compile time; on a CPU where the whole-step op
applies both are that op called eagerly, see ``generate.step_for``), the *memory floor* (the bytes of the
weights one token reads: every linear and the LM head, in that dtype, / the read bandwidth
measured here) and the *overhead floor* (the same number of layers and heads at a tiny width, in
the same dtype, so the step is nothing but per-op cost). Per-token time is ``(t(n + 1) - t(1)) / n`` of greedy
``generate`` with a 16-token prompt, the best of ``--repeats``. On a shared machine, measure
with ``--threads 1``: the process's CPU time is then robust to other jobs, wall time is not.

    python bench/bench_decode.py [--threads 1] [--tokens 100] [--no-compile] [--dtypes fp32,bf16,int8]
                                 [--shapes seed,bpe-6x384,gpt2-124M]

``--matmuls`` instead times the decode matmuls alone (the LM head and the body's linears of the
shapes, at ``--rows`` rows) in every weight layout and kernel torch offers for each dtype, each
weight cycled through enough copies to stream from memory as a decode step does:

    python bench/bench_decode.py --matmuls [--rows 1,8,16] [--shapes bpe-6x384,gpt2-124M]

``--llama-bench [PATH]`` instead compares our batch-1 decode of the bpe-6x384 model
(``generate(compile=True)``: on a CPU with our kernels built, the whole-step op called eagerly
once per token, nothing compiled) with llama.cpp's on the same weights (fp32 vs f32, bf16 vs f16,
int8 vs q8_0), the two interleaved per dtype over ``--repeats`` rounds, and ours with each layer's
ops compiled instead of the whole-step op (``cpukernels.fused_step`` off: the default before it)
and with torch's kernels only, compiled (without gpt2model.cpukernels); with ``--threads 1`` all
are CPU time per token, with more threads wall time:

    flock /work/wt/.bench.lock python bench/bench_decode.py --llama-bench --threads 1 --dtypes fp32,bf16,int8

``--op`` instead times the whole-step op alone (``gpt2model_kernels::decode_step`` called directly
on a cache holding a 100-token history, ``--calls`` calls per round; with more than one thread on
all threads and on the calling thread alone, the op's two modes, interleaved): what a token costs
inside the op, against the memory floor, without generate's Python around it:

    flock /work/wt/.bench.lock python bench/bench_decode.py --op --threads 2 --shapes bpe-6x384 --dtypes bf16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SHAPES = {
    "seed": dict(context_length=256, vocab_size=65, n_layer=6, n_head=6, d_model=384),
    "bpe-6x384": dict(context_length=256, vocab_size=50257, n_layer=6, n_head=6, d_model=384),
    "gpt2-124M": dict(context_length=1024, vocab_size=50257, n_layer=12, n_head=12, d_model=768),
}
DTYPES = ("fp32", "bf16", "int8")


def build(shape: dict[str, int], dtype: str) -> Any:
    """A random-init eval model of ``shape`` with ``dtype`` weights (int8: quantized from fp32)."""
    import torch

    from gpt2model import GPT, GPTconfig

    torch.manual_seed(0)
    model = GPT(GPTconfig(**shape)).eval()
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    elif dtype == "int8":
        model.quantize("int8")
    return model


def weight_bytes(model: Any) -> int:
    """Bytes of weights one decode step reads: every parameter and weight buffer but the two
    embeddings (one row each is looked up), plus the LM head (the tied embedding, or int8's own
    copy); int8 layers count their int8 weight and the bf16 scales their CPU kernel reads."""
    import torch.nn as nn

    total = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.startswith(("transformer.wte", "transformer.wpe")) or name.endswith(".scales"):
            continue
        total += t.numel() * t.element_size()
    if isinstance(model.lm_head, nn.Linear):
        total += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    return total


def per_token_ms(model: Any, tokens: int, repeats: int, compile: bool, clock: Any) -> tuple[float, float]:
    """(best ms per decoded token, wall seconds of the first call: warm-up and compile)."""
    import torch

    from gpt2model.generate import generate

    prompt = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    generate(model, prompt, tokens + 1, temperature=0, compile=compile)
    warm = time.perf_counter() - t
    best = float("inf")
    for _ in range(repeats):
        t = clock()
        generate(model, prompt, 1, temperature=0, compile=compile)
        one = clock() - t
        t = clock()
        generate(model, prompt, tokens + 1, temperature=0, compile=compile)
        best = min(best, (clock() - t - one) / tokens)
    return best * 1e3, warm


def read_bandwidth_gbs(clock: Any) -> float:
    """Bytes per second of a sum over 256 MiB of fp32 (read once, nothing written)."""
    import torch

    x = torch.ones(64 * 2**20)
    x.sum()
    best = float("inf")
    for _ in range(5):
        t = clock()
        x.sum()
        best = min(best, clock() - t)
    return x.numel() * 4 / best / 1e9


def matmul_methods(dtype: str, W: Any, rows: int) -> dict[str, Any]:
    """``name -> (prepare(W) -> weight, run(x, weight) -> y)`` for one dtype; W fp32 ``(out, in)``."""
    import torch
    import torch.nn.functional as F

    from gpt2model.quantize import Int8Linear, _in_decode_order

    def colmajor(w: Any) -> Any:
        return w.t().contiguous().t()

    if dtype in ("fp32", "bf16"):
        dt = torch.float32 if dtype == "fp32" else torch.bfloat16
        methods = {
            "F.linear(x, W) row-major": (lambda w: w.to(dt).contiguous(), lambda x, w: F.linear(x, w)),
            "F.linear(x, W) column-major (x @ Wt)": (lambda w: colmajor(w.to(dt)), lambda x, w: F.linear(x, w)),
            "addmm(b, x, Wt)": (lambda w: (torch.zeros(w.size(0), dtype=dt), w.to(dt).t().contiguous()),
                                lambda x, w: torch.addmm(w[0], x, w[1])),
            "mkldnn packed linear": (lambda w: torch.ops.mkldnn._reorder_linear_weight(w.to(dt), rows),
                                     lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")),
        }
        if dtype == "fp32":
            methods["mkl packed sgemm"] = (lambda w: (torch.ops.mkl._mkl_reorder_linear_weight(w, rows), w),
                                           lambda x, w: torch.ops.mkl._mkl_linear(x, w[0], w[1], None, rows))
        return methods

    def int8(w: Any) -> Any:
        return Int8Linear.from_weight(w)

    def pack_mm(x: Any, q: Any) -> Any:
        return torch._weight_int8pack_mm(_in_decode_order(x, torch.bfloat16), q.weight, q.scales_bf16)

    from gpt2model import cpukernels

    ours = {}
    if cpukernels.load():
        ours["our AVX2 kernel (cpukernels)"] = (int8, lambda x, q: torch.ops.gpt2model_kernels.int8_linear(
            x, q.weight, q.scales, None, q.interleaved))
    return {
        **ours,
        "_weight_int8pack_mm (bf16 x)": (int8, pack_mm),
        "_weight_int8pack_mm (fp32 x)": (int8, lambda x, q: torch._weight_int8pack_mm(
            _in_decode_order(x), q.weight, q.scales)),
        "dequantize + F.linear": (int8, lambda x, q: F.linear(_in_decode_order(x),
                                                              q.weight.float() * q.scales[:, None])),
        "inductor int8 GEMV (compiled)": (int8, torch.compile(lambda x, q: q._compiled_gemv(x), dynamic=False,
                                                             fullgraph=True)),
    }


def bench_matmuls(args: Any, clock: Any) -> list[dict[str, Any]]:
    """Time each decode matmul of the shapes in every layout (see the module docstring)."""
    import torch
    import torch._dynamo

    torch._dynamo.config.recompile_limit = 1000  # one compiled GEMV per matrix shape and row count
    rows_out = []
    # What one call of a compiled function costs by itself (guards, wrapper): the compiled GEMV's
    # times below include it once per matmul; a compiled decode step pays it once per step.
    tiny, add_one = torch.ones(8), torch.compile(lambda t: t + 1, dynamic=False)
    add_one(tiny)
    t = clock()
    for _ in range(2000):
        add_one(tiny)
    overhead = dict(compiled_call_overhead_ms=round((clock() - t) / 2000 * 1e3, 4))
    print(json.dumps(overhead), flush=True)
    rows_out.append(overhead)
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        d = shape["d_model"]
        mats = {"head": (shape["vocab_size"], d), "qkv": (3 * d, d), "fc": (4 * d, d), "mlp proj": (d, 4 * d)}
        for what, (out_f, in_f) in mats.items():
            if out_f < 1000 and what == "head":
                continue
            g = torch.Generator().manual_seed(0)
            W = torch.randn(out_f, in_f, generator=g) * 0.02
            for dtype in args.dtypes.split(","):
                for rows in (int(r) for r in args.rows.split(",")):
                    x = torch.randn(rows, in_f, generator=g).to(torch.bfloat16 if dtype == "bf16" else torch.float32)
                    times = {}
                    for method, (prepare, run) in matmul_methods(dtype, W, rows).items():
                        # Enough copies that they stream from memory (>= 96 MB), as in a decode step.
                        copies = max(1, -(-96 * 2**20 // (out_f * in_f * (4 if dtype == "fp32" else 2))))
                        try:
                            ws = [prepare(W) for _ in range(copies)]
                            run(x, ws[0])  # warm-up (and compile)
                        except Exception as e:  # noqa: BLE001 - a kernel this build lacks
                            times[method] = f"unavailable: {type(e).__name__}"
                            continue
                        best = float("inf")
                        for _ in range(args.repeats):
                            t = clock()
                            for w in ws:
                                run(x, w)
                            best = min(best, (clock() - t) / copies)
                        times[method] = round(best * 1e3, 4)
                        del ws
                    row = dict(shape=name, matrix=what, out=out_f, inp=in_f, dtype=dtype, rows=rows, ms=times)
                    print(json.dumps(row), flush=True)
                    rows_out.append(row)
    return rows_out


# Our weights dtype -> llama.cpp's matching GGUF type (bf16 against f16: both 2-byte weights).
LLAMA_PEERS = {"fp32": "f32", "bf16": "f16", "int8": "q8_0"}


def find_llama_bench() -> str | None:
    """``$LLAMA_BENCH``, ``$LLAMA_CPP_DIR/build/bin/llama-bench``, or ``llama-bench`` on the PATH."""
    if os.environ.get("LLAMA_BENCH"):
        return os.environ["LLAMA_BENCH"]
    built = Path(os.environ.get("LLAMA_CPP_DIR", "/nonexistent")) / "build" / "bin" / "llama-bench"
    return str(built) if built.exists() else shutil.which("llama-bench")


def llama_per_token_ms(binary: str, gguf: Path, threads: int, tokens: int) -> float:
    """llama.cpp's decode time per token (``llama-bench -p 0``: no prompt), measured like ours:
    with one thread the children's CPU time of a run of ``tokens + 1`` tokens minus a run of one,
    over ``tokens`` (robust to other jobs on the machine, as our process time is); with more
    threads llama-bench's own wall-clock figure."""
    import resource

    def once(n: int) -> tuple[float, float]:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run([binary, "-m", str(gguf), "-p", "0", "-n", str(n), "-t", str(threads), "-r", "1",
                              "-o", "json"], capture_output=True, text=True, timeout=600, check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        return cpu, 1e3 / float(json.loads(out.stdout)[0]["avg_ts"])

    if threads > 1:
        return once(tokens)[1]
    return (once(tokens + 1)[0] - once(1)[0]) / tokens * 1e3


@contextlib.contextmanager
def per_layer_ops() -> Any:
    """Within: decode steps run each layer's ops (our per-matrix kernels; compiled with
    ``compile=True``) instead of the whole-step op (``cpukernels.fused_step`` off), as before it
    was the CPU default."""
    from gpt2model import cpukernels

    saved = cpukernels.fused_step
    cpukernels.fused_step = False
    try:
        yield
    finally:
        cpukernels.fused_step = saved


@contextlib.contextmanager
def torch_kernels_only(model: Any) -> Any:
    """Within: ``model`` decodes with torch's kernels, as where ours (gpt2model.cpukernels) are not
    built (the int8 layers' ``use_kernel`` off, the fp32 layout and GEMV choice as without them)."""
    from gpt2model import cpukernels
    from gpt2model.quantize import Int8Linear

    saved = dict(cpukernels._state)
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    flags = [m.use_kernel for m in layers]
    cpukernels._state["ok"] = False
    for m in layers:
        m.use_kernel = False
    try:
        yield
    finally:
        cpukernels._state.clear()
        cpukernels._state.update(saved)
        for m, flag in zip(layers, flags, strict=True):
            m.use_kernel = flag


def bench_against_llama(args: Any, clock: Any) -> list[dict[str, Any]]:
    """Batch-1 decode of the bpe-6x384 model (random init, seed 0), ours (``compile=True``: the
    whole-step op where it applies) against llama.cpp on the same weights (GGUF f32 / f16 / q8_0),
    ours with the per-layer ops compiled (the whole-step op off) and ours with torch's kernels
    only (without gpt2model.cpukernels), all interleaved over ``--repeats`` rounds; medians."""
    import tempfile
    from statistics import median

    import torch

    from gpt2model import cpukernels

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_generate import _export_ggufs

    dtypes = args.dtypes.split(",")
    models = {d: build(SHAPES["bpe-6x384"], d) for d in dtypes}
    with_kernels = cpukernels.load()
    ours: dict[str, list[float]] = {d: [] for d in dtypes}
    plain: dict[str, list[float]] = {d: [] for d in dtypes}
    layered: dict[str, list[float]] = {d: [] for d in dtypes}
    theirs: dict[str, list[float]] = {d: [] for d in dtypes}
    shares: dict[str, list[float]] = {d: [] for d in dtypes}

    def thread_steps() -> list[int]:
        return list(torch.ops.gpt2model_kernels.thread_steps()) if with_kernels else [0, 0]

    with tempfile.TemporaryDirectory() as tmp:
        ggufs = _export_ggufs("bpe", tuple(LLAMA_PEERS[d] for d in dtypes), Path(tmp))
        for d in dtypes:
            per_token_ms(models[d], 2, 1, True, clock)  # compile once, outside the rounds
            if with_kernels:
                with per_layer_ops():
                    per_token_ms(models[d], 2, 1, True, clock)
                with torch_kernels_only(models[d]):
                    per_token_ms(models[d], 2, 1, True, clock)
        for r in range(args.repeats):
            for d in dtypes:
                before = thread_steps()
                ours[d].append(per_token_ms(models[d], args.tokens, 1, True, clock)[0])
                split = [a - b for a, b in zip(thread_steps(), before, strict=True)]
                if sum(split):  # the whole-step op's steps on all threads / on one (its ThreadChooser)
                    shares[d].append(split[0] / sum(split))
                if with_kernels:
                    with per_layer_ops():
                        layered[d].append(per_token_ms(models[d], args.tokens, 1, True, clock)[0])
                    with torch_kernels_only(models[d]):
                        plain[d].append(per_token_ms(models[d], args.tokens, 1, True, clock)[0])
                theirs[d].append(llama_per_token_ms(args.llama_bench, ggufs[LLAMA_PEERS[d]], args.threads,
                                                    args.tokens))
                print(f"  round {r + 1}: ours {d} {ours[d][-1]:.2f} ms"
                      + (f" ({100 * shares[d][-1]:.0f}% of steps on all threads)" if sum(split) else "")
                      + (f" (per-layer ops {layered[d][-1]:.2f}, torch's kernels only {plain[d][-1]:.2f})"
                         if plain[d] else "")
                      + f", llama.cpp {LLAMA_PEERS[d]} {theirs[d][-1]:.2f} ms", file=sys.stderr, flush=True)
    rows = []
    for d in dtypes:
        a, b = median(ours[d]), median(theirs[d])
        rows.append(dict(shape="bpe-6x384", dtype=d, peer=f"llama.cpp {LLAMA_PEERS[d]}", threads=args.threads,
                         ours_ms=a, llama_ms=b, speed_ratio=b / a, ours_all=ours[d], llama_all=theirs[d],
                         torch_kernels_ms=median(plain[d]) if plain[d] else None, torch_kernels_all=plain[d],
                         all_threads_share=shares[d],
                         per_layer_ms=median(layered[d]) if layered[d] else None, per_layer_all=layered[d]))
    return rows


def bench_op(args: Any, clock: Any, bandwidth: float) -> list[dict[str, Any]]:
    """ms per call of the whole-step op (medians and minima of ``--calls`` calls per round, interleaved
    over ``--repeats`` rounds) per shape and dtype; at more than one thread per mode (all, one)."""
    import torch

    from gpt2model import cpukernels

    if not cpukernels.load():
        raise SystemExit(f"--op needs our CPU kernels: {cpukernels._state.get('why')}")
    modes = {"all threads": 1, "one thread": 2} if args.threads > 1 else {"one thread": 0}
    rows = []
    for name in args.shapes.split(","):
        for dtype in args.dtypes.split(","):
            model = build(SHAPES[name], dtype)
            L = min(100, model.config.context_length)
            model.setup_cache(1, L)
            restore = None
            try:
                from gpt2model.quantize import restore_layout

                restore_layout(model)  # fp32: the row-major layout the op reads (a one-row cache's)
                ids = torch.randint(0, model.config.vocab_size, (1, L), generator=torch.Generator().manual_seed(0))
                with torch.no_grad():
                    model(ids[:, :-1], input_pos=torch.arange(L - 1))
                    args_ = model._fused_decode_args()
                    if args_ is None:
                        raise SystemExit(f"the whole-step op does not apply to {name} {dtype}")
                    mask = torch.zeros(1, 1, 1, L, dtype=model.dtype)
                    token, slot = ids[:, -1:], torch.tensor([L - 1])
                    op = torch.ops.gpt2model_kernels.decode_step
                    times: dict[str, list[float]] = {m: [] for m in modes}
                    restore = torch.ops.gpt2model_kernels.thread_policy(0)
                    for _ in range(args.repeats):
                        for mode, policy in modes.items():
                            torch.ops.gpt2model_kernels.thread_policy(policy)
                            for _ in range(5):
                                op(token, slot, slot, mask, *args_)
                            for _ in range(args.calls):
                                t = clock()
                                op(token, slot, slot, mask, *args_)
                                times[mode].append((clock() - t) * 1e3)
            finally:
                if restore is not None:
                    torch.ops.gpt2model_kernels.thread_policy(restore)
                model.clear_cache()
            floor = weight_bytes(model) / (bandwidth * 1e9) * 1e3
            for mode, ts in times.items():
                ts.sort()
                rows.append(dict(shape=name, dtype=dtype, threads=args.threads, mode=mode, median_ms=ts[len(ts) // 2],
                                 min_ms=ts[0], memory_floor_ms=floor, calls=len(ts)))
                print(json.dumps(rows[-1]), flush=True)
    return rows


def write_results(args: argparse.Namespace, name: str, bandwidth: float, rows: list[dict[str, Any]]) -> None:
    """The run's rows as JSON: ``--out``, else ``bench/results/NAME.json``."""
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(bandwidth_gbs=bandwidth, rows=rows), indent=2))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--shapes", default="seed,bpe-6x384", help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--dtypes", default="fp32", help=f"comma-separated, of {', '.join(DTYPES)}")
    p.add_argument("--out", default=None, help="JSON file (default: bench/results/decode.json)")
    p.add_argument("--matmuls", action="store_true", help="time the decode matmuls alone in every layout")
    p.add_argument("--rows", default="1,8,16", help="with --matmuls: comma-separated row counts")
    p.add_argument("--op", action="store_true", help="time the whole-step op alone (at >1 thread: all vs one)")
    p.add_argument("--calls", type=int, default=200, help="with --op: calls per mode and round")
    p.add_argument("--llama-bench", nargs="?", const=find_llama_bench() or "", default=None, metavar="PATH",
                   help="instead: ours compiled vs llama.cpp (fp32 vs f32, bf16 vs f16, int8 vs q8_0) on the "
                        "bpe-6x384 model at batch 1, interleaved over --repeats rounds (default binary: "
                        "$LLAMA_BENCH, $LLAMA_CPP_DIR/build/bin/llama-bench, or on the PATH)")
    args = p.parse_args()

    import torch

    for name in args.shapes.split(","):
        if name not in SHAPES:
            p.error(f"unknown shape {name!r}; choose from {', '.join(SHAPES)}")
    for name in args.dtypes.split(","):
        if name not in DTYPES:
            p.error(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    bandwidth = read_bandwidth_gbs(clock)
    if args.llama_bench is not None:
        if not args.llama_bench:
            p.error("no llama-bench found: pass --llama-bench PATH or set LLAMA_CPP_DIR")
        rows = bench_against_llama(args, clock)
        print(f"\nread bandwidth {bandwidth:.1f} GB/s ({args.threads} thread(s)); torch {torch.__version__}; "
              f"load {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
        print(f"{'dtype':>5} {'ours ms':>8} {'peer':>15} {'peer ms':>8} {'ours/peer speed':>15} "
              f"{'per-layer ms':>12} {'torch kernels ms':>16} {'their/peer speed':>16}")
        for r in rows:
            tk, pl = r["torch_kernels_ms"], r["per_layer_ms"]
            print(f"{r['dtype']:>5} {r['ours_ms']:8.2f} {r['peer']:>15} {r['llama_ms']:8.2f} {r['speed_ratio']:15.3f} "
                  + (f"{pl:12.2f} {tk:16.2f} {r['llama_ms'] / tk:16.3f}" if tk else f"{'-':>12} {'-':>16} {'-':>16}"))
        write_results(args, "decode_llama", bandwidth, rows)
        return 0
    if args.op:
        result = bench_op(args, clock, bandwidth)
        print(f"\nread bandwidth {bandwidth:.1f} GB/s ({args.threads} thread(s)); torch {torch.__version__}; "
              f"load {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
        print(f"{'shape':>10} {'dtype':>5} {'mode':>12} {'median ms':>9} {'min ms':>7} {'mem floor':>9}")
        for r in result:
            print(f"{r['shape']:>10} {r['dtype']:>5} {r['mode']:>12} {r['median_ms']:9.3f} {r['min_ms']:7.3f} "
                  f"{r['memory_floor_ms']:9.3f}")
        write_results(args, "decode_op", bandwidth, result)
        return 0
    if args.matmuls:
        result = bench_matmuls(args, clock)
        print(f"\nread bandwidth {bandwidth:.1f} GB/s ({args.threads} thread(s)); torch {torch.__version__}")
        write_results(args, "decode_matmuls", bandwidth, result)
        return 0
    rows = []
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        for dtype in args.dtypes.split(","):
            model = build(shape, dtype)
            tiny = build({**shape, "vocab_size": 65, "d_model": 8 * shape["n_head"]}, dtype)
            row = dict(shape=name, dtype=dtype, params=model.num_params(), threads=args.threads,
                       memory_floor_ms=weight_bytes(model) / (bandwidth * 1e9) * 1e3,
                       overhead_floor_ms=per_token_ms(tiny, args.tokens, args.repeats, False, clock)[0])
            row["eager_ms"], _ = per_token_ms(model, args.tokens, args.repeats, False, clock)
            if not args.no_compile:
                row["compiled_ms"], row["compile_s"] = per_token_ms(model, args.tokens, args.repeats, True, clock)
                saved = row["eager_ms"] - row["compiled_ms"]
                row["compile_pays_after_tokens"] = round(row["compile_s"] * 1e3 / saved) if saved > 0 else None
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model, tiny
    print(f"\nread bandwidth {bandwidth:.1f} GB/s ({args.threads} thread(s)); torch {torch.__version__}")
    print(f"{'shape':>10} {'dtype':>5} {'eager ms':>9} {'compiled':>9} {'compile s':>9} {'mem floor':>9} "
          f"{'ovh floor':>9}")
    for r in rows:
        print(f"{r['shape']:>10} {r['dtype']:>5} {r['eager_ms']:9.2f} {r.get('compiled_ms', float('nan')):9.2f} "
              f"{r.get('compile_s', float('nan')):9.1f} {r['memory_floor_ms']:9.2f} {r['overhead_floor_ms']:9.2f}")
    write_results(args, "decode", bandwidth, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
