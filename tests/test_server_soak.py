"""Soak test of `gpt2 serve` (slow; `make test-soak`): 64 concurrent clients for 60 s against a
server subprocess, with random disconnects and malformed requests mixed in. The server must keep
answering, every accepted request must complete (or be cancelled by its client leaving), no slot may
leak (/metrics back to 0 running and 0 queued) and its resident memory must stay flat."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")
pytest.importorskip("fastapi")

from gpt2model import GPT, GPTconfig, load_tokenizer  # noqa: E402

CLIENTS = int(os.environ.get("SOAK_CLIENTS", 64))
SECONDS = float(os.environ.get("SOAK_SECONDS", 60))
MALFORMED = [b"", b"{", b"\xff\xfe", b"[]", b'{"prompt": null}', b'{"prompt": "x", "temperature": NaN}',
             b'{"prompt": "x", "max_tokens": -3}', b'{"prompt": "x", "max_tokens": 100000}', b'{"prompt": [-1]}',
             b'{"prompt": "x", "top_p": 7}', b'{"prompt": "x", "bogus": 1}', b'{"messages": "hi"}',
             b"[" * 50000, b'{"prompt": "x", "stream": "yes"}']


def _metric(text: str, name: str) -> float:
    return float(next(ln.split()[1] for ln in text.splitlines() if ln.startswith(name + " ")))


@pytest.mark.slow
def test_soak_64_clients_with_disconnects_and_malformed_requests(tmp_path):
    if not (Path(os.environ.get("GPT2MODEL_DATA", "")) / "gpt2" / "encoder.json").is_file():
        pytest.skip("GPT-2 tokenizer files not found: set GPT2MODEL_DATA")
    torch.manual_seed(0)
    GPT(GPTconfig(vocab_size=50257, context_length=64, n_layer=2, n_head=2, d_model=64)).save_pretrained(
        tmp_path / "m", tokenizer=load_tokenizer("gpt2"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "gpt2model", "serve", "--model", str(tmp_path / "m"), "--port",
                             str(port), "--device", "cpu", "--max-batch", "8", "--max-queue", "32"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.perf_counter()
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.perf_counter() - t0 < 120
            time.sleep(0.2)
        counts = asyncio.run(_soak(url, psutil.Process(proc.pid)))
        print(counts)
        # Every accepted request completed (or its client left); nothing else happened.
        assert counts["incomplete"] == 0 and counts["unexpected"] == [], counts
        assert counts["completed"] > 100 and counts["disconnected"] > 10 and counts["malformed"] > 10
        # No slot leaks: everything drains back to zero.
        t0 = time.perf_counter()
        while True:
            m = httpx.get(url + "/metrics").text
            if _metric(m, "gpt2model_requests_running") == 0 and _metric(m, "gpt2model_requests_queued") == 0:
                break
            assert time.perf_counter() - t0 < 10, m
            time.sleep(0.1)
        # Resident memory flat: the second half of the run grew it by less than 10% (plus 20 MiB slack).
        rss = counts["rss_mib"]
        assert rss[-1] < rss[len(rss) // 2] * 1.10 + 20, rss
        r = httpx.post(url + "/v1/completions", json={"prompt": "still", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


async def _soak(url: str, server: psutil.Process) -> dict:
    counts = {"completed": 0, "disconnected": 0, "malformed": 0, "rejected": 0, "incomplete": 0,
              "unexpected": [], "rss_mib": []}
    deadline = time.perf_counter() + SECONDS
    limits = httpx.Limits(max_connections=CLIENTS * 2, max_keepalive_connections=CLIENTS)

    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def worker(seed: int) -> None:
            rng = random.Random(seed)
            while time.perf_counter() < deadline:
                roll = rng.random()
                try:
                    if roll < 0.15:
                        r = await client.post(url + "/v1/completions", content=rng.choice(MALFORMED),
                                              headers={"Content-Type": "application/json"})
                        if 400 <= r.status_code < 500 and "error" in r.json():
                            counts["malformed"] += 1
                        else:
                            counts["unexpected"].append(("malformed", r.status_code, r.text[:100]))
                        continue
                    body = {"prompt": rng.choice(["To be", "ROMEO:", "The", "Once upon"]),
                            "max_tokens": rng.randint(1, 40), "temperature": rng.choice([0, 0.8, 1.0]),
                            "stream": roll < 0.7}
                    if body["stream"]:
                        leave_after = rng.randint(1, 10) if roll < 0.3 else None
                        async with client.stream("POST", url + "/v1/completions", json=body) as r:
                            if r.status_code == 429:
                                counts["rejected"] += 1
                                await asyncio.sleep(0.2)  # a polite client backs off
                                continue
                            if r.status_code != 200:
                                counts["unexpected"].append(("stream", r.status_code))
                                continue
                            lines, done = 0, False
                            async for line in r.aiter_lines():
                                lines += line.startswith("data: ")
                                done = done or line == "data: [DONE]"
                                if leave_after is not None and lines >= leave_after:
                                    break  # the client disconnects mid-stream
                            if leave_after is not None and not done:
                                counts["disconnected"] += 1
                            elif done:
                                counts["completed"] += 1
                            else:
                                counts["incomplete"] += 1
                    else:
                        r = await client.post(url + "/v1/completions", json=body)
                        if r.status_code == 429:
                            counts["rejected"] += 1
                            await asyncio.sleep(0.2)
                        elif r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length"):
                            counts["completed"] += 1
                        else:
                            counts["unexpected"].append(("plain", r.status_code, r.text[:100]))
                except httpx.HTTPError as e:
                    counts["unexpected"].append(("transport", type(e).__name__, str(e)[:100]))

        async def sample_rss() -> None:
            while time.perf_counter() < deadline:
                counts["rss_mib"].append(server.memory_info().rss / 2**20)
                await asyncio.sleep(2)

        await asyncio.gather(sample_rss(), *(worker(i) for i in range(CLIENTS)))
    return counts
