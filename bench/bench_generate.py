"""Generation speed: our KV-cached decoder (fp32, bf16) against HF ``generate`` and nanoGPT's
recompute-everything loop, at batch 1 and 8, on the seed config and the GPT-2 (124M) shape.

Every case runs in its own forked process (peak RSS per case), greedy, random init, a 16-token
prompt, no early stop. ``run(...)`` returns one dict per case; ``python bench/bench_generate.py``
prints a table with ratios against HF and against the recompute baseline and writes JSON to
``bench/results/``. Also measured: attention over all cache slots with a mask (what the model
does) against attention over a slice of the filled slots.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, machine_info, run_isolated, summarize, write_json  # noqa: E402

CONFIGS = {
    "seed": dict(context_length=256, vocab_size=65, n_layer=6, n_head=6, d_model=384),
    "gpt2": dict(context_length=1024, vocab_size=50257, n_layer=12, n_head=12, d_model=768),
}
PROMPT_LEN = 16


def _case(config_name: str, method: str, batch: int, new_tokens: int, repeats: int, threads: int | None,
          compile: bool = False) -> dict[str, Any]:
    """Runs in a child process: build the model, warm up, time ``repeats`` generations."""
    import torch

    from gpt2model import GPT, GPTconfig
    from gpt2model.generate import generate

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
        if method.startswith("ours_bf16"):
            model.to(torch.bfloat16)

        def fn(n: int) -> torch.Tensor:
            return generate(model, prompt, n, temperature=0, compile=compile)

    t0 = time.perf_counter()
    fn(4)  # warm-up (and compilation, for compile=True)
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(new_tokens)
        times.append(time.perf_counter() - t0)
        assert out.shape == (batch, PROMPT_LEN + new_tokens)
    s = summarize(times)
    return {"config": config_name, "method": method + ("_compile" if compile else ""), "batch": batch,
            "new_tokens": new_tokens, "seconds": s["median"], "tok_s": batch * new_tokens / s["median"],
            "ms_per_step": 1000 * s["median"] / new_tokens, "warmup_s": warmup_s,
            "tok_s_min": batch * new_tokens / s["max"], "tok_s_max": batch * new_tokens / s["min"]}


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


def run(configs: tuple[str, ...] = ("seed", "gpt2"), batches: tuple[int, ...] = (1, 8), new_tokens: int = 500,
        gpt2_new_tokens: int = 200, recompute_tokens: dict[str, int] | None = None, repeats: int = 1,
        threads: int | None = None, compile: bool = False, attention: bool = True) -> list[dict[str, Any]]:
    """Measure every (config, batch, method) case; returns one dict per case (plus the attention
    mask-vs-slice rows, ``kind == "attention"``).

    HF cannot generate past its context (256 for the seed config), so the comparison runs at
    ``min(new_tokens, context - prompt)`` tokens for every method; ours is then also timed at the
    full ``new_tokens`` (rows with more tokens), which includes sliding the window. The recompute
    baseline is O(context²) per token; on the 124M shape it generates fewer tokens
    (``recompute_tokens``) and ours is timed at that length too. Ratios compare equal lengths.
    """
    # The seed config's baseline runs the full 500 tokens (the comparison); the 124M one
    # only 20 (its O(context^2) loop would take many minutes), compared with ours at 20 tokens too.
    recompute_tokens = recompute_tokens or {"seed": new_tokens, "gpt2": 20}
    rows: list[dict[str, Any]] = []
    for config in configs:
        want = gpt2_new_tokens if config == "gpt2" else new_tokens
        n_common = min(want, CONFIGS[config]["context_length"] - PROMPT_LEN)
        n_recompute = min(want, recompute_tokens.get(config, want))
        cases = [("ours_fp32", n_common, False), ("ours_bf16", n_common, False), ("hf_fp32", n_common, False),
                 ("recompute_fp32", n_recompute, False)]
        if compile:
            cases.append(("ours_fp32", n_common, True))
        if want > n_common:
            cases += [("ours_fp32", want, False), ("ours_bf16", want, False)]
        if n_recompute not in (n_common, want):
            cases.append(("ours_fp32", n_recompute, False))
        for batch in batches:
            for method, n, use_compile in cases:
                try:
                    result, rss = run_isolated(_case, config, method, batch, n, repeats, threads, use_compile)
                    result["peak_rss_mib"] = rss
                except RuntimeError as e:
                    result = {"config": config, "method": method, "batch": batch, "new_tokens": n,
                              "error": str(e)[:500]}
                result["kind"] = "generate"
                rows.append(result)
                print(f"  {config} b{batch} {result['method']} x{n}: {result.get('tok_s', float('nan')):.1f} tok/s",
                      file=sys.stderr, flush=True)
    _add_ratios(rows)
    if attention:
        attn, _ = run_isolated(_attention_case, threads)
        rows += [{"kind": "attention", **r} for r in attn]
    return rows


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    # Ratios only between runs of the same length: a longer run slides its window and, for the
    # recompute baseline, attends over longer contexts.
    by_key = {(r["config"], r["batch"], r["new_tokens"], r["method"]): r for r in rows if "tok_s" in r}
    for r in rows:
        if "tok_s" not in r:
            continue
        for peer, col in (("hf_fp32", "vs_hf"), ("recompute_fp32", "vs_recompute")):
            other = by_key.get((r["config"], r["batch"], r["new_tokens"], peer))
            r[col] = r["tok_s"] / other["tok_s"] if other else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=["seed", "gpt2"], choices=sorted(CONFIGS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=500)
    ap.add_argument("--gpt2-new-tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="also time ours fp32 with compile=True")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows = run(tuple(args.configs), tuple(args.batches), args.new_tokens, args.gpt2_new_tokens,
               repeats=args.repeats, threads=args.threads, compile=args.compile)
    gen = [r for r in rows if r["kind"] == "generate"]
    print(format_table(gen, [("config", "config"), ("batch", "batch"), ("method", "method"),
                             ("new_tokens", "tokens"), ("tok_s", "tok/s"), ("ms_per_step", "ms/step"),
                             ("vs_hf", "vs HF"), ("vs_recompute", "vs recompute"), ("peak_rss_mib", "RSS MiB")]))
    attn = [r for r in rows if r["kind"] == "attention"]
    if attn:
        print("\nattention of one decode step: mask over all cache slots vs slice of the filled slots")
        print(format_table(attn, [("batch", "batch"), ("max_len", "max_len"), ("filled", "filled"),
                                  ("mask_us", "mask µs"), ("slice_us", "slice µs")]))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = write_json({"machine": machine_info(), "rows": rows},
                      args.out or Path(__file__).resolve().parent / "results" / f"generate-{stamp}.json")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
