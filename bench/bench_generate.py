"""Generation speed: our KV-cached decoder (fp32, bf16, int8 weights; eager, optionally compiled)
against HF ``generate``, nanoGPT's recompute-everything loop, llama.cpp (when a ``llama-bench``
binary is given) and the memory floor, at batch 1 and 8, on the seed config, a GPT-2-BPE model of
6x384 (context 256) and the GPT-2 (124M) shape.

Every case runs in its own forked process (peak RSS per case), greedy, random init, a 16-token
prompt, no early stop; the cases are interleaved over ``rounds`` rounds and each figure is the
median over rounds (so a noisy neighbour hits every case alike). The memory floor of a case is
the bytes its decode step must read (every linear weight once, the head included; the embedding
lookup reads only the fed rows) over this machine's read bandwidth, measured in the same run (the
faster of a sum and a one-row GEMV over a 512 MiB tensor, best of rounds); ``of floor`` is the
floor's time over the measured time.
``decode ms`` (ours) is the decode steps alone, ``(t(n) - t(1)) / (n - 1)``: the figure compared
with llama.cpp's (``llama-bench -p 0``: decode only, no prompt).
``python bench/bench_generate.py`` prints a table with ratios and writes JSON to ``bench/results/``.
Also measured: attention over all cache slots with a mask against attention over the filled slice.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, machine_info, run_isolated, summarize, write_json  # noqa: E402

CONFIGS = {
    "seed": dict(context_length=256, vocab_size=65, n_layer=6, n_head=6, d_model=384),
    "bpe": dict(context_length=256, vocab_size=50257, n_layer=6, n_head=6, d_model=384),
    "gpt2": dict(context_length=1024, vocab_size=50257, n_layer=12, n_head=12, d_model=768),
}
PROMPT_LEN = 16
OURS = ("ours_fp32", "ours_bf16", "ours_f16", "ours_int8")


def _case(config_name: str, method: str, batch: int, new_tokens: int, threads: int | None,
          compile: bool = False) -> dict[str, Any]:
    """Runs in a child process: build the model, warm up, time one generation of ``new_tokens``."""
    import torch
    import torch.nn as nn

    from gpt2model import GPT, GPTconfig
    from gpt2model.generate import generate
    from gpt2model.quantize import Int8Linear

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = GPTconfig(**CONFIGS[config_name])
    prompt = torch.randint(0, cfg.vocab_size, (batch, PROMPT_LEN))
    model = GPT(cfg).eval()
    if method == "hf_fp32":
        import transformers

        from gpt2model.hf import config_to_hf

        hf_cfg = transformers.GPT2Config(**{k: v for k, v in config_to_hf(cfg).items() if k != "architectures"})
        model = transformers.GPT2LMHeadModel(hf_cfg).eval()

        def fn(n: int) -> torch.Tensor:
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0,
                                  eos_token_id=None)
    elif method == "recompute_fp32":
        @torch.no_grad()
        def fn(n: int) -> torch.Tensor:
            # nanoGPT's loop: crop to the context, run the whole window, keep the last logits.
            ids = prompt
            for _ in range(n):
                logits = model(ids[:, -cfg.context_length:])[:, -1]
                ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
            return ids
    else:
        if method == "ours_bf16":
            model.to(torch.bfloat16)
        elif method == "ours_int8":
            model.quantize("int8")
        elif method == "ours_f16":  # float16 weights, float32 math (gpt2 serve/sample --dtype f16)
            model.quantize("f16")

        def fn(n: int) -> torch.Tensor:
            return generate(model, prompt, n, temperature=0, compile=compile)

    # Bytes one decode step reads: each linear weight (and int8 scales) once; the tied head once.
    step_bytes = 0
    for m in model.modules():
        if isinstance(m, Int8Linear):
            step_bytes += m.weight.numel() + m.scales.numel() * m.scales.element_size()
        elif isinstance(m, nn.Linear) or type(m).__name__ in ("Conv1D", "Fp16Linear"):
            step_bytes += m.weight.numel() * m.weight.element_size()

    t0 = time.perf_counter()
    # Warm-up; compiled, with the timed length: the KV cache's (static) shape depends on it, so a
    # shorter warm-up would leave the timed run to compile again.
    fn(new_tokens if compile else 4)
    warmup_s = time.perf_counter() - t0
    ours = method.startswith("ours_")
    if ours and compile:
        fn(1)  # its own (shorter) cache shape: compile it before the timed run
    t0 = time.perf_counter()
    out = fn(new_tokens)
    seconds = time.perf_counter() - t0
    assert out.shape == (batch, PROMPT_LEN + new_tokens)
    # The decode steps alone (llama-bench's tg figure excludes the prompt): minus a run of the
    # prefill and its first token.
    decode_s = None
    if ours and new_tokens > 1:
        t0 = time.perf_counter()
        fn(1)
        decode_s = seconds - (time.perf_counter() - t0)
    return {"config": config_name, "method": method + ("_compile" if compile else ""), "batch": batch,
            "new_tokens": new_tokens, "seconds": seconds, "decode_s": decode_s, "warmup_s": warmup_s,
            "step_bytes": step_bytes}


def _bandwidth(threads: int | None, mib: int = 512, iters: int = 5) -> float:
    """Read bandwidth in bytes/s over a tensor far larger than the caches: the best of ``iters``
    reads, each the faster of a sum and a one-row fp32 GEMV over it stored column-major (MKL
    streams it as 8 concurrent column runs: ~29-33 GB/s on one core of a 2-core EPYC where the
    sum's single stream reads ~19; a decode step can stream its weights that fast too)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    x = torch.ones(mib * 2**20 // 4)
    w = x.view(512, -1).t()  # (n, 512) with W.t() contiguous: the decode layout of an fp32 head
    v = torch.ones(1, 512)

    def gemv() -> None:
        torch.nn.functional.linear(v, w)

    x.sum()
    gemv()
    best = min(min(_timed(x.sum), _timed(gemv)) for _ in range(iters))
    return x.numel() * 4 / best


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _attention_case(threads: int | None, max_len: int = 1024, n_head: int = 12, head_dim: int = 64,
                    iters: int = 300) -> list[dict[str, Any]]:
    """One decode step's attention: all max_len cache slots with a bool mask vs the filled slice."""
    import torch
    import torch.nn.functional as F
    from common import time_iterations

    if threads:
        torch.set_num_threads(threads)
    rows = []
    for batch in (1, 8):
        q = torch.randn(batch, n_head, 1, head_dim)
        k = torch.randn(batch, n_head, max_len, head_dim)
        v = torch.randn(batch, n_head, max_len, head_dim)
        for filled in (64, 256, 1024):
            mask = torch.zeros(batch, 1, 1, max_len, dtype=torch.bool)
            mask[..., :filled] = True
            t_mask = time_iterations(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),  # noqa: B023
                                     warmup=20, iters=iters)
            t_slice = time_iterations(lambda: F.scaled_dot_product_attention(q, k[:, :, :filled],  # noqa: B023
                                                                             v[:, :, :filled]),  # noqa: B023
                                      warmup=20, iters=iters)
            rows.append({"batch": batch, "max_len": max_len, "filled": filled,
                         "mask_us": 1e6 * summarize(t_mask)["median"], "slice_us": 1e6 * summarize(t_slice)["median"]})
    return rows


# --- llama.cpp ---------------------------------------------------------------------------------------
def _export_ggufs(config_name: str, dtypes: tuple[str, ...], out_dir: Path) -> dict[str, Path]:
    """The random-init model of ``config_name`` (seed 0, as ``_case`` builds it) as GGUF files."""
    import torch

    from gpt2model import GPT, GPTconfig
    from gpt2model.export import export_gguf
    from gpt2model.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = GPT(GPTconfig(**CONFIGS[config_name])).eval()
    model.save_pretrained(out_dir / "model", tokenizer=load_tokenizer("gpt2"))
    return {d: export_gguf(out_dir / "model", out_dir / f"model-{d}.gguf", dtype=d) for d in dtypes}


def _llama_bench(binary: str, gguf: Path, threads: int, new_tokens: int) -> float:
    """llama.cpp's batch-1 decode tokens/s (``llama-bench -p 0 -n N``: text generation only)."""
    out = subprocess.run([binary, "-m", str(gguf), "-p", "0", "-n", str(new_tokens), "-t", str(threads),
                          "-r", "1", "-o", "json"], capture_output=True, text=True, timeout=600, check=True)
    rows = json.loads(out.stdout)
    return float(rows[0]["avg_ts"])


# --- the run -----------------------------------------------------------------------------------------
def run(configs: tuple[str, ...] = ("seed", "bpe", "gpt2"), batches: tuple[int, ...] = (1, 8),
        new_tokens: int = 200, gpt2_new_tokens: int = 100, recompute_tokens: dict[str, int] | None = None,
        rounds: int = 3, threads: int | None = None, compile: bool = False, attention: bool = True,
        methods: tuple[str, ...] = (*OURS, "hf_fp32", "recompute_fp32"), llama_bench: str | None = None,
        repeats: int | None = None) -> list[dict[str, Any]]:
    """Measure every (config, batch, method) case; returns one dict per case (plus ``kind ==
    "attention"`` rows and, with ``llama_bench``, ``method`` ``llama.cpp_<dtype>`` rows at batch 1).

    HF cannot generate past its context, so every method runs ``min(new_tokens, context - prompt)``
    tokens. The recompute baseline is O(context²) per token; it runs ``recompute_tokens`` tokens
    (default: all on the seed config, 20 elsewhere) and ours is timed at that length too; ratios
    compare equal lengths only. ``repeats`` is an old name for ``rounds``.
    """
    rounds = repeats or rounds
    threads = threads or int(os.environ.get("OMP_NUM_THREADS", "0")) or None
    recompute_tokens = recompute_tokens or {"seed": new_tokens}
    cases: list[tuple[str, str, int, int, bool]] = []
    for config in configs:
        want = gpt2_new_tokens if config == "gpt2" else new_tokens
        n = min(want, CONFIGS[config]["context_length"] - PROMPT_LEN)
        n_recompute = min(n, recompute_tokens.get(config, 20))
        for batch in batches:
            for method in methods:
                if method == "recompute_fp32":
                    cases.append((config, method, batch, n_recompute, False))
                    if n_recompute != n:
                        cases.append((config, "ours_fp32", batch, n_recompute, False))
                else:
                    cases.append((config, method, batch, n, False))
            if compile:
                cases += [(config, m, batch, n, True) for m in OURS if m in methods]
    seconds: dict[tuple, list[float]] = {c: [] for c in cases}
    decode_seconds: dict[tuple, list[float]] = {c: [] for c in cases}
    info: dict[tuple, dict[str, Any]] = {}
    errors: dict[tuple, str] = {}
    bandwidths = []
    for r in range(rounds):
        bandwidths.append(run_isolated(_bandwidth, threads)[0])
        for case in cases:
            if case in errors:
                continue
            config, method, batch, n, use_compile = case
            try:
                result, rss = run_isolated(_case, config, method, batch, n, threads, use_compile)
            except RuntimeError as e:
                errors[case] = str(e)[:500]
                continue
            seconds[case].append(result["seconds"])
            if result.get("decode_s"):
                decode_seconds[case].append(result["decode_s"])
            info[case] = {**result, "peak_rss_mib": max(rss, info.get(case, {}).get("peak_rss_mib", 0.0))}
            print(f"  round {r + 1}/{rounds} {config} b{batch} {result['method']} x{n}: "
                  f"{batch * n / result['seconds']:.1f} tok/s", file=sys.stderr, flush=True)
    bandwidth = max(bandwidths)
    rows: list[dict[str, Any]] = []
    for case in cases:
        config, method, batch, n, use_compile = case
        if case in errors:
            rows.append({"kind": "generate", "config": config, "method": method + ("_compile" if use_compile else ""),
                         "batch": batch, "new_tokens": n, "error": errors[case]})
            continue
        s = summarize(seconds[case])
        row = {**info[case], "kind": "generate", "seconds": s["median"], "rounds": s["n"],
               "tok_s": batch * n / s["median"], "tok_s_min": batch * n / s["max"], "tok_s_max": batch * n / s["min"],
               "ms_per_step": 1000 * s["median"] / n, "bandwidth_gbs": bandwidth / 1e9}
        if decode_seconds[case]:
            row["decode_ms"] = 1000 * median(decode_seconds[case]) / (n - 1)
        row["floor_ms"] = 1000 * row["step_bytes"] / bandwidth
        row["of_floor"] = row["floor_ms"] / row["ms_per_step"]
        rows.append(row)
    if llama_bench and "bpe" in configs and 1 in batches:
        rows += _llama_rows(llama_bench, threads or os.cpu_count() or 1, min(new_tokens, 240), rounds)
    _add_ratios(rows)
    if attention:
        attn, _ = run_isolated(_attention_case, threads)
        rows += [{"kind": "attention", **r} for r in attn]
    return rows


def _llama_rows(binary: str, threads: int, new_tokens: int, rounds: int) -> list[dict[str, Any]]:
    """llama.cpp on the bpe model's weights (GGUF f32, f16, q8_0), batch 1, median of ``rounds``."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            ggufs, _ = run_isolated(_export_ggufs, "bpe", ("f32", "f16", "q8_0"), Path(tmp))
        except RuntimeError as e:
            return [{"kind": "generate", "config": "bpe", "method": "llama.cpp", "batch": 1, "error": str(e)[:500]}]
        for dtype, path in ggufs.items():
            try:
                tok_s = median(_llama_bench(binary, path, threads, new_tokens) for _ in range(rounds))
            except (subprocess.SubprocessError, OSError, ValueError, KeyError, IndexError) as e:
                rows.append({"kind": "generate", "config": "bpe", "method": f"llama.cpp_{dtype}", "batch": 1,
                             "error": f"{type(e).__name__}: {e}"[:500]})
                continue
            rows.append({"kind": "generate", "config": "bpe", "method": f"llama.cpp_{dtype}", "batch": 1,
                         "new_tokens": new_tokens, "tok_s": tok_s, "ms_per_step": 1000 / tok_s})
            print(f"  llama.cpp {dtype}: {tok_s:.1f} tok/s", file=sys.stderr, flush=True)
    return rows


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    # Ratios only between runs of the same length (a longer run attends over longer contexts).
    by_key = {(r["config"], r["batch"], r.get("new_tokens"), r["method"]): r for r in rows if "tok_s" in r}
    llama = {r["method"]: r for r in rows if r["method"].startswith("llama.cpp") and "tok_s" in r}
    for r in rows:
        if "tok_s" not in r:
            continue
        for peer, col in (("ours_fp32", "vs_fp32"), ("hf_fp32", "vs_hf"), ("recompute_fp32", "vs_recompute")):
            other = by_key.get((r["config"], r["batch"], r["new_tokens"], peer))
            r[col] = r["tok_s"] / other["tok_s"] if other and other is not r else None
        # Ours against llama.cpp in the matching precision (f32 / f16 for our bf16 and f16 / q8_0 for int8).
        peer = {"ours_fp32": "llama.cpp_f32", "ours_bf16": "llama.cpp_f16", "ours_f16": "llama.cpp_f16",
                "ours_int8": "llama.cpp_q8_0"}.get(
            r["method"].removesuffix("_compile"))
        if peer in llama and r["config"] == "bpe" and r["batch"] == 1:
            # Decode steps against llama-bench's decode (tg, no prompt) where measured.
            ours_tok_s = 1000 / r["decode_ms"] if r.get("decode_ms") else r["tok_s"]
            r["vs_llama"] = ours_tok_s / llama[peer]["tok_s"]


def find_llama_bench() -> str | None:
    """``$LLAMA_BENCH`` or ``llama-bench`` on the PATH."""
    return os.environ.get("LLAMA_BENCH") or shutil.which("llama-bench")


COLUMNS = [("config", "config"), ("batch", "batch"), ("method", "method"), ("new_tokens", "tokens"),
           ("tok_s", "tok/s"), ("ms_per_step", "ms/step"), ("decode_ms", "decode ms"), ("floor_ms", "floor ms"),
           ("of_floor", "of floor"),
           ("vs_fp32", "vs fp32"), ("vs_hf", "vs HF"), ("vs_recompute", "vs recompute"), ("vs_llama", "vs llama.cpp"),
           ("peak_rss_mib", "RSS MiB"), ("error", "error")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=["seed", "bpe", "gpt2"], choices=sorted(CONFIGS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--methods", nargs="+", default=[*OURS, "hf_fp32", "recompute_fp32"],
                    choices=[*OURS, "hf_fp32", "recompute_fp32"])
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--gpt2-new-tokens", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each figure is their median")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="also time ours fp32, bf16 and int8 with compile=True")
    ap.add_argument("--llama-bench", default=find_llama_bench(),
                    help="llama.cpp's llama-bench binary (default: $LLAMA_BENCH or on the PATH); compares the bpe "
                         "model at batch 1 in f32, f16 and q8_0")
    ap.add_argument("--no-attention", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows = run(tuple(args.configs), tuple(args.batches), args.new_tokens, args.gpt2_new_tokens, rounds=args.rounds,
               threads=args.threads, compile=args.compile, attention=not args.no_attention,
               methods=tuple(args.methods), llama_bench=args.llama_bench)
    gen = [r for r in rows if r["kind"] == "generate"]
    bw = next((r["bandwidth_gbs"] for r in gen if "bandwidth_gbs" in r), None)
    print(f"read bandwidth (best of rounds): {bw:.1f} GB/s" if bw else "")
    print(format_table(gen, COLUMNS))
    attn = [r for r in rows if r["kind"] == "attention"]
    if attn:
        print("\nattention of one decode step: mask over all cache slots vs slice of the filled slots")
        print(format_table(attn, [("batch", "batch"), ("max_len", "max_len"), ("filled", "filled"),
                                  ("mask_us", "mask µs"), ("slice_us", "slice µs")]))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    load = os.getloadavg()
    path = write_json({"machine": {**machine_info(), "loadavg": load}, "rows": rows},
                      args.out or Path(__file__).resolve().parent / "results" / f"generate-{stamp}.json")
    print(f"\nload average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; wrote {path}")


if __name__ == "__main__":
    main()
