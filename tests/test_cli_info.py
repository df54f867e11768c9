"""The `gpt2` entry points: console script wiring, `python -m gpt2model`, and `gpt2 info`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gpt2model import GPT, GPTconfig
from gpt2model.cli import main


def test_python_dash_m_help() -> None:
    out = subprocess.run([sys.executable, "-m", "gpt2model", "--help"], capture_output=True, text=True, check=True)
    assert "usage: gpt2" in out.stdout and "info" in out.stdout


@pytest.mark.parametrize("command", ["prepare", "info", "train", "sample", "eval", "serve", "export"])
def test_every_command_prints_its_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    # argparse formats help strings with %: a stray "%" in one makes --help a traceback.
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and f"usage: gpt2 {command}" in capsys.readouterr().out


def test_info_preset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "gpt2"]) == 0
    assert "parameters: 124,439,808" in capsys.readouterr().out


def test_info_model_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    GPT(GPTconfig(n_layer=1, d_model=32, n_head=2, context_length=16)).save_pretrained(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    assert '"n_layer": 1' in capsys.readouterr().out


def test_info_reads_the_config_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """info counts parameters from config.json alone (it loaded the weights, and for a preset built the
    model in memory: gpt2-xl took 37 s and 6 GB), so a folder without weights is enough."""
    model = GPT(GPTconfig(n_layer=3, d_model=32, n_head=2, context_length=16))
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert '"n_layer": 3' in out and f"parameters: {model.num_params():,}" in out


def test_info_reads_a_folder_named_like_a_preset(tmp_path: Path, monkeypatch, capsys) -> None:
    """A model folder called shakespeare-char (a run's --out) was shadowed by the preset of that name."""
    GPT(GPTconfig(n_layer=1, d_model=32, n_head=2, context_length=16)).save_pretrained(tmp_path / "shakespeare-char")
    monkeypatch.chdir(tmp_path)
    assert main(["info", "shakespeare-char"]) == 0
    assert '"n_layer": 1' in capsys.readouterr().out


def test_info_bad_path_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt2 info: error: no model folder at") and "Traceback" not in err
