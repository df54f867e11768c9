"""Smoke test of ``bench/bench_decode.py --matmuls`` (the decode matmul layouts): it runs on the
seed shape and reports every layout and kernel per dtype. It measures nothing (timings on a shared
machine mean nothing here); it checks that each method runs and computes the same product."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench_decode():
    spec = importlib.util.spec_from_file_location("bench_decode", ROOT / "bench" / "bench_decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_decode_matmul_method_computes_the_same_product() -> None:
    bench = _bench_decode()
    g = torch.Generator().manual_seed(0)
    W = torch.randn(96, 64, generator=g) * 0.02
    x = torch.randn(4, 64, generator=g)
    exact = x @ W.t()
    for dtype, tol in (("fp32", 1e-5), ("bf16", 2e-2), ("int8", 2e-2)):
        xd = x.bfloat16() if dtype == "bf16" else x
        for name, (prepare, run) in bench.matmul_methods(dtype, W, rows=4).items():
            if "compiled" in name:
                continue  # compiles; tests/test_quantize.py checks that path
            try:
                y = run(xd, prepare(W)).float()
            except RuntimeError:
                assert name == "mkldnn packed linear" and dtype == "bf16"  # no bf16 oneDNN linear on some CPUs
                continue
            assert (y - exact).abs().max() <= tol * exact.abs().max() + 1e-6, (dtype, name)


def test_matmuls_mode_writes_a_row_per_matrix_dtype_and_row_count(tmp_path: Path, run_script) -> None:
    out = tmp_path / "matmuls.json"
    proc = run_script(
        [sys.executable, str(ROOT / "bench" / "bench_decode.py"), "--matmuls", "--shapes", "seed", "--dtypes", "fp32",
         "--rows", "1,4", "--repeats", "1", "--out", str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [r for r in json.loads(out.read_text())["rows"] if "shape" in r]
    # The seed shape's head (65 ids) is too small to matter and is skipped: the three body matrices.
    assert {(r["matrix"], r["rows"]) for r in rows} == {(m, n) for m in ("qkv", "fc", "mlp proj") for n in (1, 4)}
    for r in rows:
        assert r["ms"]["F.linear(x, W) row-major"] > 0 and r["ms"]["F.linear(x, W) column-major (x @ Wt)"] > 0


def test_op_mode_times_the_whole_step_op_in_both_thread_modes(tmp_path: Path, run_script) -> None:
    out = tmp_path / "op.json"
    proc = run_script(
        [sys.executable, str(ROOT / "bench" / "bench_decode.py"), "--op", "--shapes", "seed", "--dtypes", "int8",
         "--threads", "2", "--repeats", "1", "--calls", "3", "--out", str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    modes = [(r["dtype"], r["mode"], r["calls"]) for r in rows]
    assert modes == [("int8", "all threads", 3), ("int8", "one thread", 3)]
    assert all(0 < r["min_ms"] <= r["median_ms"] and r["memory_floor_ms"] > 0 for r in rows)
