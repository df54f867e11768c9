"""Shared test fixtures. Tests find data through GPT2MODEL_DATA (the Makefile points it at
../shared/data); tests that need those files skip with a reason only when they are absent."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

_SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
if "GPT2MODEL_DATA" not in os.environ and _SHARED.is_dir():
    os.environ["GPT2MODEL_DATA"] = str(_SHARED)

# Triton (where installed) has no CPU backend; its interpreter runs kernels on CPU tensors, which is
# how tests/test_loss_kernel.py checks the fused loss kernel without a GPU. It takes effect only if
# set before triton's first import (gpt2model imports it when present), so it is set here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two cores: don't let each test oversubscribe them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def one_thread():
    """Run the test with one torch thread (tiny models: thread hand-offs cost more than they save)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def data_dir() -> Path:
    """The folder with tinyshakespeare/ and gpt2/ (skips if unavailable)."""
    d = Path(os.environ.get("GPT2MODEL_DATA", ""))
    if not (d / "tinyshakespeare" / "input.txt").is_file():
        pytest.skip("data files not found: set GPT2MODEL_DATA to a folder like ../shared/data")
    return d


@pytest.fixture
def shakespeare_text(data_dir: Path) -> str:
    return (data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")


def _run_in_own_group(args: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(args, capture_output=True, text=True)`` in a new process group, killing the
    whole group on a timeout: the benchmark scripts start children of their own, which a plain
    ``subprocess.run`` timeout would leave running (orphaned) after the test failed."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # any child the script left behind
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


@pytest.fixture
def run_script():
    """Run a script as in ``subprocess.run(..., capture_output=True, text=True, timeout=...)``; on a
    timeout its whole process group is killed."""
    return _run_in_own_group
