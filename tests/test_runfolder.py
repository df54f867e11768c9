"""The run folder under stress (issue 14): one process per folder (a lock naming the PID, gone with
the process), a best/ that readers always find whole, a disk that fills up mid-checkpoint, a run
killed before its first checkpoint, fine-tuning from the folder being overwritten, and the
messages when a run stops."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2model import GPT
from gpt2model.checkpoint import CheckpointError
from gpt2model.cli import main
from gpt2model.config import TrainConfig
from gpt2model.data import prepare_dataset
from gpt2model.fileio import FolderBusyError, FolderLock, replace_dir
from gpt2model.runfolder import (
    BEST_DIR,
    BEST_INFO_FILE,
    LOCK_FILE,
    METRICS_FILE,
    TRAINING_STATE_FILE,
    best_so_far,
    load_training_state,
    lock_run_folder,
)
from gpt2model.train import NonFiniteLossError, train

TINY = dict(n_layer=1, n_head=2, d_model=16, context_length=16, batch_size=4, eval_steps=1, device="cpu",
            dtype="float32")
CLI_TINY = ["--n-layer", "1", "--n-head", "2", "--d-model", "16", "--context-length", "16", "--batch-size", "4",
            "--eval-steps", "1", "--device", "cpu", "--dtype", "float32"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "t.txt").write_text("To be, or not to be, that is the question:\n" * 60, encoding="utf-8")
    return prepare_dataset(root / "t.txt", root / "ds", tokenizer="char", progress=False)


def tiny(dataset: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(data=str(dataset), out=str(out), **{**TINY, **kw})


# --- one process per run folder -------------------------------------------------------------------
def test_a_second_train_on_a_live_run_folder_fails_at_once_naming_the_pid(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    train(tiny(dataset, out, max_steps=2, eval_interval=2))
    with lock_run_folder(out):  # what a live `gpt2 train --out OUT` holds
        for kw in ({"overwrite": True}, {"resume": True}):
            with pytest.raises(FolderBusyError, match=f"run folder {out} is in use by PID {os.getpid()}"):
                train(tiny(dataset, out, max_steps=4, eval_interval=4, **kw))
    assert load_training_state(out)["step"] == 2  # untouched
    assert train(tiny(dataset, out, max_steps=3, eval_interval=3, resume=True)).step == 3  # released


def test_a_sigkilled_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from gpt2model.fileio import FolderLock; "
                               f"FolderLock({str(tmp_path / LOCK_FILE)!r}, 'x').acquire(); print('held', flush=True);"
                               " time.sleep(60)"], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderBusyError, match=f"PID {holder.pid}"):
            FolderLock(tmp_path / LOCK_FILE, "run folder").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    FolderLock(tmp_path / LOCK_FILE, "run folder").acquire().release()  # the OS dropped the lock


def test_cli_reports_a_busy_folder_in_one_line(dataset: Path, tmp_path: Path, capsys) -> None:
    with lock_run_folder(tmp_path / "out"):
        assert main(["train", "--data", str(dataset), "--out", str(tmp_path / "out"), "--max-steps", "1",
                     *CLI_TINY]) == 1
    err = capsys.readouterr().err
    assert f"is in use by PID {os.getpid()}" in err and "Traceback" not in err


# --- best/ is always whole for readers ------------------------------------------------------------
WRITER = """
import sys, time, torch
from pathlib import Path
from gpt2model import GPT, GPTconfig
from gpt2model.runfolder import save_best
torch.manual_seed(0)
models = [GPT(GPTconfig(n_layer=1, n_head=2, d_model=16, context_length=16, vocab_size=20)) for _ in range(2)]
out, swaps = Path(sys.argv[1]), 0
save_best(out, models[0], None, 0, 1.0)
print("ready", flush=True)
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    save_best(out, models[swaps % 2], None, swaps, 1.0)
    swaps += 1
print(swaps, flush=True)
"""


def test_readers_always_find_a_complete_best_folder_while_it_is_replaced(tmp_path: Path) -> None:
    """A writer process replaces best/ back to back while this process loads it in a loop (the
    issue saw 68 of ~2,100 such loads fail with the old two-rename swap)."""
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), "4"], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"),
                                   "OMP_NUM_THREADS": "1"})
    assert writer.stdout.readline().strip() == "ready"
    failures, loads = [], 0
    while writer.poll() is None:
        try:  # what a loader reads, in a tight loop (the gap, if any, lasts microseconds); a full load now and then
            json.loads((tmp_path / "best" / "config.json").read_text())
            (tmp_path / "best" / "model.safetensors").stat()
            if loads % 100 == 0:
                GPT.from_pretrained(tmp_path / "best")
        except Exception as e:  # noqa: BLE001 - any failure to load is what this test counts
            failures.append(f"{type(e).__name__}: {e}")
        loads += 1
    swaps = int(writer.stdout.readline())
    assert swaps >= 20 and loads >= 20
    assert not failures, f"{len(failures)} of {loads} loads failed during {swaps} swaps: {failures[:3]}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no debris


def test_replace_dir_without_an_atomic_exchange_still_swaps_whole_folders(tmp_path: Path, monkeypatch) -> None:
    import gpt2model.fileio as fileio

    monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)  # e.g. macOS: the two-rename fallback
    for version in ("one", "two"):
        src = tmp_path / f"src-{version}"
        src.mkdir()
        (src / "a.txt").write_text(version)
        replace_dir(src, tmp_path / "best")
        assert (tmp_path / "best" / "a.txt").read_text() == version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


# --- disk full ------------------------------------------------------------------------------------
def test_disk_full_mid_checkpoint_keeps_the_previous_checkpoint(dataset: Path, tmp_path: Path, monkeypatch,
                                                                capsys) -> None:
    import gpt2model.runfolder as runfolder

    out = tmp_path / "out"
    args = ["train", "--data", str(dataset), "--out", str(out), "--eval-interval", "100", "--checkpoint-interval",
            "2", *CLI_TINY]
    assert main([*args, "--max-steps", "2"]) == 0
    before = load_training_state(out)
    real_init = runfolder._RecordingWriter.__init__

    class FullDisk:  # the training-state file on a disk that fills up after 1000 bytes
        def __init__(self, f) -> None:
            self.f = f

        def write(self, data: bytes) -> int:
            if self.f.tell() + len(data) > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def flush(self) -> None:
            self.f.flush()

    monkeypatch.setattr(runfolder._RecordingWriter, "__init__", lambda self, f: real_init(self, FullDisk(f)))
    capsys.readouterr()
    assert main([*args, "--max-steps", "4", "--resume"]) == 1
    err = capsys.readouterr().err
    assert "no space left on /" in err and f"while writing {out / TRAINING_STATE_FILE}" in err
    assert f"the previous checkpoint at {out} (step 2) is intact" in err and "Traceback" not in err
    monkeypatch.undo()
    after = load_training_state(out)
    assert after["step"] == 2 and torch.equal(after["model"]["transformer.wte.weight"],
                                              before["model"]["transformer.wte.weight"])
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]  # the half-written temp file is gone
    assert main([*args, "--max-steps", "4", "--resume"]) == 0  # and the run goes on from it


# --- interrupted and odd starts -------------------------------------------------------------------
def test_a_run_killed_before_its_first_checkpoint_can_be_started_again(dataset: Path, tmp_path: Path,
                                                                      capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / METRICS_FILE).write_text('{"step": 1, "train_loss": 4.0}\n')  # what such a run leaves
    with pytest.raises(ValueError, match="--resume to start it again"):
        train(tiny(dataset, out, max_steps=2, eval_interval=2))
    result = train(tiny(dataset, out, max_steps=2, eval_interval=2, resume=True))
    assert result.step == 2 and "starting it again from step 0" in capsys.readouterr().out
    assert load_training_state(out)["step"] == 2


@pytest.mark.parametrize("source", ["out", "out/best"])
def test_init_from_the_folder_being_overwritten_reads_it_first(dataset: Path, tmp_path: Path, source: str) -> None:
    out = tmp_path / "out"
    first = train(tiny(dataset, out, max_steps=3, eval_interval=3))
    tuned = train(tiny(dataset, out, init_from=str(tmp_path / source), overwrite=True, max_steps=1,
                       eval_interval=1, n_layer=None, n_head=None, d_model=None))
    assert tuned.step == 1 and tuned.model.config.d_model == first.model.config.d_model
    assert load_training_state(out)["step"] == 1


def test_nan_loss_before_any_checkpoint_does_not_advise_resume(dataset: Path, tmp_path: Path, monkeypatch) -> None:
    import gpt2model.model as model_module

    real = model_module.linear_cross_entropy
    monkeypatch.setattr(model_module, "linear_cross_entropy", lambda x, w, y: real(x, w, y) * float("nan"))
    with pytest.raises(NonFiniteLossError, match="nothing to resume") as e:
        train(tiny(dataset, tmp_path / "out", max_steps=4, eval_interval=100))
    assert "--resume" not in str(e.value)


@pytest.mark.parametrize("option, value", [("--lr", "inf"), ("--min-lr", "nan"), ("--grad-clip", "nan")])
def test_non_finite_numbers_are_refused(dataset: Path, tmp_path: Path, option: str, value: str, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--data", str(dataset), "--out", str(tmp_path / "o"), option, value])
    assert "is not a finite number" in capsys.readouterr().err
    with pytest.raises(ValueError, match="must be a finite number"):
        tiny(dataset, tmp_path / "o", **{option[2:].replace("-", "_"): float(value)})


def test_a_step_that_will_take_very_long_is_announced(dataset: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import gpt2model.train as train_module

    monkeypatch.setattr(train_module, "measure_matmul_peak", lambda dtype, device: 1e3)  # a very slow device
    train(tiny(dataset, tmp_path / "out", max_steps=1, eval_interval=1))
    assert "warning: one optimizer step needs at least" in capsys.readouterr().out


@pytest.mark.parametrize("content", ['[1.5]', '{"step": 10}', '{"val_loss": "low"}', '{"val_loss": NaN}'])
def test_a_damaged_best_json_stops_the_resume_with_the_fix(tmp_path: Path, content: str) -> None:
    (tmp_path / BEST_DIR).mkdir()
    (tmp_path / BEST_DIR / BEST_INFO_FILE).write_text(content)
    with pytest.raises(CheckpointError, match="damaged.*move the .*best folder aside"):
        best_so_far(tmp_path, {"best_val_loss": 2.0})


def test_best_so_far_trusts_the_lower_of_the_state_and_best_json(tmp_path: Path) -> None:
    assert best_so_far(tmp_path, None) == math.inf
    assert best_so_far(tmp_path, {"best_val_loss": 2.0}) == 2.0  # no best/ yet
    (tmp_path / BEST_DIR).mkdir()
    (tmp_path / BEST_DIR / BEST_INFO_FILE).write_text('{"step": 10, "val_loss": 1.5}')
    assert best_so_far(tmp_path, {"best_val_loss": 2.0}) == 1.5  # killed between best/ and the state
    assert best_so_far(tmp_path, {"best_val_loss": 1.0}) == 1.0
