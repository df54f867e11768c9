"""The run folder of ``gpt2 train --out OUT``: its layout, the training state that ``--resume``
reads, the metrics log, the loss plot and the best model.

    OUT/config.json, OUT/model.safetensors, tokenizer files   the latest model (an export for users)
    OUT/training_state.pt   step, a copy of the weights, optimizer, grad scaler, RNG states, sampler,
                            best val loss, configs: everything --resume needs, in ONE file
    OUT/metrics.jsonl       one JSON record per step (train loss, lr, tokens/s, MFU; val loss at evals)
    OUT/loss.png            the loss curves, redrawn at the end of a run
    OUT/best/               model folder of the best val loss so far (+ best.json: step, val loss)
    OUT/.train.lock         held (fcntl.flock) by the process training into OUT; holds its PID

Consistency under a kill at any instant: every file is replaced atomically (``fileio``: write a
temp file, fsync, rename), and the training state carries its own copy of the weights, so the state
that resume reads is always internally consistent (weights, optimizer and step from the same
moment). The model export is written *before* the state; a kill between the two leaves the export
one checkpoint ahead of the state, and resume re-exports the state's weights before going on.
``best/`` is written aside and swapped in whole (:func:`fileio.replace_dir`: one atomic exchange
on Linux, so a reader loading ``OUT/best`` during training always finds a complete folder); a kill
mid-swap is undone at the next start. One process at a time: :func:`lock_run_folder` fails a
second ``train`` (or a ``--resume`` of a live run) at once, naming the PID that holds the folder.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from .checkpoint import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, read_json, save_model, unwrap_model
from .fileio import (
    FolderLock,
    atomic_path,
    atomic_write_json,
    recover_dir,
    remove_stale_temporaries,
    remove_tree,
    replace_dir,
    temp_sibling,
)
from .model import GPT

TRAINING_STATE_FILE = "training_state.pt"
TRAINING_STATE_VERSION = 1
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
BEST_DIR = "best"
BEST_INFO_FILE = "best.json"
LOCK_FILE = ".train.lock"


def lock_run_folder(out: Path) -> FolderLock:
    """Take the run folder's exclusive lock (released when the process ends, however it ends)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a folder")
    return FolderLock(out / LOCK_FILE, f"run folder {out}").acquire()


# --- training state -------------------------------------------------------------------------------
def save_training_checkpoint(directory: str | Path, model: GPT, state: dict[str, Any], *,
                             tokenizer: Any = None) -> None:
    """Write the model export (config.json's eos ids from ``tokenizer``, whose files are already
    in the folder), then
    atomically the training ``state`` (which gets the weights added under ``"model"``). ``state``
    must hold only tensors and plain Python data (``weights_only``)."""
    directory = Path(directory)
    model = unwrap_model(model)
    save_model(model, directory, tokenizer, save_tokenizer=False)
    weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    with atomic_path(directory / TRAINING_STATE_FILE) as tmp, open(tmp, "wb") as f:
        writer = _RecordingWriter(f)
        try:
            torch.save({**state, "version": TRAINING_STATE_VERSION, "model": weights}, writer)
        except RuntimeError:
            if writer.error is not None:  # torch reports a failed write as "unexpected pos ..."; say why
                raise writer.error from None
            raise


class _RecordingWriter:
    """A file wrapper that remembers the OSError (e.g. ENOSPC) that torch.save turns into a bare
    RuntimeError."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def load_training_state(directory: str | Path) -> dict[str, Any]:
    """Read ``training_state.pt`` without unpickling code (``torch.load(weights_only=True)``)."""
    path = Path(directory) / TRAINING_STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {directory} holds no resumable run (train without --resume "
                              f"to start one)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file raises many types
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or state.get("version") != TRAINING_STATE_VERSION:
        raise CheckpointError(f"{path} is not a version-{TRAINING_STATE_VERSION} training state")
    return state


def rng_state() -> dict[str, Any]:
    """All random-number streams training touches (python, numpy, torch CPU, CUDA), as
    ``weights_only``-loadable data."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), py_gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device's generator
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, py_gauss = state["python"]
    random.setstate((version, tuple(internal), py_gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --- metrics and plot -----------------------------------------------------------------------------
def read_metrics(out: str | Path, max_step: int | None = None) -> list[dict[str, Any]]:
    """The records of ``OUT/metrics.jsonl`` (up to ``max_step``), skipping a torn last line."""
    path = Path(out) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if max_step is None or record["step"] <= max_step:
            records.append(record)
    return records


def open_metrics(out: Path, resumed_step: int | None) -> IO[str]:
    """``OUT/metrics.jsonl`` opened for appending, holding only the records up to ``resumed_step``
    (None: a fresh run, an empty log). What a killed run logged after its last checkpoint is
    dropped: those steps are about to be redone."""
    kept = read_metrics(out, max_step=resumed_step) if resumed_step is not None else []
    with atomic_path(out / METRICS_FILE) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    return open(out / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115 - the caller closes it


def plot_losses(records: Sequence[dict[str, Any]], path: str | Path) -> None:
    """PNG of per-step train loss and the eval-time train/val losses against step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)  # the object API: no pyplot global state, no display needed
    ax = fig.add_subplot()
    ax.plot([r["step"] for r in records], [r["train_loss"] for r in records], lw=0.6, alpha=0.5,
            label="train (each step)")
    evals = [r for r in records if "val_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["train_eval_loss"] for r in evals], "o-", label="train (eval)")
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


# --- the folder as a whole ------------------------------------------------------------------------
def check_out(out: Path, *, resume: bool, overwrite: bool) -> bool:
    """Refuse to mix two runs in one folder unless told to resume or overwrite. Returns whether
    there is a run to resume: ``resume`` on a run killed before its first checkpoint (metrics but
    no training state) starts it again from step 0, with a note."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a folder")
    has_state = (out / TRAINING_STATE_FILE).is_file()
    if resume:
        if not has_state and (out / METRICS_FILE).is_file():
            print(f"note: {out} holds no checkpoint yet (the run stopped before its first checkpoint); starting "
                  f"it again from step 0")
            return False
        return True  # load_training_state says clearly when there is nothing to resume
    found = [name for name in (TRAINING_STATE_FILE, METRICS_FILE, WEIGHTS_FILE) if (out / name).exists()]
    if found and not overwrite:
        how = ("--resume to continue it, " if has_state else
               "--resume to start it again (it stopped before its first checkpoint), " if METRICS_FILE in found
               else "")
        raise ValueError(f"{out} already holds a run ({', '.join(found)}); pass {how}--overwrite to replace it, "
                         f"or choose another --out")
    return False


# A previous model's other files: left beside the new weights they would be read with them (HF reads
# vocab.json + merges.txt where our spec says char; serve and sample read generation_config.json's eos
# ids and chat_template.jinja; HF loads shards named by an index).
MODEL_EXTRAS = ("tokenizer_spec.json", "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                "chat_template.jinja", "special_tokens_map.json", "added_tokens.json", "generation_config.json",
                "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def clear_out(out: Path) -> None:
    """Remove a previous run's files from ``out`` (for --overwrite, or a fresh start), and a previous
    model's (its tokenizer, generation settings, weight shards); other files stay."""
    for name in (TRAINING_STATE_FILE, METRICS_FILE, WEIGHTS_FILE, CONFIG_FILE, PLOT_FILE, *MODEL_EXTRAS):
        (out / name).unlink(missing_ok=True)
    if out.is_dir():
        for shard in [*out.glob("model-*-of-*.safetensors"), *out.glob("pytorch_model-*-of-*.bin")]:
            shard.unlink(missing_ok=True)
    remove_tree(out / BEST_DIR)


def clean_up_after_kill(out: Path) -> None:
    """Undo what a killed run left half-done: a half-swapped best/, temp files and folders."""
    recover_dir(out / BEST_DIR)
    remove_stale_temporaries(out)
    remove_stale_temporaries(out / BEST_DIR)


def save_best(out: Path, model: GPT, tokenizer: Any, step: int, val_loss: float) -> None:
    """Write the whole best/ folder aside, then swap it in (see :func:`fileio.replace_dir`)."""
    tmp = temp_sibling(out / BEST_DIR)
    save_model(model, tmp, tokenizer)
    atomic_write_json(tmp / BEST_INFO_FILE, {"step": step, "val_loss": val_loss})
    replace_dir(tmp, out / BEST_DIR)


def best_so_far(out: Path, state: dict[str, Any] | None) -> float:
    """best/ may be newer than the training state (a kill between the two writes): trust the lower."""
    best = float(state["best_val_loss"]) if state is not None else math.inf
    info = out / BEST_DIR / BEST_INFO_FILE
    if state is not None and info.is_file():
        # best/ is written whole and swapped in, so a bad best.json was damaged afterwards. Refuse
        # rather than guess: a wrong "best so far" would let a worse model overwrite best/.
        loss = read_json(info)
        loss = loss.get("val_loss") if isinstance(loss, dict) else None
        if isinstance(loss, bool) or not isinstance(loss, (int, float)) or math.isnan(loss):
            raise CheckpointError(f"{info} is damaged (no numeric 'val_loss'); restore it, or move the "
                                  f"{out / BEST_DIR} folder aside to resume (best/ is then rewritten by the "
                                  f"next evaluation that beats the training state's best)")
        best = min(best, float(loss))
    return best
