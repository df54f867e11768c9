"""Shared test fixtures. Tests find data through GPT2MODEL_DATA (the Makefile points it at
../shared/data); tests that need those files skip with a reason only when they are absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

_SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
if "GPT2MODEL_DATA" not in os.environ and _SHARED.is_dir():
    os.environ["GPT2MODEL_DATA"] = str(_SHARED)

# Two cores: don't let each test oversubscribe them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
