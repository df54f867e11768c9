"""gpt2model: GPT-2 from scratch in PyTorch — train, fine-tune, sample, evaluate.

>>> from gpt2model import GPT, GPTconfig
>>> model = GPT(GPTconfig())
"""

from .config import PRESETS, GPTconfig, TrainConfig
from .model import GPT, MLP, Block, CausalSelfAttention, KVCache
from .tokenizer import load_tokenizer

__version__ = "0.1.0"

__all__ = ["GPT", "GPTconfig", "TrainConfig", "PRESETS", "CausalSelfAttention", "MLP", "Block", "KVCache",
           "load_tokenizer", "__version__"]
