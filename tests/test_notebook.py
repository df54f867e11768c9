"""The seed's notebook, test.ipynb, runs top to bottom headless."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "test.ipynb"


def test_notebook_runs(data_dir: Path, tmp_path: Path) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    env_backup = dict(os.environ)
    os.environ["GPT2MODEL_DATA"] = str(data_dir)  # the kernel inherits the environment
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        # A hang guard per cell, not a speed check: the 500-step training cell takes ~35 s on a quiet 2-core
        # CPU, but ~300 s when other jobs load both cores (OpenMP threads then wait on each other).
        client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                         resources={"metadata": {"path": str(tmp_path)}})
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(env_backup)
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "parameters: 10,770,816" in outputs
    assert "torch.Size([4, 32, 65])" in outputs
    assert "ROMEO:" in outputs
