"""``make bench``: training and generation throughput of gpt2model against HF transformers, in one run.

Sections (``--only`` picks a subset, comma-separated):

- ``train``: tokens/s, MFU and peak RSS on the seed configuration (batch 12 x 256) for ours in fp32,
  bf16 autocast and ``torch.compile``d, and HF ``GPT2LMHeadModel`` (sdpa) in fp32 and bf16, with
  the same weights and the same AdamW;
- ``gpt2``: the same for the gpt2 (124M) shape at a batch that fits (4 x 256);
- ``generate``: generation tokens/s from ``bench/bench_generate.py`` (fp32 / bf16 / int8, HF, llama.cpp,
  the memory floor);
- ``curve``: the seed model's loss over 200 training steps in bf16 against fp32;
- ``tasks``: zero-shot task items/s against lm-evaluation-harness, from ``bench/bench_tasks.py``.

The matmul peak (fp32 and bf16) is always measured first: MFU is model FLOPs/s (6N + 12·L·T·d per
token) over this machine's own peak in the case's compute dtype. Each case runs in a fresh
process, the cases of a section are interleaved over ``--rounds`` rounds, and every figure is the
median of all timed iterations (min and max beside it). Results are printed as tables and written
as JSON to ``bench/results/`` (git-ignored). Numbers from a busy machine are preliminary.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from statistics import mean
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ modules, also when imported

import bench_train  # noqa: E402
from common import format_table, machine_info, run_isolated, summarize, write_json  # noqa: E402

SECTIONS = ("train", "gpt2", "generate", "curve", "tasks")
SEED_SHAPE = dict(context_length=256, vocab_size=65, n_layer=6, n_head=6, d_model=384)
GPT2_SHAPE = dict(context_length=1024, vocab_size=50257, n_layer=12, n_head=12, d_model=768)
# --tiny: shapes small enough for the smoke test (the harness end to end in seconds).
TINY_SHAPE = dict(context_length=32, vocab_size=65, n_layer=2, n_head=2, d_model=32)

TRAIN_COLUMNS = [("case", "case"), ("tok_s", "tokens/s"), ("tok_s_min", "min"), ("tok_s_max", "max"),
                 ("mfu_pct", "MFU %"), ("rss_mib", "peak RSS MiB"), ("vs_hf", "vs HF"), ("note", "note")]
GENERATE_COLUMNS = [("config", "config"), ("batch", "batch"), ("method", "method"), ("tok_s", "tokens/s"),
                    ("of_floor", "of memory floor"), ("vs_fp32", "vs fp32"), ("vs_hf", "vs HF"),
                    ("vs_recompute", "vs recompute"), ("vs_llama", "vs llama.cpp"), ("peak_rss_mib", "peak RSS MiB"),
                    ("error", "error")]


def _peak(dtype: torch.dtype) -> float:
    # The trainer's probe, so that the bench and training logs report MFU against the same peak.
    from gpt2model.device import measure_matmul_peak

    return measure_matmul_peak(dtype, "cpu")


def measure_peaks(repeats: int = 3) -> dict[str, float]:
    """fp32 and bf16 matmul FLOP/s of this machine: the best of ``repeats`` fresh processes each
    (the probe caches per process; a best-of is what "peak" means on a shared machine)."""
    return {name: max(run_isolated(_peak, dtype)[0] for _ in range(repeats))
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}


def train_section(shape: dict[str, Any], batch_size: int, seq_len: int, peaks: dict[str, float],
                  rounds: int, warmup: int, iters: int, compile: bool) -> list[dict[str, Any]]:
    """Interleave all cases of one shape over ``rounds`` rounds; one table row per case."""
    cases = [("ours", "fp32", False), ("hf", "fp32", False), ("ours", "bf16", False), ("hf", "bf16", False)]
    if compile:
        cases += [("ours", "fp32", True), ("ours", "bf16", True)]
    times: dict[tuple, list[float]] = {c: [] for c in cases}
    rss: dict[tuple, float] = {c: 0.0 for c in cases}
    info: dict[tuple, dict[str, Any]] = {}
    errors: dict[tuple, str] = {}
    for r in range(rounds):
        for case in cases:
            if case in errors:
                continue
            impl, precision, compiled = case
            try:
                out, case_rss = run_isolated(bench_train.train_case, impl, shape, batch_size, seq_len,
                                             precision, compiled, warmup, iters)
            except RuntimeError as e:
                if not compiled:
                    raise
                # torch.compile needs a working C++ toolchain on CPU; report instead of failing.
                errors[case] = str(e).splitlines()[0]
                print(f"  {_name(case)}: torch.compile failed, skipped: {errors[case]}", flush=True)
                continue
            times[case] += out["times"]
            rss[case] = max(rss[case], case_rss)
            info.setdefault(case, out)  # keeps the first round's (cold) compile time
            tok_s = [out["tokens_per_step"] / t for t in out["times"]]
            print(f"  round {r + 1}/{rounds} {_name(case):<18} {mean(tok_s):8.0f} tokens/s  "
                  f"loss0 {out['first_loss']:.4f}  {out['note']}", flush=True)
    rows = []
    for case in cases:
        impl, precision, compiled = case
        row: dict[str, Any] = {"case": _name(case), "impl": impl, "precision": precision, "compile": compiled}
        if case in errors:
            rows.append({**row, "note": f"torch.compile unavailable: {errors[case][:60]}"})
            continue
        out = info[case]
        tok_s = summarize([out["tokens_per_step"] / t for t in times[case]])
        flops = tok_s["median"] * out["flops_per_token"]
        row.update(tok_s=tok_s["median"], tok_s_min=tok_s["min"], tok_s_max=tok_s["max"], n=tok_s["n"],
                   mfu_pct=100 * flops / peaks[precision], rss_mib=rss[case], first_loss=out["first_loss"],
                   batch_size=batch_size, seq_len=seq_len, note=out["note"], compile_s=out["compile_s"])
        rows.append(row)
    hf = {r["precision"]: r.get("tok_s") for r in rows if r["impl"] == "hf"}
    for row in rows:
        if row["impl"] == "ours" and row.get("tok_s") and hf.get(row["precision"]):
            row["vs_hf"] = row["tok_s"] / hf[row["precision"]]
    return rows


def _name(case: tuple) -> str:
    impl, precision, compiled = case
    return f"{impl} {precision}" + (" compiled" if compiled else "")


def curve_section(steps: int, batch_size: int, seq_len: int) -> dict[str, Any]:
    """bf16 against fp32 loss curves (same init, same batches): relative gap of the smoothed curves."""
    fp32, _ = run_isolated(bench_train.loss_curve, "fp32", steps, batch_size, seq_len)
    bf16, _ = run_isolated(bench_train.loss_curve, "bf16", steps, batch_size, seq_len)
    w = max(1, min(10, steps // 5))  # smooth over 10 steps: single-batch losses are noisy

    def smooth(xs: list[float]) -> list[float]:
        return [mean(xs[i:i + w]) for i in range(len(xs) - w + 1)]

    gaps = [abs(b - f) / f for f, b in zip(smooth(fp32), smooth(bf16), strict=True)]
    return {"steps": steps, "fp32": fp32, "bf16": bf16, "smoothing": w,
            "final_fp32": mean(fp32[-w:]), "final_bf16": mean(bf16[-w:]),
            "final_gap_pct": 100 * abs(mean(bf16[-w:]) - mean(fp32[-w:])) / mean(fp32[-w:]),
            "max_gap_pct": 100 * max(gaps)}


def generate_section(quick: bool, tiny: bool) -> list[dict[str, Any]] | None:
    """Rows from ``bench_generate.run`` (the generation benchmark forks its own cases); None if absent."""
    try:
        import bench_generate
    except ImportError:
        return None
    if tiny:
        return bench_generate.run(configs=("seed",), batches=(1,), new_tokens=8, rounds=1, attention=False)
    if quick:
        return bench_generate.run(batches=(1,), new_tokens=100, gpt2_new_tokens=50, rounds=1, attention=False)
    return bench_generate.run(llama_bench=bench_generate.find_llama_bench())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections to run, from {', '.join(SECTIONS)} (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="one round of few iterations, a smaller gpt2 batch and a 50-step curve (a few minutes)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny shapes and single iterations: checks the harness, measures nothing useful")
    p.add_argument("--rounds", type=int, help="interleaved rounds per section (default 3; --quick 1)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile cases")
    p.add_argument("--out", type=Path, help="JSON output path (default: bench/results/bench-<time>.json)")
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.only) - set(SECTIONS))
    if unknown:
        p.error(f"unknown section(s) {unknown} in --only; choose from {', '.join(SECTIONS)}")
    if args.rounds is not None and args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    quick = args.quick or args.tiny
    rounds = args.rounds or (1 if quick else 3)
    warmup, iters = (1, 1) if args.tiny else (1, 3) if args.quick else (2, 3)
    if {"train", "gpt2"} & set(args.only):
        # Import once here: every forked case inherits it instead of paying ~3 s each.
        import transformers  # noqa: F401
    t_start = time.perf_counter()
    results: dict[str, Any] = {"machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()}}
    print(f"machine: {results['machine']['cpu']}, {results['machine']['torch_threads']} threads, "
          f"torch {results['machine']['torch']}", flush=True)
    peaks = measure_peaks(1 if args.tiny else 3)
    results["matmul_peak_gflops"] = {k: v / 1e9 for k, v in peaks.items()}
    print(f"matmul peak: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s "
          f"(MFU reference)\n", flush=True)

    shapes = {"train": ("seed config", SEED_SHAPE, 12, 256),
              "gpt2": ("gpt2 124M", GPT2_SHAPE, 2 if quick else 4, 256)}
    if args.tiny:
        shapes = {"train": ("tiny", TINY_SHAPE, 2, 32), "gpt2": ("tiny", TINY_SHAPE, 1, 32)}
    tables = []
    for section in ("train", "gpt2"):
        if section not in args.only:
            continue
        title, shape, batch, seq = shapes[section]
        print(f"[{section}] {title}: batch {batch} x {seq}, AdamW, {rounds} round(s)", flush=True)
        # The 124M shape compiles for minutes on two cores: compile only the seed shape.
        rows = train_section(shape, batch, seq, peaks, rounds if section == "train" else max(1, rounds - 1),
                             warmup, iters, compile=not args.no_compile and section == "train")
        results[section] = rows
        tables.append(f"training, {title} (batch {batch} x {seq}; MFU against the matmul peak of the case's "
                      f"dtype; peak RSS includes the Python + torch + transformers baseline):\n"
                      + format_table(rows, TRAIN_COLUMNS))
    if "generate" in args.only:
        gen = generate_section(args.quick, args.tiny)
        results["generate"] = gen
        if gen is None:
            tables.append("generation: bench/bench_generate.py not found, skipped")
        else:
            tables.append("generation (greedy, random init; ratios against HF generate and a recompute loop):\n"
                          + format_table([r for r in gen if r.get("kind") == "generate"], GENERATE_COLUMNS))
            attention = [r for r in gen if r.get("kind") == "attention"]
            if attention:
                keys = [k for k in attention[0] if k != "kind" and not isinstance(attention[0][k], (list, dict))]
                tables.append("decode attention, mask over all cache slots vs filled slice:\n"
                              + format_table(attention, [(k, k) for k in keys]))
    if "curve" in args.only:
        steps = 10 if args.tiny else 50 if args.quick else 200
        batch, seq = (2, 32) if args.tiny else (12, 256)
        print(f"[curve] seed model on Tiny Shakespeare, {steps} steps, fp32 then bf16", flush=True)
        curve = curve_section(steps, batch, seq)
        results["curve"] = curve
        tables.append(f"loss curve, bf16 vs fp32 over {steps} steps (smoothed over {curve['smoothing']}): "
                      f"final {curve['final_bf16']:.4f} vs {curve['final_fp32']:.4f} "
                      f"(gap {curve['final_gap_pct']:.2f}%), max gap {curve['max_gap_pct']:.2f}% (target < 2%)")
    if "tasks" in args.only:
        import bench_tasks

        print("[tasks] zero-shot tasks on the fixtures, ours vs lm-eval's hf model", flush=True)
        shape, rounds = ("tiny", 1) if args.tiny else ("gpt2", 1 if args.quick else 3)
        rows = bench_tasks.run(shape=shape, rounds=rounds)
        results["tasks"] = rows
        tables.append(f"zero-shot tasks ({shape} shape, random init, batch 8; items/s from documents to metrics):\n"
                      + format_table(rows, bench_tasks.COLUMNS))
    results["elapsed_s"] = time.perf_counter() - t_start
    path = write_json(results, args.out)
    print("\n" + "\n\n".join(tables))
    print(f"\n{results['elapsed_s']:.0f} s; results written to {path}")
    return results


if __name__ == "__main__":
    main()
