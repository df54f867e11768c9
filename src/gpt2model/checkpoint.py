"""The one place that writes and reads model folders and training checkpoints.

A model folder is HF's GPT-2 layout: ``config.json`` + ``model.safetensors`` (+ the tokenizer's
files). Every file is written atomically (temp file in the same folder, fsync, rename), so a
process killed at any instant leaves either the old file or the new one, never half of one.
Nothing here unpickles code: weights are safetensors, and ``.bin``/``.pt`` files are read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .config import GPTconfig
from .hf import OPENAI_NAMES, config_from_hf, config_to_hf, state_dict_from_hf, state_dict_to_hf
from .model import GPT

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
LEGACY_WEIGHTS_FILE = "pytorch_model.bin"


class CheckpointError(ValueError):
    """A model folder or checkpoint file is missing, corrupt, truncated or does not fit."""


# --- atomic files -------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def fsync_dir(directory: str | Path) -> None:
    """Make a rename durable (POSIX only; a no-op elsewhere)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the file is corrupt or truncated") from None


# --- tensors ------------------------------------------------------------------------------------
def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write a safetensors file atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, or a PyTorch ``.bin``/``.pt`` file without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and torch raise many types for damaged files
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}. The file is corrupt or "
                              f"truncated; re-save or re-download it") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return obj


# --- model folders ------------------------------------------------------------------------------
def save_model(model: GPT, directory: str | Path, tokenizer: Any = None) -> Path:
    """Write ``model`` (and ``tokenizer`` if given) to ``directory`` in HF's GPT-2 layout."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper -> the real module
    model = getattr(model, "module", model)  # DDP wrapper -> the real module
    eot = getattr(tokenizer, "eot", None) if tokenizer is not None else None
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    save_tensors(directory / WEIGHTS_FILE, state_dict_to_hf(state, model.config))
    atomic_write_json(directory / CONFIG_FILE, config_to_hf(model.config, eot_id=eot))
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A local model folder, or a hub name (``gpt2``, ``openai-community/gpt2-xl``, ...)
    downloaded with ``huggingface_hub`` where a network exists."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the model folder that holds {CONFIG_FILE} "
                              f"and {WEIGHTS_FILE}")
    name = str(name_or_path)
    repo = OPENAI_NAMES.get(name, name)
    if name not in OPENAI_NAMES and name.count("/") != 1:
        raise CheckpointError(f"no model folder at {path}; pass a folder written by save_pretrained / "
                              f"'gpt2 train', or one of {sorted(OPENAI_NAMES)}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, "vocab.json",
                                                             "merges.txt", "tokenizer.json"]))
    except Exception as e:
        raise CheckpointError(f"could not get {name!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
                              f"Without a network, download the folder elsewhere (config.json and "
                              f"model.safetensors) and pass its path") from None


def load_model(name_or_path: str | Path, *, context_length: int | None = None, dropout: float | None = None,
               device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> GPT:
    """Load a model folder (ours or HF GPT-2) or a hub name into a :class:`GPT` in eval mode.

    ``context_length`` crops the position embeddings (e.g. 1024 -> 256); ``dropout`` overrides the
    stored value (useful for fine-tuning).
    """
    directory = resolve_model_dir(name_or_path)
    config = config_from_hf(read_json(directory / CONFIG_FILE))
    if context_length is not None:
        if not 0 < context_length <= config.context_length:
            raise CheckpointError(f"context_length={context_length} must be in [1, {config.context_length}] "
                                  f"for this model (position embeddings cannot be grown)")
        config.context_length = context_length
    if dropout is not None:
        config = GPTconfig.from_dict({**config.to_dict(), "dropout": dropout})
    weights = directory / WEIGHTS_FILE
    if not weights.is_file() and (directory / LEGACY_WEIGHTS_FILE).is_file():
        weights = directory / LEGACY_WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory} has no {WEIGHTS_FILE}: it is not a complete model folder")
    state = state_dict_from_hf(load_tensors(weights), config)
    model = GPT(config)
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(s)}"
             for k, s in expected.items() if k in state and state[k].shape != s]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{weights} does not match its config.json: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}")
    model.load_state_dict(state, strict=False)  # lm_head.weight is tied to wte
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model.eval()


# --- training checkpoints -----------------------------------------------------------------------
# A run folder (``gpt2 train --out OUT``) is a model folder plus ``training_state.pt``:
#
#   OUT/config.json, OUT/model.safetensors, tokenizer files   the latest model (an export for users)
#   OUT/training_state.pt   step, a copy of the weights, optimizer, grad scaler, RNG states, sampler,
#                           best val loss, configs: everything --resume needs, in ONE file
#   OUT/best/               model folder of the best val loss so far
#
# Consistency under a kill at any instant: every file is replaced atomically (write a temp file,
# fsync, rename), and the training state carries its own copy of the weights, so the state that
# resume reads is always internally consistent (weights, optimizer and step from the same moment).
# The model export is written *before* the state; a kill between the two leaves the export one
# checkpoint ahead of the state, and resume re-exports the state's weights before going on.
TRAINING_STATE_FILE = "training_state.pt"
TRAINING_STATE_VERSION = 1


def save_training_checkpoint(directory: str | Path, model: GPT, state: dict[str, Any]) -> None:
    """Write the model export, then atomically the training ``state`` (which gets the weights added
    under ``"model"``). ``state`` must hold only tensors and plain Python data (``weights_only``)."""
    directory = Path(directory)
    model = getattr(model, "_orig_mod", model)
    weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    save_model(model, directory)
    with atomic_path(directory / TRAINING_STATE_FILE) as tmp:
        torch.save({**state, "version": TRAINING_STATE_VERSION, "model": weights}, tmp)


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
    import random

    import numpy as np

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
    import random

    import numpy as np

    version, internal, py_gauss = state["python"]
    random.setstate((version, tuple(internal), py_gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def replace_dir(src: str | Path, dst: str | Path) -> None:
    """Move the finished folder ``src`` to ``dst``, replacing ``dst`` as a whole.

    Two renames: ``dst`` -> ``.<name>.old``, then ``src`` -> ``dst``. A kill between them leaves no
    ``dst`` but its old copy, which :func:`recover_dir` puts back, so readers only ever see a
    complete old or complete new folder."""
    import shutil

    src, dst = Path(src), Path(dst)
    old = dst.with_name(f".{dst.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(dst: str | Path) -> None:
    """Undo a :func:`replace_dir` that was killed between its two renames."""
    import shutil

    dst = Path(dst)
    old = dst.with_name(f".{dst.name}.old")
    if old.exists() and not dst.exists():
        os.replace(old, dst)
    elif old.exists():
        shutil.rmtree(old, ignore_errors=True)
