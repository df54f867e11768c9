"""Serving benchmark: our ``gpt2 serve`` against its peers, same weights, same load, same run.

A closed-loop load generator (asyncio + httpx): C clients each send a streaming
``/v1/completions`` request (a prompt drawn from Tiny Shakespeare, 64 new tokens, greedy), wait for
its last byte and send the next, for ``--seconds`` per concurrency level (1, 4, 8, 16). Reported per
server and level: time to first token and inter-token latency (p50/p99), output tokens/s, requests/s,
errors (429s counted apart) and tokens received per request, which must be the 64 asked for unless
the server reports a truthful ``stop`` (else the row is marked failed).

Servers (each started here as a subprocess on a free port, stopped after its levels):

- ``ours``: ``gpt2 serve --max-batch 8``; ``ours-b1``: the same at ``--max-batch 1`` (no batching);
  ``ours-bf16`` / ``ours-int8`` / ``ours-f16``: ``ours`` with ``--dtype bfloat16`` / ``int8`` / ``f16``;
  ``ours-base``: ``ours`` run from another source tree (``--base-src DIR/src``, e.g. main's, to measure a
  change in the same run);
- ``hf`` / ``hf-cb``: ``transformers serve MODEL_DIR`` without / with ``--continuous-batching``;
- ``llama-f32`` / ``llama-f16`` / ``llama-q8_0``: llama.cpp's ``llama-server -np 8 -cb`` on our GGUF export
  (``gpt2 export``); needs a llama.cpp build (``--llama-dir`` or ``LLAMA_CPP_DIR``);
- any server with ``@option=value`` suffixes gets those command-line options, e.g.
  ``ours@max-prefill-tokens=64`` (each spelling is its own row).

Run (``make bench`` runs the default): ``python bench/bench_serve.py [--model DIR] [--servers ours,hf-cb]``.
``--rounds N`` runs the whole server list N times, interleaved (ours, peer, ours, peer, ...), and the
summary gives each row's median over the rounds: on a shared machine compare only such ratios.
Without ``--model`` a random-weight GPT-2-BPE model of shape 6x384, context 256 is made in a temp folder.
Results are printed as a table and written as JSON to ``bench/results/``. Run under
``flock /work/wt/.bench.lock`` on a shared machine; numbers from a busy machine are preliminary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import format_table, machine_info, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SERVERS = ("ours", "ours-b1", "ours-bf16", "ours-int8", "ours-f16", "ours-base", "hf", "hf-cb", "llama-f32",
           "llama-f16", "llama-q8_0")
COLUMNS = [("server", "server"), ("clients", "clients"), ("tok_s", "output tok/s"), ("req_s", "req/s"),
           ("ttft_p50_ms", "TTFT p50 ms"), ("ttft_p99_ms", "TTFT p99 ms"), ("itl_p50_ms", "ITL p50 ms"),
           ("itl_p99_ms", "ITL p99 ms"), ("tokens_per_req", "tokens/req"), ("errors", "errors"),
           ("rejected", "429s"), ("mean_batch", "mean batch"), ("load", "load"), ("ok", "ok")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def make_model(directory: Path, n_layer: int = 6, d_model: int = 384, context: int = 256) -> Path:
    """A random-weight GPT-2-BPE model folder (HF layout + vocab.json/merges.txt)."""
    import torch

    from gpt2model import GPT, GPTconfig, load_tokenizer

    torch.manual_seed(0)
    model = GPT(GPTconfig(vocab_size=50257, context_length=context, n_layer=n_layer, n_head=d_model // 64,
                          d_model=d_model))
    model.save_pretrained(directory, tokenizer=load_tokenizer("gpt2"))
    # transformers serve reads the chat/generation files of HF folders; GPT-2 needs none, but
    # AutoTokenizer must find a tokenizer class: name it (transformers 5.x otherwise guesses).
    cfg = json.loads((directory / "config.json").read_text())
    cfg.setdefault("n_ctx", cfg["n_positions"])  # llama.cpp's converter and older tools read n_ctx
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "model_max_length": context, "eos_token": "<|endoftext|>",
         "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    return directory


def prompts_from_shakespeare(n: int = 4096, chars: int = 160, seed: int = 0) -> list[str]:
    from gpt2model.assets import asset_path

    text = asset_path("tinyshakespeare/input.txt").read_text(encoding="utf-8")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        i = rng.randrange(0, len(text) - chars)
        out.append(text[i:i + chars])
    return out


# --- servers ---------------------------------------------------------------------------------------
def _launch(kind: str, model_dir: Path, gguf: dict[str, Path], llama_dir: Path | None, port: int,
            threads: int, log: Path, base_src: Path | None = None) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(threads)}
    py = sys.executable
    kind, *options = kind.split("@")
    if kind.startswith("ours"):
        batch = "1" if kind == "ours-b1" else "8"
        cmd = [py, "-m", "gpt2model", "serve", "--model", str(model_dir), "--port", str(port), "--device", "cpu",
               "--max-batch", batch, "--max-queue", "64", "--model-name", "m"]
        if kind in ("ours-bf16", "ours-int8", "ours-f16"):
            cmd += ["--dtype", {"ours-bf16": "bfloat16", "ours-int8": "int8", "ours-f16": "f16"}[kind]]
        if kind == "ours-base":
            if base_src is None:
                raise FileNotFoundError("ours-base needs --base-src (another checkout's src folder)")
            env["PYTHONPATH"] = str(base_src)
        model = "m"
    elif kind in ("hf", "hf-cb"):
        cli = Path(py).with_name("transformers")
        cmd = [str(cli), "serve", str(model_dir), "--port", str(port), "--device", "cpu", "--dtype", "float32"]
        if kind == "hf-cb":
            cmd.append("--continuous-batching")
        model = str(model_dir)
    else:
        if llama_dir is None:
            raise FileNotFoundError("no llama.cpp build: pass --llama-dir or set LLAMA_CPP_DIR")
        ctx = json.loads((model_dir / "config.json").read_text())["n_positions"]
        cmd = [str(llama_dir / "build" / "bin" / "llama-server"), "-m", str(gguf[kind.split("-", 1)[1]]),
               "--port", str(port), "-np", "8", "-cb", "-c", str(8 * ctx), "-t", str(threads), "--no-webui"]
        model = "m"
    cmd += [f"--{option}" for option in options]
    # The server's log goes to a file: a pipe nobody reads fills up (64 KiB) and blocks a server
    # that logs every request -- llama-server then hangs mid-run.
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    return proc, model


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    import httpx

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
        for path in ("/health", "/v1/models"):
            try:
                if httpx.get(url + path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --- load ------------------------------------------------------------------------------------------
async def _one(client: Any, url: str, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    stamps: list[float] = []
    finish, usage = None, None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices") or []:
                if c.get("text"):
                    stamps.append(time.perf_counter())
                if c.get("finish_reason"):
                    finish = c["finish_reason"]
    tokens = usage["completion_tokens"] if usage else len(stamps)
    return {"status": 200, "start": t0, "stamps": stamps, "tokens": tokens, "finish": finish}


def _engine_stats(url: str) -> dict[str, float]:
    """Our server's engine counters from /metrics (empty for the peers)."""
    import httpx

    try:
        text = httpx.get(url + "/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}
    stats = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith("gpt2model_engine_"):
            with contextlib.suppress(ValueError):
                stats[name.removeprefix("gpt2model_engine_").removesuffix("_total")] = float(value)
    return stats


REQUEST_DEADLINE = 120.0  # seconds one request may take in all before it counts as hung


async def _level(url: str, model: str, prompts: list[str], clients: int, seconds: float,
                 max_tokens: int, drawn: Iterator[int] | None = None) -> dict[str, Any]:
    """One concurrency level. Every request takes the next prompt of ``drawn`` (one counter per
    server run), so no prompt repeats within a server's life: llama-server caches each slot's
    last prompt and reuses its longest common prefix (``cache_n`` in its timings), and repeated
    prompts (e.g. the warm-up's again in the first level) would measure its cache, not its
    prefill (a repeated 34-token prompt: 5.5 ms vs 26 ms uncached, f16, 1 thread)."""
    import httpx

    drawn = drawn if drawn is not None else itertools.count()

    before = await asyncio.to_thread(_engine_stats, url)
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    hung = 0
    deadline = time.perf_counter() + seconds
    # A fresh connection per request, for every server alike: with keep-alive, llama-server's
    # HTTP library closes idle pooled connections just as the client reuses them ("Server
    # disconnected without sending a response", the request never seen), a client artefact.
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:
        async def worker() -> None:
            nonlocal hung
            while time.perf_counter() < deadline:
                i = next(drawn)
                try:
                    # A total deadline per request: httpx's timeout is per read, and a wedged server
                    # (llama-server did this here once) would otherwise hold the run forever.
                    results.append(await asyncio.wait_for(
                        _one(client, url, model, prompts[i % len(prompts)], max_tokens), REQUEST_DEADLINE))
                except TimeoutError:
                    hung += 1
                    errors.append(f"no complete answer within {REQUEST_DEADLINE:.0f} s")
                    return
                except Exception as e:  # a broken stream is an error of the server under test
                    errors.append(f"{type(e).__name__}: {e}")

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    rejected = sum(r["status"] == 429 for r in results)
    bad_status = [r["status"] for r in results if r["status"] not in (200, 429)]
    ttft = [(r["stamps"][0] - r["start"]) * 1e3 for r in ok if r["stamps"]]
    itl = [(b - a) * 1e3 for r in ok for a, b in zip(r["stamps"], r["stamps"][1:], strict=False)]
    short = [r for r in ok if r["tokens"] < max_tokens and r["finish"] != "stop"]
    tokens = sum(r["tokens"] for r in ok)
    after = await asyncio.to_thread(_engine_stats, url)
    steps = after.get("steps", 0) - before.get("steps", 0)
    # Rows per decode step (ours only): how full continuous batching kept the batch.
    mean_batch = (after["step_rows"] - before["step_rows"]) / steps if steps and "step_rows" in after else None
    return {"clients": clients, "requests": len(ok), "tok_s": tokens / wall, "req_s": len(ok) / wall,
            "ttft_p50_ms": _pct(ttft, 0.5), "ttft_p99_ms": _pct(ttft, 0.99), "itl_p50_ms": _pct(itl, 0.5),
            "itl_p99_ms": _pct(itl, 0.99),
            "tokens_per_req": median(r["tokens"] for r in ok) if ok else None,
            "min_tokens": min((r["tokens"] for r in ok), default=None),
            "errors": len(errors) + len(bad_status), "rejected": rejected, "hung": hung, "mean_batch": mean_batch,
            "load": os.getloadavg()[0],
            "ok": "yes" if ok and not short and not errors and not bad_status else "FAILED",
            "error_samples": (errors + [f"HTTP {s}" for s in bad_status])[:3]}


def run(model_dir: Path, servers: list[str], levels: list[int], seconds: float, max_tokens: int,
        llama_dir: Path | None, threads: int, rounds: int = 1, base_src: Path | None = None) -> list[dict[str, Any]]:
    from gpt2model.export import export_gguf

    prompts = prompts_from_shakespeare()
    gguf: dict[str, Path] = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    rows = []
    try:
        for dtype in ("f32", "f16", "q8_0"):
            if f"llama-{dtype}" in servers and llama_dir is not None:
                gguf[dtype] = export_gguf(model_dir, tmp / f"m-{dtype}.gguf", dtype)
        for rnd, kind in ((r, k) for r in range(rounds) for k in servers):
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            try:
                proc, model = _launch(kind, model_dir, gguf, llama_dir, port, threads, tmp / f"{kind}.log", base_src)
            except FileNotFoundError as e:
                rows.append({"server": kind, "ok": f"skipped: {e}"})
                continue
            try:
                _wait_ready(url, proc, tmp / f"{kind}.log")
                drawn = itertools.count()  # the same prompts in the same order for every server
                asyncio.run(_level(url, model, prompts, 1, min(seconds, 5), 8, drawn))  # warm-up
                for clients in levels:
                    row = {"server": kind, "round": rnd,
                           **asyncio.run(_level(url, model, prompts, clients, seconds, max_tokens, drawn))}
                    rows.append(row)
                    print(format_table([row], COLUMNS), flush=True)
                    if row["hung"]:
                        row["ok"] = f"FAILED: {row['hung']} requests hung (server wedged); later levels skipped"
                        print(f"{kind}: {row['ok']}", flush=True)
                        break
            except Exception as e:
                rows.append({"server": kind, "ok": f"FAILED: {type(e).__name__}: {str(e)[:300]}"})
                print(f"{kind}: {rows[-1]['ok']}", flush=True)
            finally:
                _stop(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def medians(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (server, clients): each number the median over the rounds."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        if "clients" in r:
            groups.setdefault((r["server"], r["clients"]), []).append(r)
    out = []
    for (server, clients), rs in groups.items():
        row: dict[str, Any] = {"server": server, "clients": clients, "rounds": len(rs)}
        for key, value in rs[0].items():
            if key not in row and isinstance(value, (int, float)) and not isinstance(value, bool):
                values = [r[key] for r in rs if isinstance(r.get(key), (int, float))]
                row[key] = median(values) if values else None
        row["ok"] = "yes" if all(r["ok"] == "yes" for r in rs) else "FAILED"
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="model folder (default: random 6x384 GPT-2-BPE, ctx 256)")
    p.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated subset of {','.join(SERVERS)}")
    p.add_argument("--clients", default="1,4,8,16", help="concurrency levels (default 1,4,8,16)")
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per level (default 20)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default 64)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="compute threads per server")
    p.add_argument("--llama-dir", type=Path, default=os.environ.get("LLAMA_CPP_DIR"),
                   help="a llama.cpp tree with build/bin/llama-server (default: $LLAMA_CPP_DIR)")
    p.add_argument("--rounds", type=int, default=1, help="run the server list this many times, interleaved; "
                   "the summary is the median per row (default 1)")
    p.add_argument("--base-src", type=Path, default=None, help="the src folder ours-base runs (e.g. main's)")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: bench/results/serve-<time>.json)")
    args = p.parse_args(argv)
    servers = [s for s in args.servers.split(",") if s]
    unknown = sorted({s.split("@")[0] for s in servers} - set(SERVERS))
    if unknown:
        p.error(f"unknown servers {unknown}; choose from {', '.join(SERVERS)}")
    levels = [int(c) for c in args.clients.split(",")]
    tmp = None
    model_dir = args.model
    if model_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench_serve_model_"))
        model_dir = make_model(tmp / "gpt2-6x384")
    try:
        t0 = time.time()
        rows = run(model_dir, servers, levels, args.seconds, args.max_tokens, args.llama_dir, args.threads,
                   args.rounds, args.base_src)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    summary = medians(rows)
    print()
    print(format_table(summary, COLUMNS) if args.rounds > 1 else format_table([r for r in rows if "clients" in r],
                                                                             COLUMNS))
    for r in rows:
        if "clients" not in r:
            print(f"{r['server']}: {r['ok']}")
    results = {"machine": machine_info(), "model": str(args.model or "random 6x384 GPT-2-BPE, ctx 256"),
               "seconds_per_level": args.seconds, "max_tokens": args.max_tokens, "rounds": args.rounds,
               "rows": rows, "medians": summary,
               "started": t0, "load_after": os.getloadavg()}
    out = args.out or ROOT / "bench" / "results" / f"serve-{time.strftime('%Y%m%d-%H%M%S')}.json"
    print(f"wrote {write_json(results, out)}")
    return results


if __name__ == "__main__":
    main()
