"""The one place that writes and reads model folders (the run folder around them, with the training
state, lives in ``runfolder.py``).

A model folder is HF's GPT-2 layout: ``config.json`` + ``model.safetensors`` (+ the tokenizer's
files). Every file is written atomically (temp file in the same folder, fsync, rename), so a
process killed at any instant leaves either the old file or the new one, never half of one.
Nothing here unpickles code: weights are safetensors, and ``.bin``/``.pt`` files are read with
``torch.load(weights_only=True)``.

:func:`load_model_and_tokenizer` is the loader the CLI (and later the server) use: a model plus the
tokenizer stored with it.
"""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path
from typing import Any

import torch

from .config import GPTconfig
from .fileio import atomic_path, atomic_write_json
from .hf import IGNORED_SUFFIXES, OPENAI_NAMES, config_from_hf, config_to_hf, state_dict_from_hf, state_dict_to_hf
from .model import GPT

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
LEGACY_WEIGHTS_FILE = "pytorch_model.bin"
# HF's sharded layout (save_pretrained(max_shard_size=...); transformers 4's 5 GB default shards
# gpt2-xl in fp32): an index naming the file of each tensor.
SHARD_INDEX_FILES = (WEIGHTS_FILE + ".index.json", LEGACY_WEIGHTS_FILE + ".index.json")


# What a hub download fetches: the weights (safetensors only: nothing to unpickle) and every file the
# loaders, `gpt2 serve` (eos ids, chat template) and GGUF export read from a model folder.
HUB_FILES = [CONFIG_FILE, "generation_config.json", WEIGHTS_FILE, SHARD_INDEX_FILES[0], "model-*.safetensors",
             "vocab.json", "merges.txt", "tokenizer.json", "added_tokens.json", "special_tokens_map.json",
             "tokenizer_config.json", "chat_template.jinja"]


class CheckpointError(ValueError):
    """A model folder or checkpoint file is missing, corrupt, truncated or does not fit."""


# --- files ------------------------------------------------------------------------------------
def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the file is corrupt or truncated") from None


# --- tensors ------------------------------------------------------------------------------------
DIGEST_KEY = "gpt2model_xxh3_128"  # safetensors metadata: content hash of the tensors


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """xxh3-128 of every tensor's name, dtype, shape and bytes (in name order): ~10x faster than
    sha256, which matters at load time; it guards against damage, not against an adversary."""
    import xxhash

    h = xxhash.xxh3_128()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write a safetensors file atomically, with the content hash of its tensors in the header (so
    the hash is replaced together with the data, in one rename)."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", DIGEST_KEY: tensors_digest(tensors)})
        _sort_header_metadata(tmp)


def _sort_header_metadata(path: Path) -> None:
    """Rewrite the header's ``__metadata__`` with sorted keys, in place: safetensors keeps it in a hash
    map, so its key order (and so the file's bytes) would change from one save to the next. The
    header keeps its length (same keys and values, reordered), so no offset moves."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        text = raw.decode("utf-8")
        header = json.loads(text)
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(new) > n:  # cannot happen for a reordering; leave the file as safetensors wrote it
            return
        f.seek(8)
        f.write(new + b" " * (n - len(new)))  # safetensors pads its header with spaces too


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, or a PyTorch ``.bin``/``.pt`` file without unpickling code, and
    check it: the content hash where the file carries one (a torn or zero-filled copy fails it),
    and that every floating-point tensor is finite."""
    path = Path(path)
    for attempt in range(20):
        if attempt:  # give a writer that is replacing the file back to back time to finish (<= ~0.8 s in all)
            time.sleep(min(0.05, 0.001 * 2**attempt))
        try:
            before = path.stat().st_ino
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing") from None
        # safetensors parses the header at open and maps the data by path on first access: if the
        # file was replaced in between (a trainer swapping in a new best/), the two may come from
        # different files. Read again then; a file that stays put is read consistently.
        try:
            obj, metadata = _read_tensors(path)
        except CheckpointError:
            if _inode(path) == before:
                raise
            continue
        if _inode(path) == before:
            break
    else:
        raise CheckpointError(f"{path} was replaced again and again while being read; retry when its writer pauses")
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    if DIGEST_KEY in metadata and tensors_digest(obj) != metadata[DIGEST_KEY]:
        raise CheckpointError(f"{path} is damaged: its tensors do not match the content hash written with them "
                              f"(a torn or partly zeroed copy?). Copy or save it again")
    for name, t in obj.items():
        if t.is_floating_point() and t.numel() and not _all_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{path}: tensor {name} holds {bad:,} NaN/inf value(s) of {t.numel():,}; the "
                                  f"file is damaged or the model diverged. Use an earlier checkpoint")
    return obj


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _read_tensors(path: Path) -> tuple[Any, dict[str, str]]:
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118
        return torch.load(path, map_location="cpu", weights_only=True), {}
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise CheckpointError(f"cannot read {path}: UnpicklingError: {e}. The file is corrupt or truncated; "
                                  f"re-save or re-download it") from None
        # Not damage: a pickle of more than tensors (torch.save(model), a trainer's checkpoint object)
        raise CheckpointError(f"{path} holds pickled Python objects besides tensors, which gpt2model never "
                              f"unpickles (unpickling runs code from the file). If you trust the file, convert it "
                              f"to safetensors where it was made: safetensors.torch.save_file(state_dict, "
                              f"'model.safetensors') (or save_pretrained(..., safe_serialization=True))") from None
    except Exception as e:  # safetensors and torch raise many types for damaged files
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}. The file is corrupt or "
                              f"truncated; re-save or re-download it") from None


def _all_finite(t: torch.Tensor) -> bool:
    # min and max are finite iff every value is (NaN propagates through both): one fast reduction,
    # ~40x faster than torch.isfinite(t).all() on a CPU (which materialises a bool tensor).
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


# --- model folders ------------------------------------------------------------------------------
def unwrap_model(model: torch.nn.Module) -> GPT:
    """The :class:`GPT` inside any nesting of ``torch.compile`` (``_orig_mod``) and DDP (``module``)
    wrappers, e.g. DDP(compile(model)) or compile(DDP(model))."""
    while not isinstance(model, GPT):
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            raise TypeError(f"expected a GPT (possibly wrapped by torch.compile or DDP), got {type(model).__name__}")
        model = inner
    return model


def save_model(model: torch.nn.Module, directory: str | Path, tokenizer: Any = None, *,
               save_tokenizer: bool = True) -> Path:
    """Write ``model`` (a GPT, or one wrapped by torch.compile/DDP) and ``tokenizer`` if given to
    ``directory`` in HF's GPT-2 layout. config.json's ``bos_token_id`` is the tokenizer's end-of-text
    id and its ``eos_token_id`` (what HF's ``generate`` and ``gpt2 sample/serve`` stop at) the
    tokenizer's eos (:func:`tokenizer.eos_id`: a chat fine-tune's ``<|im_end|>``, else end-of-text).
    ``save_tokenizer=False``: the tokenizer's files are already in the folder (a training run's
    checkpoints), only config.json reads it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = unwrap_model(model)
    from .quantize import is_quantized

    if is_quantized(model):
        raise ValueError("this model is quantized (int8) and there is no quantized save format: save the float "
                         "model and quantize after loading (model.quantize('int8') or --dtype int8)")
    from .tokenizer import eos_id

    eot = getattr(tokenizer, "eot", None)
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    save_tensors(directory / WEIGHTS_FILE, state_dict_to_hf(state, model.config))
    atomic_write_json(directory / CONFIG_FILE,
                      config_to_hf(model.config, eot_id=eot, dtype=state["transformer.wte.weight"].dtype,
                                   eos_id=eos_id(tokenizer) if tokenizer is not None else None))
    if tokenizer is not None and save_tokenizer:
        tokenizer.save(directory)
    generation = directory / "generation_config.json"
    if tokenizer is not None and generation.is_file():
        # HF's generate and find_eos_ids read it before config.json: one left by the model saved here
        # before (a downloaded gpt2's 50256) would override the eos written now (a chat fine-tune's).
        try:
            old = json.loads(generation.read_text(encoding="utf-8-sig"))
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict):
            atomic_write_json(generation, {**old, "bos_token_id": eot, "eos_token_id": eos_id(tokenizer)})
    return directory


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A local model folder, or a hub name (``gpt2``, ``openai-community/gpt2-xl``, ...)
    downloaded with ``huggingface_hub`` where a network exists."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / CONFIG_FILE).exists() and (path / "meta.json").is_file() and (path / "train.bin").is_file():
            raise CheckpointError(f"{path} is a dataset folder (written by 'gpt2 prepare'), not a model: pass a "
                                  f"model folder ({CONFIG_FILE} + {WEIGHTS_FILE}), e.g. the --out of 'gpt2 train'")
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

        return Path(snapshot_download(repo, allow_patterns=HUB_FILES))
    except Exception as e:
        raise CheckpointError(f"could not get {name!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
                              f"Without a network, download the folder elsewhere (config.json and "
                              f"model.safetensors) and pass its path") from None


def load_config(name_or_path: str | Path) -> GPTconfig:
    """The :class:`GPTconfig` of a model folder (ours or HF GPT-2) or hub name, from its config.json
    alone (the weights are not read: HF's ``AutoConfig``)."""
    return _read_config(resolve_model_dir(name_or_path) / CONFIG_FILE)


def load_model(name_or_path: str | Path, *, context_length: int | None = None, dropout: float | None = None,
               device: str | torch.device | None = None, dtype: torch.dtype | str | None = None) -> GPT:
    """Load a model folder (ours or HF GPT-2) or a hub name into a :class:`GPT` in eval mode.

    ``context_length`` crops the position embeddings (e.g. 1024 -> 256); ``dropout`` overrides the
    stored value (useful for fine-tuning). ``dtype``: a torch floating dtype or its name as HF's
    ``from_pretrained`` takes it (``"bfloat16"``, ``"float16"``, ``"float32"``; ``"auto"``: the
    saved tensors' dtype); default float32. ``device``: a torch device or a name (``"auto"``: cuda,
    then mps, then cpu); a device this machine lacks is a ``ValueError`` naming it.
    """
    from .device import resolve_device

    dtype = _as_dtype(dtype)
    if device is not None and not isinstance(device, torch.device):
        device = resolve_device(str(device))
    directory = resolve_model_dir(name_or_path)
    config = _read_config(directory / CONFIG_FILE)
    if context_length is not None:
        if not 0 < context_length <= config.context_length:
            raise CheckpointError(f"context_length={context_length} must be in [1, {config.context_length}] "
                                  f"for this model (position embeddings cannot be grown)")
        config.context_length = context_length
    if dropout is not None:
        config = GPTconfig.from_dict({**config.to_dict(), "dropout": dropout})
    weights, tensors = _read_weights(directory)
    if not config.bias and any(name.endswith(".bias") and not name.endswith(IGNORED_SUFFIXES) and t.any()
                               for name, t in tensors.items()):
        # A bias=False model saves zero biases, which HF loads as trainable ones: after a fine-tune
        # with transformers they hold values, and the folder describes a GPT-2 with biases.
        config = GPTconfig.from_dict({**config.to_dict(), "bias": True})
    state = state_dict_from_hf(tensors, config)
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
    if dtype == "auto":
        dtype = state["transformer.wte.weight"].dtype
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model.eval()


_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    """A load dtype: None, "auto", or a torch floating dtype (from one or its name, e.g. "bfloat16",
    as HF's ``torch_dtype`` / ``dtype`` take it)."""
    if dtype is None or dtype == "auto":
        return dtype
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name not in _DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16, float16 or auto (the saved dtype); "
                             f"int8 is model.quantize('int8') after loading")
        return _DTYPE_NAMES[name]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype (float32, bfloat16, float16) or 'auto', got {dtype!r}"
                         + ("; for int8 weights call model.quantize('int8') after loading"
                            if dtype in (torch.int8, torch.qint8) else ""))
    return dtype


# transformers' GPT2Config defaults: what it reads for a key a config.json leaves out.
HF_GPT2_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12}


def _read_config(path: Path) -> GPTconfig:
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a JSON {type(raw).__name__}, not a GPT-2 config object")
    if "gpt2model" not in raw:  # a HF config: missing keys mean GPT2Config's defaults, as transformers reads it
        raw = {**HF_GPT2_DEFAULTS, **raw}
    try:
        return config_from_hf(raw)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a valid config ({type(e).__name__}: {e}); re-save the model") from None


def _read_weights(directory: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The weights file of a model folder (``model.safetensors``, else ``pytorch_model.bin``, else
    HF's sharded files through their index) and its tensors."""
    for name in (WEIGHTS_FILE, LEGACY_WEIGHTS_FILE):
        if (directory / name).is_file():
            return directory / name, load_tensors(directory / name)
    for name in SHARD_INDEX_FILES:
        index = directory / name
        if not index.is_file():
            continue
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no 'weight_map' of tensor names to files; the file is damaged")
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if not isinstance(shard, str) or Path(shard).name != shard:
                raise CheckpointError(f"{index} names {shard!r} as a shard: shards must be files of that folder")
            tensors.update(load_tensors(directory / shard))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"the shards named by {index} lack tensors it lists, e.g. {missing[:3]}; a shard "
                                  f"is missing or from another save")
        return index, tensors
    raise CheckpointError(f"{directory} has no {WEIGHTS_FILE}: it is not a complete model folder")


def load_model_and_tokenizer(name_or_path: str | Path, *, device: str | torch.device | None = None,
                             dtype: torch.dtype | None = None) -> tuple[GPT, Any]:
    """A model (see :func:`load_model`) and the tokenizer stored with it (a hub name's too: the
    downloaded folder's, e.g. a fine-tune's added tokens); OpenAI's GPT-2 BPE for a HF folder
    without tokenizer files whose vocabulary is GPT-2's."""
    from .tokenizer import model_tokenizer

    directory = resolve_model_dir(name_or_path)  # once: a hub name is downloaded (or found in the cache)
    model = load_model(directory, device=device, dtype=dtype)
    tokenizer = model_tokenizer(directory)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"the tokenizer found for {name_or_path} has {tokenizer.vocab_size} ids but the model "
                              f"only {model.config.vocab_size}: the folder mixes files of different models")
    return model, tokenizer
