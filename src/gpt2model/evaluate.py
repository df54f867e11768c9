"""Evaluation over a whole text: mean loss, perplexity and bits per byte with a sliding window.

The method is the one in HF's perplexity guide: windows of up to ``context_length`` tokens start
every ``stride`` tokens, and in each window only the tokens not scored by an earlier window count
(all of them in the first window). So every token after the first is scored exactly once, with at
least ``context_length - stride`` tokens of context once the text is long enough. ``stride ==
context_length`` gives disjoint windows (fastest, pessimistic); there, as in the guide, the first
token of each window has no context and is not scored. Smaller strides approach the model's true
per-token loss at more cost.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from .model import check_token_ids

if TYPE_CHECKING:
    from .model import GPT


@dataclass
class EvalResult:
    """Outcome of :func:`evaluate`: ``loss`` is the mean negative log-likelihood in nats per scored
    token; ``bits_per_byte`` is the total in bits over the UTF-8 bytes of the text after its first
    token (None when no tokenizer was given to count bytes). With ``stride == context_length`` the
    first token of every window is not scored but its bytes still count, so bits per byte then
    reads slightly low; the default stride scores every token after the first."""

    loss: float
    perplexity: float
    bits_per_byte: float | None
    num_tokens: int  # tokens scored
    num_bytes: int | None
    stride: int
    context_length: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sliding_windows(num_tokens: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` for each window: the model reads ``ids[begin:end]`` and the
    predictions of ``ids[first_scored:end]`` count. Together the windows score ``ids[1:]`` once
    (less each window's first token when ``stride == context_length``)."""
    if num_tokens < 2:
        raise ValueError(f"need at least 2 tokens to evaluate (one to predict from), got {num_tokens}")
    if not 1 <= stride <= context_length:
        raise ValueError(f"stride must be in [1, context_length={context_length}], got {stride}")
    windows = []
    prev_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + context_length, num_tokens)
        windows.append((begin, end, max(begin + 1, prev_end)))
        prev_end = end
        if end == num_tokens:
            break
    return windows


@torch.no_grad()
def evaluate(model: GPT, ids: Sequence[int] | np.ndarray | torch.Tensor, *, stride: int | None = None,
             batch_size: int = 1, tokenizer: Any = None, progress: bool = False) -> EvalResult:
    """Score the 1-D token sequence ``ids`` (see the module docstring for the windows).

    ``stride`` defaults to ``context_length // 2``. Windows of equal length are batched
    ``batch_size`` at a time (memory: ``batch_size * context_length * vocab_size`` fp32 logits).
    ``tokenizer`` (anything with ``decode``) is only used to count the bytes for bits per byte.
    """
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64) if not isinstance(ids, torch.Tensor) else ids)
    check_token_ids(ids, model.config.vocab_size, ndim=1, name="ids")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    C = model.config.context_length
    stride = C // 2 if stride is None else stride
    windows = sliding_windows(ids.numel(), C, stride)
    was_training = model.training
    model.eval()
    total_nll = 0.0  # a Python float (double): sums of many fp32 losses lose digits
    total_tokens = 0
    bar = tqdm(total=len(windows), desc="eval", unit="window", disable=not progress)
    try:
        i = 0
        while i < len(windows):
            # Group consecutive windows of the same length (all but possibly the last one).
            length = windows[i][1] - windows[i][0]
            group = [windows[i]]
            while (i + len(group) < len(windows) and len(group) < batch_size
                   and windows[i + len(group)][1] - windows[i + len(group)][0] == length):
                group.append(windows[i + len(group)])
            x = torch.stack([ids[b:e] for b, e, _ in group]).to(model.device)
            logits = model(x)
            # Position t predicts token t+1 of the window.
            nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1),
                                  reduction="none").view(len(group), -1)
            for row, (b, e, first) in enumerate(group):
                scored = nll[row, first - b - 1:]
                total_nll += scored.double().sum().item()
                total_tokens += e - first
            i += len(group)
            bar.update(len(group))
    finally:
        bar.close()
        model.train(was_training)
    loss = total_nll / total_tokens
    num_bytes = len(tokenizer.decode(ids[1:].tolist()).encode("utf-8")) if tokenizer is not None else None
    bpb = total_nll / math.log(2) / num_bytes if num_bytes else None
    return EvalResult(loss=loss, perplexity=math.exp(loss), bits_per_byte=bpb, num_tokens=total_tokens,
                      num_bytes=num_bytes, stride=stride, context_length=C)
