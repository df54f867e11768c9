"""Smoke test of the benchmark harness (``make bench``): it runs end to end on tiny shapes.

It measures nothing: timings of a tiny model on a shared machine mean nothing. It checks that the
harness runs, writes the JSON it promises, and that ours and HF train the same function (equal
first losses from equal weights), which is what makes the ratios comparable.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_harness_runs_on_tiny_shapes(tmp_path: Path, data_dir: Path, run_script) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "GPT2MODEL_DATA": str(data_dir), "OMP_NUM_THREADS": "1"}  # tiny ops: see test_speed_paths
    proc = run_script(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--tiny", "--no-compile", "--only", "train,curve",
         "--out", str(out)],
        env=env, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tokens/s" in proc.stdout and "vs HF" in proc.stdout  # the table was printed

    results = json.loads(out.read_text())
    assert results["matmul_peak_gflops"]["fp32"] > 0 and results["matmul_peak_gflops"]["bf16"] > 0
    rows = {row["case"]: row for row in results["train"]}
    assert set(rows) == {"ours fp32", "hf fp32", "ours bf16", "hf bf16"}
    for row in rows.values():
        assert row["tok_s_min"] <= row["tok_s"] <= row["tok_s_max"]
        assert row["mfu_pct"] > 0 and row["rss_mib"] > 0
    assert rows["ours fp32"]["vs_hf"] > 0 and rows["ours bf16"]["vs_hf"] > 0
    # Same weights, same batch: the two implementations must agree on the loss before any step.
    assert math.isclose(rows["ours fp32"]["first_loss"], rows["hf fp32"]["first_loss"], rel_tol=1e-5)
    assert math.isclose(rows["ours bf16"]["first_loss"], rows["hf bf16"]["first_loss"], rel_tol=1e-2)

    curve = results["curve"]
    assert len(curve["fp32"]) == len(curve["bf16"]) == curve["steps"] == 10
    assert all(math.isfinite(v) for v in curve["fp32"] + curve["bf16"])
    assert curve["fp32"][-1] < curve["fp32"][0]  # it trains


def test_bench_rejects_unknown_section(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    bench_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_run)
    with pytest.raises(SystemExit) as exc:
        bench_run.parse_args(["--only", "train,trian"])
    assert exc.value.code == 2
    assert "unknown section(s) ['trian']" in capsys.readouterr().err
