"""Model configuration: the seed's ``GPTconfig`` with validation, JSON round-trip and presets."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any


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
        text = s if s.lstrip().startswith("{") else Path(s).read_text()
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
