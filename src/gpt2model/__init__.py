"""gpt2model: GPT-2 from scratch in PyTorch — train, fine-tune, sample, evaluate.

>>> from gpt2model import GPT, GPTconfig
>>> model = GPT(GPTconfig())
"""

from .config import PRESETS, GPTconfig
from .model import GPT, MLP, Block, CausalSelfAttention, KVCache
from .tokenizer import load_tokenizer as load_tokenizer

__version__ = "0.1.0"

__all__ = ["GPT", "GPTconfig", "PRESETS", "CausalSelfAttention", "MLP", "Block", "KVCache", "__version__"]
