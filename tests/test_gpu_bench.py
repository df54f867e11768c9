"""bench/gpu.py (the GPU training benchmark of issue 11) end to end on a CPU with tiny shapes.

It measures nothing (tiny shapes on a shared CPU): it checks that every case builds, trains and
reports, that HF and a nanoGPT-interface model (tests/fixtures/nanogpt_like/, our own stand-ins: nanoGPT's
files are not in this repository) receive
exactly our weights, and that the recipe section trains with our CLI, lays out nanoGPT's folder for its
train.py and writes its JSON.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_runs_on_cpu_with_tiny_shapes(tmp_path: Path, data_dir: Path, run_script) -> None:
    out = tmp_path / "gpu.json"
    env = {**os.environ, "GPT2MODEL_DATA": str(data_dir), "OMP_NUM_THREADS": "1"}
    proc = run_script(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--device", "cpu", "--tiny", "--no-compile",
         # A relative --nanogpt path (from the working folder): the recipe runs nanoGPT in another folder.
         "--nanogpt", os.path.join("tests", "fixtures", "nanogpt_like", "model.py"), "--out", str(out)],
        env=env, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tokens/s" in proc.stdout and "best val loss" in proc.stdout  # both tables printed

    results = json.loads(out.read_text())
    assert results["matmul_peak_tflops"] > 0
    rows = {row["case"]: row for row in results["step"]}
    assert set(rows) == {"ours eager", "HF GPT2LMHeadModel eager", "nanoGPT eager"}
    for row in rows.values():
        assert 0 < row["tok_s_min"] <= row["tok_s"] <= row["tok_s_max"]
        assert row["mfu_pct"] > 0 and row["peak_mem_gib"] > 0
        assert math.isfinite(row["first_loss"]) and math.isfinite(row["last_loss"])
    # The weights arrived intact in both peers, and ours and HF compute the same loss.
    assert rows["HF GPT2LMHeadModel eager"]["max_logit_diff_vs_ours"] < 1e-5
    assert rows["nanoGPT eager"]["max_logit_diff_vs_ours"] < 1e-5
    assert math.isclose(rows["ours eager"]["first_loss"], rows["HF GPT2LMHeadModel eager"]["first_loss"],
                        rel_tol=1e-5)

    recipe = {row["impl"]: row for row in results["recipe"]}
    assert recipe["ours"]["steps"] == 20 and recipe["ours"]["best_val"] < math.log(65)  # it learned something
    assert recipe["ours"]["train_s"] > 0 and recipe["ours"]["wall_s"] >= recipe["ours"]["train_s"]
    # The fixture's stand-in train.py checks nanoGPT's folder layout and prints the uniform loss.
    assert recipe["nanoGPT"]["best_val"] == round(math.log(65), 4), recipe["nanoGPT"]


def test_gpu_bench_loss_kernel_cases_and_loss_section(tmp_path: Path, run_script) -> None:
    """The loss kernel's levers: ``--cases`` picks lever cases without ``--levers``; the torch-loss
    case sets model.LOSS_KERNEL in its process, and each row says which loss code ran (on a CPU the
    torch ops either way; on CUDA the default case reports the Triton kernel). The ``loss`` section
    times the loss pass alone (inductor; the kernel only on CUDA, or in Triton's interpreter)."""
    out = tmp_path / "gpu.json"
    proc = run_script(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--device", "cpu", "--tiny", "--no-compile",
         "--only", "step,loss", "--cases", "ours eager; ours eager, torch loss", "--out", str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    rows = {row["case"]: row for row in results["step"]}
    assert set(rows) == {"ours eager", "ours eager, torch loss"}
    assert rows["ours eager"]["loss_kernel"] == rows["ours eager, torch loss"]["loss_kernel"] == "torch"
    assert rows["ours eager, torch loss"]["note"].endswith("loss: torch ops")
    assert rows["ours eager"]["first_loss"] == rows["ours eager, torch loss"]["first_loss"]
    loss_rows = results["loss"]
    assert loss_rows[0]["case"] == "inductor (torch ops compiled)" and loss_rows[0]["ms"] > 0
    assert loss_rows[0]["gb_s"] > 0 and loss_rows[0]["vs_inductor"] == 1.0
    assert "Loss pass alone" in proc.stdout
    for row in loss_rows[1:]:  # the kernel's rows: run (the interpreter) and matching, or said why not
        assert ("max diff vs inductor" in row["note"] and float(row["note"].split()[4]) < 1e-5
                or row["note"] == "not run: needs Triton and a CUDA device"), row


def _decode_rows(tmp_path: Path, data_dir: Path, run_script, *extra: str) -> tuple[dict, str]:
    out = tmp_path / "decode.json"
    env = {**os.environ, "GPT2MODEL_DATA": str(data_dir), "OMP_NUM_THREADS": "1"}
    proc = run_script([sys.executable, str(ROOT / "bench" / "gpu.py"), "--device", "cpu", "--tiny", "--only", "decode",
                       "--profile", "1", "--out", str(out), *extra], env=env, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {(row["case"], row.get("batch")): row for row in json.loads(out.read_text())["decode"]}
    return rows, proc.stdout


def _check_decode_rows(rows: dict, cases: set[str]) -> None:
    assert {case for case, _ in rows} == cases and {batch for _, batch in rows} == {1, 2}
    for (case, _), row in rows.items():
        assert row["tok_s"] > 0 and row["decode_ms"] > 0 and row["first_token_ms"] > 0, row
        assert "failed" not in str(row.get("note", "")) and "FAILED" not in str(row.get("note", "")), row
        if case != "ours eager":
            assert row["vs_eager"] > 0 and row["vs_hf"] > 0
    assert rows[("HF generate", 1)]["same_greedy"] == rows[("HF generate", 2)]["same_greedy"] == "yes"


def test_gpu_bench_decode_section_runs_on_cpu(tmp_path: Path, data_dir: Path, run_script) -> None:
    """The decode section (issue 10) end to end, eager cases: tokens/s of whole calls, decode-only
    ms per token and time to the first token per (case, batch), HF's greedy tokens compared with
    ours, and --profile's kernel table with the ops run outside graphs per token."""
    rows, stdout = _decode_rows(tmp_path, data_dir, run_script, "--no-compile")
    _check_decode_rows(rows, {"ours eager", "ours int8 eager", "HF generate"})
    assert "--- profile: decode ours, batch 1" in stdout and "outside graphs per new token" in stdout


@pytest.mark.slow
def test_gpu_bench_decode_section_compiled_runs_on_cpu(tmp_path: Path, data_dir: Path, run_script) -> None:
    """The same with the compiled cases (as on a GPU; CUDA graphs need a GPU, the CPU compiles the
    same step without them): the compiled and int8 compiled steps compile and give eager's tokens."""
    rows, stdout = _decode_rows(tmp_path, data_dir, run_script)
    _check_decode_rows(rows, {"ours eager", "ours compiled", "ours int8 compiled", "HF generate"})
    assert rows[("ours compiled", 1)]["same_greedy"] == rows[("ours compiled", 2)]["same_greedy"] == "yes"
    assert rows[("ours compiled", 1)]["note"] == "seeded sample = eager: yes"
    assert "--- profile: decode ours compiled, batch 1" in stdout
