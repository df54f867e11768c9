"""Model configuration: the seed's ``GPTconfig`` with validation, JSON round-trip and presets."""

from __future__ import annotations

import difflib
import json
import math
import sys
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@dataclass
class GPTconfig:
    """Shape of a GPT-2 model.

    The first five fields and their defaults are the seed's (a character-level model for Tiny
    Shakespeare). The rest are what training needs; their defaults match OpenAI's GPT-2 except
    ``dropout`` (0.0, since small-data training picks its own value).
    """

    context_length: int = 256  # maximum sequence length (HF: n_positions)
    vocab_size: int = 65  # number of token ids (HF: vocab_size)
    n_layer: int = 6  # number of transformer blocks
    n_head: int = 6  # attention heads per block
    d_model: int = 384  # hidden size (HF: n_embd)
    dropout: float = 0.0  # on embeddings, attention weights and residual branches
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2 has them
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("context_length", "vocab_size", "n_layer", "n_head", "d_model"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"GPTconfig.{name} must be an int, got {value!r} ({type(value).__name__})")
            if value <= 0:
                raise ValueError(f"GPTconfig.{name} must be a positive integer, got {value}")
        if self.d_model % self.n_head != 0:
            raise ValueError(
                f"GPTconfig.d_model ({self.d_model}) must be divisible by n_head ({self.n_head}); "
                f"pick n_head from the divisors of d_model, e.g. {_divisors_hint(self.d_model)}"
            )
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool):
            raise ValueError(f"GPTconfig.dropout must be a float in [0, 1), got {self.dropout!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"GPTconfig.dropout must be in [0, 1), got {self.dropout}")
        self.dropout = float(self.dropout)
        if not isinstance(self.bias, bool):
            raise ValueError(f"GPTconfig.bias must be True or False, got {self.bias!r}")
        if not (isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0):
            raise ValueError(f"GPTconfig.layer_norm_eps must be a positive float, got {self.layer_norm_eps!r}")
        self.layer_norm_eps = float(self.layer_norm_eps)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTconfig:
        """Build from a dict; unknown keys are an error (they are usually typos)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTconfig field(s) {unknown}; valid fields are {sorted(known)}")
        return cls(**d)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> GPTconfig:
        """Parse a JSON string, or read a JSON file when given a path."""
        s = str(text_or_path)
        text = s if s.lstrip().startswith("{") else Path(s).read_text(encoding="utf-8-sig")  # a BOM is not JSON
        return cls.from_dict(json.loads(text))

    # --- presets -------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GPTconfig:
        """A named configuration: ``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl`` or
        ``shakespeare-char``; keyword arguments override single fields."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def _divisors_hint(n: int) -> list[int]:
    return [k for k in range(1, min(n, 64) + 1) if n % k == 0][-6:]


_GPT2_COMMON = dict(context_length=1024, vocab_size=50257, dropout=0.0, bias=True)

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(_GPT2_COMMON, n_layer=12, n_head=12, d_model=768),  # 124M
    "gpt2-medium": dict(_GPT2_COMMON, n_layer=24, n_head=16, d_model=1024),  # 350M
    "gpt2-large": dict(_GPT2_COMMON, n_layer=36, n_head=20, d_model=1280),  # 774M
    "gpt2-xl": dict(_GPT2_COMMON, n_layer=48, n_head=25, d_model=1600),  # 1558M
    # The seed's defaults with nanoGPT's shakespeare_char dropout.
    "shakespeare-char": dict(context_length=256, vocab_size=65, n_layer=6, n_head=6, d_model=384, dropout=0.2),
}


# --- training ------------------------------------------------------------------------------------
def _opt(default: Any, help: str) -> Any:
    """A TrainConfig field with its ``--help`` text (the CLI builds its options from these)."""
    return field(default=default, metadata={"help": help})


DEVICES = ("auto", "cpu", "cuda", "mps")
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MODEL_FIELDS = ("n_layer", "n_head", "d_model", "context_length", "dropout")


@dataclass
class TrainConfig:
    """Everything ``gpt2 train`` needs. Each field is a ``--flag`` (underscores become dashes) and a
    key of a TOML config file; the command line overrides the file, the file overrides these
    defaults. Defaults are nanoGPT's shakespeare_char recipe, which trains the seed's model.

    Model-shape fields left at ``None`` mean "the seed's GPTconfig default" when training from
    scratch and "as the loaded model has it" with ``init_from`` or ``resume``.
    """

    data: str = _opt("", "dataset folder written by 'gpt2 prepare' (required)")
    out: str = _opt("", "run folder: model, tokenizer, training state, metrics.jsonl, loss plot (required)")
    init_from: str = _opt("scratch", "'scratch', one of our model folders, or a HF GPT-2 folder/name to fine-tune")
    # model shape (None: seed default / the loaded model's value)
    n_layer: int | None = _opt(None, "transformer blocks (scratch default 6)")
    n_head: int | None = _opt(None, "attention heads (scratch default 6)")
    d_model: int | None = _opt(None, "hidden size (scratch default 384)")
    context_length: int | None = _opt(None, "tokens per training window (scratch default 256; crops a loaded model)")
    dropout: float | None = _opt(None, "dropout probability (scratch default 0.0)")
    # batch and length of training
    batch_size: int = _opt(64, "windows per micro-batch per process")
    grad_accum: int = _opt(1, "micro-batches per optimizer step; global batch = batch_size*grad_accum*world_size")
    max_steps: int = _opt(5000, "optimizer steps to train for")
    # optimizer and schedule
    lr: float = _opt(1e-3, "peak learning rate (after warmup)")
    min_lr: float = _opt(1e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = _opt(100, "steps of linear warmup")
    lr_decay_steps: int | None = _opt(None, "step where the cosine decay reaches min_lr (default: max_steps)")
    weight_decay: float = _opt(0.1, "AdamW weight decay (on >=2-D weights only)")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.99, "AdamW beta2")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0 disables)")
    # evaluation, checkpoints
    eval_interval: int = _opt(250, "evaluate (and checkpoint) every this many steps")
    eval_steps: int = _opt(20, "batches in each evaluation (fixed windows, the same every time)")
    checkpoint_interval: int | None = _opt(None, "write a checkpoint every this many steps (default: eval_interval)")
    log_interval: int = _opt(1, "read the training loss back from the device (a host-device sync), check that it "
                             "is finite and write a metrics line every this many steps; evaluation and "
                             "checkpoint steps always log")
    # runtime
    seed: int = _opt(1337, "random seed (model init, dropout, batch sampling)")
    device: str = _opt("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    dtype: str = _opt("auto", "compute dtype: auto (bfloat16 on a bf16 GPU, float16 on older GPUs, float32 on "
                      "CPU), float32, bfloat16 or float16 (GPU only)")
    compile: bool = _opt(False, "torch.compile the model")
    compile_mode: str = _opt("auto", "torch.compile mode with compile: auto (reduce-overhead, i.e. CUDA graphs, "
                             "on one CUDA process with grad_accum 1; default otherwise), default, "
                             "reduce-overhead, max-autotune-no-cudagraphs or max-autotune")
    bf16_residual: bool | None = _opt(None, "keep the residual stream in bf16 under bf16 autocast, as llm.c and "
                                      "Megatron do: faster, less memory (GPT-2 124M on an H200: 1.11x nanoGPT's "
                                      "tokens/s, against 1.06x with an fp32 stream), the same val loss within seed "
                                      "noise (see the README). Default: on with bfloat16, off otherwise; "
                                      "--no-bf16-residual keeps nanoGPT's fp32 stream")
    resume: bool = _opt(False, "continue the run in --out from its last checkpoint")
    overwrite: bool = _opt(False, "replace a previous run in --out instead of refusing")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(TrainConfig)
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue
            kind = _base_type(hints[f.name])
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)  # TOML/CLI "lr = 1" means 1.0
                setattr(self, f.name, value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"TrainConfig.{f.name} must be {kind.__name__}, got {value!r} "
                                 f"({type(value).__name__})")
            if kind is float and not math.isfinite(value):  # NaN passes every range check below
                raise ValueError(f"TrainConfig.{f.name} must be a finite number, got {value!r}")
        positive = ["batch_size", "grad_accum", "max_steps", "eval_interval", "eval_steps",
                    "n_layer", "n_head", "d_model", "context_length", "lr_decay_steps", "checkpoint_interval",
                    "log_interval"]
        for name in positive:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr == 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"TrainConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TrainConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.device.split(":")[0] not in DEVICES or (":" in self.device and not self.device.startswith("cuda:")):
            raise ValueError(f"TrainConfig.device must be one of {list(DEVICES)} or cuda:N, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"TrainConfig.dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"TrainConfig.compile_mode must be one of {list(COMPILE_MODES)}, "
                             f"got {self.compile_mode!r}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite contradict each other: pass one of them")

    def check_paths(self) -> None:
        """``data`` and ``out`` have no usable default: demand them before training."""
        for name in ("data", "out"):
            if not getattr(self, name):
                raise ValueError(f"no {name} folder given: pass --{name} DIR or set {name} = \"DIR\" "
                                 f"in the config file")

    @classmethod
    def field_type(cls, name: str) -> type:
        """The plain type of a field (``int | None`` -> int), for parsing command-line strings."""
        return _base_type(typing.get_type_hints(cls)[name])

    @property
    def decay_steps(self) -> int:
        return self.lr_decay_steps or self.max_steps

    @property
    def ckpt_interval(self) -> int:
        return self.checkpoint_interval or self.eval_interval

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "TrainConfig") -> TrainConfig:
        """Build from a dict; an unknown key is an error naming it (and the closest valid key)."""
        known = [f.name for f in fields(cls)]
        for key in d:
            if key not in known:
                close = difflib.get_close_matches(str(key).replace("-", "_"), known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys are {known}"
                raise ValueError(f"unknown key {key!r} in {source}{hint}")
        return cls(**d)

    @classmethod
    def load(cls, config_file: str | Path | None = None, **overrides: Any) -> TrainConfig:
        """Defaults, then the TOML ``config_file`` (flat ``key = value`` lines), then ``overrides``."""
        values: dict[str, Any] = {}
        if config_file is not None:
            path = Path(config_file)
            if not path.is_file():
                raise FileNotFoundError(f"config file {path} not found")
            try:
                # utf-8-sig: an editor's byte-order mark is no part of the TOML (tomllib rejects it).
                values = tomllib.loads(path.read_text(encoding="utf-8-sig"))
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{path} is not valid TOML: {e}") from None
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8") from None
            tables = [k for k, v in values.items() if isinstance(v, dict)]
            if tables:
                raise ValueError(f"{path}: tables {tables} are not supported; write flat 'key = value' lines")
            cls.from_dict(values, source=str(path))  # name the file in errors about its keys
        return cls.from_dict({**values, **overrides}, source="the options")


def _base_type(hint: Any) -> type:
    """``int | None`` -> int; ``float`` -> float."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint
