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
    token; ``bits_per_byte`` is the total in bits over the UTF-8 bytes of the scored tokens (None
    when no tokenizer was given to count bytes): the text after its first token at the default
    stride; with ``stride == context_length`` the first token of every window is not scored, and
    its bytes do not count either."""

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
    ``tokenizer`` (one of ours, or anything with ``decode``) is only used to count the bytes for
    bits per byte: those of the scored tokens (``token_bytes``; with only ``decode``, the bytes
    of the text after its first token).
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
    num_bytes = _scored_bytes(tokenizer, ids, windows) if tokenizer is not None else None
    bpb = total_nll / math.log(2) / num_bytes if num_bytes else None
    return EvalResult(loss=loss, perplexity=math.exp(loss), bits_per_byte=bpb, num_tokens=total_tokens,
                      num_bytes=num_bytes, stride=stride, context_length=C)


def _scored_bytes(tokenizer: Any, ids: torch.Tensor, windows: list[tuple[int, int, int]]) -> int:
    """UTF-8 bytes of the tokens the windows score: with ``stride == context_length`` each window's
    first token is not scored, and counting its bytes (as before) read bits per byte low, by a
    window's share of one token (~0.1% at 1024, 25% at 4)."""
    if not hasattr(tokenizer, "token_bytes"):
        return len(tokenizer.decode(ids[1:].tolist()).encode("utf-8"))
    scored = np.zeros(ids.numel(), dtype=bool)
    for _, end, first in windows:
        scored[first:end] = True
    tokens, counts = np.unique(ids.cpu().numpy()[scored], return_counts=True)
    return sum(len(tokenizer.token_bytes(int(t))) * int(c) for t, c in zip(tokens, counts, strict=True))


# --- log-likelihoods of continuations, as lm-evaluation-harness computes them ----------------------
# A request is ``(context_ids, [continuation_ids, ...])``. For each continuation the model reads
# ``(context + continuation)[-(C+1):][:-1]`` (left-truncated to the context length C, as lm-eval's
# ``_loglikelihood_tokens`` does) and the log-probabilities of the continuation's tokens are summed.
# Speed: the continuations of one context share it. Where nothing is truncated they are packed
# into one row, ``context + cont_1[:-1] + cont_2[:-1] + ...``, with position ids restarting after
# the context for each continuation and an attention mask that lets each continuation see the
# context and itself only: the context is read once instead of once per choice, and the numbers
# are those of separate forwards (up to float rounding).
Request = tuple[Sequence[int], Sequence[Sequence[int]]]
_SCORE_ROWS = 1024  # logit rows scored at a time (1024 x 50257 fp32 = 206 MB)


@dataclass
class _Row:
    tokens: list[int]
    groups: list[int] | None  # per token: 0 = context, i = continuation i; None = plain causal row
    logit_pos: list[int]      # row positions whose logits predict ...
    targets: list[int]        # ... these token ids,
    owners: list[int]         # ... which belong to this flat continuation index


def _plain_row(ctx: Sequence[int], cont: Sequence[int], C: int, owner: int) -> _Row:
    inp = (list(ctx) + list(cont))[-(C + 1):][:-1]
    n = len(inp)
    return _Row(inp, None, list(range(n - len(cont), n)), list(cont), [owner] * len(cont))


def _rows(requests: Sequence[Request], C: int) -> tuple[list[_Row], list[tuple[int, int]]]:
    """Pack the requests into rows; also ``(request, choice)`` of each flat continuation index."""
    rows: list[_Row] = []
    index: list[tuple[int, int]] = []
    for r, (ctx, conts) in enumerate(requests):
        ctx = list(ctx)
        if not ctx:
            raise ValueError(f"request {r} has an empty context: give at least one token to condition on "
                             "(lm-eval uses the end-of-text token for an empty context)")
        if not conts:
            raise ValueError(f"request {r} has no continuations to score")
        owners = []
        for i, cont in enumerate(conts):
            if not 1 <= len(cont) <= C:
                raise ValueError(f"request {r}, continuation {i} has {len(cont)} tokens; each must have "
                                 f"between 1 and the context length {C}")
            owners.append(len(index))
            index.append((r, i))
        if len(conts) == 1 or any(len(ctx) + len(c) > C + 1 for c in conts):
            # One continuation, or the context is cut differently per continuation: separate rows.
            rows.extend(_plain_row(ctx, c, C, o) for c, o in zip(conts, owners, strict=True))
            continue
        row: _Row | None = None
        first_row = len(rows)
        for cont, owner in zip(conts, owners, strict=True):
            extra = len(cont) - 1  # the last token is only a target, never an input
            if row is None or len(row.tokens) + extra > C:
                row = _Row(list(ctx), [0] * len(ctx), [], [], [])
                rows.append(row)
            seg = max(row.groups) + 1
            start = len(row.tokens)
            row.logit_pos += [len(ctx) - 1] + list(range(start, start + extra))
            row.targets += list(cont)
            row.owners += [owner] * len(cont)
            row.tokens += list(cont[:-1])
            row.groups += [seg] * extra
        for row in rows[first_row:]:
            if max(row.groups) == 1:
                row.groups = None  # a single continuation: a plain causal row after all
    return rows, index


def _forward_rows(model: GPT, rows: list[_Row]) -> torch.Tensor:
    """The model's output for rows padded on the right (one forward)."""
    T = max(len(r.tokens) for r in rows)
    dev = model.device
    x = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        x[b, :len(r.tokens)] = torch.tensor(r.tokens)
    if all(r.groups is None for r in rows):
        # Right padding under a causal mask: real tokens never see the padding.
        return model(x.to(dev))
    groups = torch.full((len(rows), T), -1, dtype=torch.long)
    pos = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r.tokens)
        g = torch.tensor(r.groups) if r.groups is not None else torch.zeros(n, dtype=torch.long)
        groups[b, :n] = g
        ctx_len = int((g == 0).sum())
        # Continuation tokens continue the context's positions, each continuation from the same place.
        first = torch.zeros(n, dtype=torch.long)
        for seg in g.unique().tolist():
            idx = (g == seg).nonzero().squeeze(1)
            first[idx] = idx[0] - (ctx_len if seg else 0)
        pos[b, :n] = torch.arange(n) - first
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    gq, gk = groups[:, :, None], groups[:, None, :]
    allowed = causal & ((gk == 0) | (gk == gq))  # padding (group -1) sees itself, so no row is empty
    mask = torch.zeros(allowed.shape, dtype=model.dtype).masked_fill_(~allowed, float("-inf"))
    return model(x.to(dev), mask=mask[:, None].to(dev), position_ids=pos.to(dev))


@torch.no_grad()
def loglikelihoods(model: GPT, requests: Sequence[Request], *, batch_size: int = 8, progress: bool = False,
                   desc: str = "score") -> list[list[tuple[float, bool]]]:
    """For each request ``(context_ids, [continuation_ids, ...])``: ``(logprob, is_greedy)`` per
    continuation, as lm-evaluation-harness's ``loglikelihood`` returns them: the summed
    log-probability of the continuation's tokens given the context (left-truncated to the model's
    context length), and whether greedy decoding from the context would produce exactly them.

    Rows (packed contexts with their continuations) are sorted by length and run ``batch_size``
    at a time (memory: ``batch_size * context_length * vocab_size`` fp32 logits at most).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    C, V = model.config.context_length, model.config.vocab_size
    for r, (ctx, conts) in enumerate(requests):
        ids = [*ctx, *(t for c in conts for t in c)]
        if ids and not all(0 <= t < V for t in ids):
            bad = next(t for t in ids if not 0 <= t < V)
            raise ValueError(f"request {r}: token id {bad} is outside this model's vocabulary [0, {V}): "
                             "was the text encoded with the model's tokenizer?")
    rows, index = _rows(requests, C)
    rows.sort(key=lambda r: len(r.tokens), reverse=True)  # similar lengths together: little padding
    logprob = torch.zeros(len(index), dtype=torch.float64)
    misses = torch.zeros(len(index), dtype=torch.long)  # tokens where greedy decoding differs
    # Only the positions that predict a continuation token need the LM head, a third of GPT-2
    # 124M's FLOPs and a (B, T, 50257) tensor: a pre-hook on the head hands it just those rows of
    # the final hidden states, so the model returns (N, V) logits. (Models without an ``lm_head``
    # module return all logits and are indexed afterwards.)
    picked: list[torch.Tensor] = []
    head = getattr(model, "lm_head", None)
    hook = head.register_forward_pre_hook(lambda _m, args: (args[0][picked[0], picked[1]],)) \
        if isinstance(head, torch.nn.Module) else None
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(rows), desc=desc, unit="row", disable=not progress)
    try:
        for i in range(0, len(rows), batch_size):
            batch = rows[i:i + batch_size]
            dev = model.device
            b_idx = torch.tensor([b for b, r in enumerate(batch) for _ in r.logit_pos], device=dev)
            p_idx = torch.tensor([p for r in batch for p in r.logit_pos], device=dev)
            picked[:] = [b_idx, p_idx]
            out = _forward_rows(model, batch)
            sel = out if hook is not None else out[b_idx, p_idx]
            targets = torch.tensor([t for r in batch for t in r.targets], device=sel.device)
            owners = torch.tensor([o for r in batch for o in r.owners])
            # In slices of rows: log-sum-exp's temporaries then stay small next to the logits.
            for j in range(0, sel.size(0), _SCORE_ROWS):
                part, tgt, own = sel[j:j + _SCORE_ROWS].float(), targets[j:j + _SCORE_ROWS], owners[j:j + _SCORE_ROWS]
                lp = part.gather(1, tgt[:, None]).squeeze(1) - part.logsumexp(1)
                logprob.index_add_(0, own, lp.double().cpu())
                misses.index_add_(0, own, (part.argmax(1) != tgt).long().cpu())
            bar.update(len(batch))
    finally:
        bar.close()
        if hook is not None:
            hook.remove()
        model.train(was_training)
    out: list[list[tuple[float, bool]]] = [[] for _ in requests]
    for k, (r, _) in enumerate(index):
        out[r].append((float(logprob[k]), bool(misses[k] == 0)))
    return out


def rolling_windows(tokens: Sequence[int], prefix_token: int | None, context_length: int) -> list[Request]:
    """lm-evaluation-harness's rolling windows for the log-likelihood of a whole document:
    ``get_rolling_token_windows(..., context_len=1)`` then ``make_disjoint_window``. The first window
    predicts the first ``context_length`` tokens from ``prefix_token`` (end-of-text); each further
    window predicts the next ``context_length`` tokens from the token before them, and the last one
    keeps a full window of context. Each token is scored once. Without a prefix token (a tokenizer
    with no end-of-text), the first token is the prefix and is not scored.

    Returns one single-continuation request per window, for :func:`loglikelihoods`.
    """
    tokens = list(tokens)
    if prefix_token is None:
        if len(tokens) < 2:
            raise ValueError("a document needs at least 2 tokens to score without an end-of-text prefix token")
        prefix_token, tokens = tokens[0], tokens[1:]
    C = context_length
    if not tokens:
        return []
    windows: list[Request] = []
    first = min(C, len(tokens))
    windows.append(([prefix_token], [tokens[:first]]))
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, C)
        end = predicted + n
        inp = tokens[max(0, end - C - 1):end - 1]
        windows.append((inp[:len(inp) - (n - 1)], [tokens[end - n:end]]))
        predicted = end
    return windows
