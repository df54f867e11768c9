"""Generation: a static KV cache, ``prefill`` + one ``decode_step`` (gpt-fast's design), sampling.

The loop in :func:`stream` is the only generation loop; :func:`generate` collects it and
:func:`stream_text` turns it into text. Each step feeds one token against the preallocated cache,
so a token costs O(context), not O(context²) as re-running the whole window would.

Sampling draws its random numbers from a hash of (seed, token index, token id) computed with
integer tensor ops (:func:`random_bits`), not from a ``torch.Generator``: the same seed gives the
same tokens on every device for the same logits, needs no host sync (so it fits inside a CUDA
graph), and row ``i`` of a batch seeded ``S`` draws exactly what a batch of one seeded ``S + i``
draws. The serving engine (``engine.py``) runs the same :func:`decode_step` and
:func:`sample_logits` with per-row settings.

Windows (what a token is conditioned on), documented once here:

* A prompt longer than ``context_length`` is cropped to its last ``context_length`` tokens, with a
  warning (the returned ids still start with the whole prompt).
* When the window would grow past ``context_length``, the cache slides: the most recent
  ``context_length // 2`` tokens are re-prefilled at positions ``0 ..`` and decoding goes on from
  there. So every token is predicted exactly as a cache-less ``model(ids[:, start:])[:, -1]`` on
  its window, with ``start`` moving forward in jumps of about ``context_length // 2`` (the cost of
  one prefill every ``context_length // 2`` tokens instead of a full forward per token, as
  nanoGPT's crop-every-step loop does).
* A batch of prompts of different lengths is left-padded, with an attention mask and per-row
  positions, so each row gets the tokens it would get alone as long as the longest prompt plus
  ``max_new_tokens`` fits in the context. Past that the rows slide together, when the longest
  (padded) row fills the cache, so a shorter row may slide earlier than it would alone.
"""

from __future__ import annotations

import codecs
import math
import operator
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch

from . import cpukernels
from .model import check_token_ids
from .tokenizer import encode_as_hf

if TYPE_CHECKING:
    from .model import GPT


class Decoder(Protocol):
    """What generation needs from a tokenizer: ids -> text (and ``eot``, the end-of-text id)."""

    eot: int | None

    def decode(self, ids: Sequence[int]) -> str: ...


# --- text: the one stop-string and UTF-8 rule --------------------------------------------------------
class TextStream:
    """Turn generated token ids into final text, one token at a time: the one place that knows the
    stop-string rule and the UTF-8 hold-back (used by :func:`stream`, :func:`generate`,
    :func:`stream_text`, the CLI and the server).

    ``push(token)`` returns the text that is now final: it never ends inside a UTF-8 character
    (byte-level BPE splits characters across tokens) and never contains a piece that could still
    become a stop string. Once the text contains a stop string, ``stopped`` is True and that stop
    string and everything after it are dropped; later pushes return ``""``. ``flush()`` returns
    what is still held back when generation ends (an unfinished character comes out as U+FFFD).
    End-of-text tokens are not special here: the caller decides whether to push them.

    With a tokenizer that gives each token's bytes (``token_bytes``, as ours do; tiktoken's
    ``decode_single_token_bytes``) the bytes go through one incremental UTF-8 decoder, so the text
    is exactly ``tokenizer.decode`` of all the tokens, invalid byte runs included; otherwise
    tokens are decoded in small groups (an unfinished character held for up to 4 tokens).
    """

    def __init__(self, tokenizer: Decoder, stop_strings: Sequence[str] = (), *, min_tokens: int = 0) -> None:
        """``min_tokens`` (vLLM's): stop strings are looked for only once more than that many tokens
        are in (:meth:`push` and :meth:`skip` count them), in the text those tokens complete (a stop
        string begun earlier and completed then counts), as vLLM's detokenizer does."""
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        stops = list(stop_strings or ())
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop strings must be non-empty strings, got {stops!r}")
        self.tokenizer = tokenizer
        self.stop_strings = stops
        self.min_tokens = min_tokens
        self.tokens = 0  # tokens pushed or skipped
        self.stopped = False
        self.stop_string: str | None = None  # the stop string that stopped it (the earliest in the text)
        self._pending: list[int] = []  # tokens whose text may still be an incomplete character
        self._held = ""  # decoded text not yet released: a possible start of a stop string
        self._token_bytes = getattr(tokenizer, "token_bytes", None) or getattr(tokenizer, "decode_single_token_bytes",
                                                                               None)
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace") if self._token_bytes is not None else None

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became final (possibly ``""``)."""
        if self.stopped:
            return ""
        self.tokens += 1
        if self._utf8 is not None:  # an unfinished character's bytes wait inside the decoder
            return self._release(self._utf8.decode(self._token_bytes(int(token_id))), final=False)
        self._pending.append(int(token_id))
        piece = self.tokenizer.decode(self._pending)
        # U+FFFD at the end: a character cut between tokens. A UTF-8 character has at most 4
        # bytes, so after 4 tokens the replacement character is real and is let through.
        if piece.endswith("\ufffd") and len(self._pending) < 4:
            # The complete characters before the cut may already finish a stop string.
            if self.stop_strings and self._find_stop(self._held + piece.rstrip("\ufffd")) >= 0:
                self._pending = []
                return self._release(piece.rstrip("\ufffd"), final=True)
            return ""
        self._pending = []
        return self._release(piece, final=False)

    def skip(self) -> None:
        """Count a generated token that adds no text (a special token the caller hides) towards
        ``min_tokens``."""
        self.tokens += 1

    @property
    def held_chars(self) -> int:
        """Characters decoded so far but not yet returned (a possible start of a stop string): the
        text returned so far plus this many is where the next token's text begins (the server's
        logprobs ``text_offset``); the bytes of an unfinished character are not counted yet."""
        return len(self._held)

    def flush(self) -> str:
        """The text still held back, at the end of generation (``""`` once stopped)."""
        if self.stopped:
            return ""
        if self._utf8 is not None:
            return self._release(self._utf8.decode(b"", final=True), final=True)
        piece = self.tokenizer.decode(self._pending) if self._pending else ""
        self._pending = []
        return self._release(piece, final=True)

    def _find_stop(self, text: str) -> int:
        if self.tokens <= self.min_tokens:
            return -1
        return min((i for i in (text.find(s) for s in self.stop_strings) if i >= 0), default=-1)

    def _release(self, piece: str, final: bool) -> str:
        text = self._held + piece
        cut = self._find_stop(text) if self.stop_strings else -1
        if cut >= 0:
            self.stopped = True
            self.stop_string = max((s for s in self.stop_strings if text.startswith(s, cut)), key=len)
            self._held = ""
            return text[:cut]
        hold = 0 if final else self._longest_stop_prefix_suffix(text)
        self._held = text[len(text) - hold:]
        return text[:len(text) - hold]

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best


# --- sampling ----------------------------------------------------------------------------------------
# Random numbers come from a counter-based hash of (seed, step, token id) computed with integer tensor
# ops: the same bits on every device and dtype, no generator state, no host sync, and each row's
# draw depends only on its own seed and step (so a row gives the same tokens alone or batched).
_M32 = 0xFFFFFFFF
_SEED_MOD = 2**63
_ID_HASHES: dict[tuple[int, torch.device], torch.Tensor] = {}  # _hash32(arange(V)) per (V, device)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons' integer hash), a bijection of 32-bit words, on int32 tensors.

    The words are held two's-complement in int32 and the multiplications wrap modulo 2**32, as
    every torch backend computes them (a vectorised ``mullo`` on CPU, ``mul.lo`` on CUDA, the same
    in compiled code); the shifts are made logical by masking off the sign bits an arithmetic
    shift drags in. int32 lanes instead of int64 with 16-bit half products: a third of the
    operations on half the bytes (the pure-Python check in the tests pins the values)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x7FEB352D
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * (0x846CA68B - 2**32)
    return x ^ ((x >> 16) & 0xFFFF)


def _as_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 words in ``[0, 2**32)`` as the int32 with the same 32 bits."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def _row_keys(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """The ``(B,)`` int32 key of each row's draw: a hash of (seed, step)."""
    lo, hi = _as_int32(seeds & _M32), _as_int32(seeds >> 32)
    return _hash32(_hash32(_hash32(hi ^ 0x9E3779B9) ^ lo) ^ _as_int32(steps & _M32))


def _id_hashes(vocab_size: int, device: torch.device) -> torch.Tensor:
    """``_hash32`` of every token id ``(V,)``: the half of the hash that does not depend on the
    seed, made once per vocabulary and device (inside a compiled graph it is recomputed, fused)."""
    if torch.compiler.is_compiling():
        return _hash32(torch.arange(vocab_size, device=device, dtype=torch.int32))
    key = (vocab_size, torch.device(device))
    if key not in _ID_HASHES:
        _ID_HASHES[key] = _hash32(torch.arange(vocab_size, device=device, dtype=torch.int32))
    return _ID_HASHES[key]


def random_bits(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """32 random bits ``(B, vocab_size)`` int64 for token id ``v`` of row ``b``: a hash of
    ``(seeds[b], steps[b], v)``. ``seeds`` are in ``[0, 2**63)``, ``steps`` >= 0."""
    bits = _hash32(_id_hashes(vocab_size, seeds.device)[None, :] ^ _row_keys(seeds, steps)[:, None])
    return bits.long() & _M32


def _gumbel(keys: torch.Tensor, id_hashes: torch.Tensor) -> torch.Tensor:
    """Gumbel noise ``(B, n)`` fp32 of the tokens whose ``_hash32(id)`` are ``id_hashes``
    (``(V,)`` for the whole vocabulary or ``(B, n)`` for some ids per row): ``-log(-log(u))`` with
    ``u`` the top 23 bits of :func:`random_bits`, in ``[2**-24, 1 - 2**-24]`` (23 bits keep the
    top value exactly below 1 in fp32)."""
    if id_hashes.dim() == 1:
        id_hashes = id_hashes[None, :]
    bits = _hash32(id_hashes ^ keys[:, None])
    u = (((bits >> 9) & 0x7FFFFF).float() + 0.5) * 2.0**-23
    return u.log_().neg_().log_().neg_()


def seed_tensor(seeds: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Per-row seeds as the ``(B,)`` int64 tensor :func:`sample_logits` takes (modulo 2**63)."""
    return torch.tensor([int(s) % _SEED_MOD for s in seeds], dtype=torch.long, device=device)


def row_seeds(seed: int, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Seeds ``seed, seed + 1, ...`` of ``batch_size`` rows: row i of a batch seeded ``S`` draws
    what a batch of one seeded ``S + i`` draws."""
    return seed_tensor([int(seed) + i for i in range(batch_size)], device)


def new_seed(generator: torch.Generator | None = None) -> int:
    """A fresh seed from ``generator`` (or torch's global generator, so ``torch.manual_seed``
    still makes unseeded generation reproducible)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, _SEED_MOD - 1, (), generator=generator, device=device))


def _per_row(value: float | int | torch.Tensor, B: int, device: torch.device) -> torch.Tensor:
    return value.to(device) if isinstance(value, torch.Tensor) else torch.full((B,), value, device=device)


# Eagerly on a CPU, torch's argmax over a row is a scalar (value, index) loop, ~1 ns per element
# (0.40 ms for 8 x 50,257 logits on one AVX2 core, ~3% of an 8-row decode step of the 6x384 BPE
# model), while a max is vectorised. ``argmax_rows`` takes the max of each chunk of this many ids
# first and runs argmax only over the chunk maxima and one chunk per row: 0.12 ms there.
ARGMAX_CHUNK = 512


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` of a ``(B, V)`` tensor, exactly: the first maximal index of each
    row, a NaN counting as the maximum (as torch.argmax). Eagerly on a CPU, for large inputs, in
    two levels (see ``ARGMAX_CHUNK``): the chunk maxima, the first chunk holding the row's
    maximum (an earlier chunk wins a tie, so its first maximal index is the row's), then argmax
    inside that chunk. The last window is moved back to end at ``V``; the ids it shares with the
    chunk before cannot hold a maximum then, as that chunk would have won."""
    B, V = x.shape
    c = ARGMAX_CHUNK
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.stride(-1) == 1 and V and cpukernels.enabled() \
            and not torch.compiler.is_compiling():
        # Our one-pass vectorized argmax (cpukernels.cpp): ~0.01 ms for 50,257 logits against 0.06.
        return torch.ops.gpt2model_kernels.argmax_rows(x)
    if x.device.type != "cpu" or torch.compiler.is_compiling() or V // c < 4 or x.numel() < 65536:
        return x.argmax(dim=-1)  # one fused kernel elsewhere; few elements: the plain loop is as fast
    n = V // c
    m = x[:, :n * c].unflatten(1, (n, c)).amax(dim=-1)  # (B, n)
    if n * c < V:
        m = torch.cat([m, x[:, n * c:].amax(dim=-1, keepdim=True)], dim=1)
    start = (m.argmax(dim=-1) * c).clamp_(max=V - c)
    window = x.gather(1, start[:, None] + torch.arange(c, device=x.device))
    return window.argmax(dim=-1) + start


# Temperatures below this are greedy, as in vLLM (its _SAMPLING_EPS): dividing fp32 logits by a
# smaller one can overflow to inf (1e-40 drew garbage: inf - inf is NaN), and at such temperatures
# the draw is the argmax anyway except for near-exact ties.
GREEDY_TEMPERATURE = 1e-5


def sample_logits(logits: torch.Tensor, temperature: float | torch.Tensor = 1.0,
                  top_k: int | torch.Tensor | None = None, top_p: float | torch.Tensor | None = None,
                  generator: torch.Generator | None = None, *, seed: int | torch.Tensor | None = None,
                  step: int | torch.Tensor = 0, bias: torch.Tensor | None = None,
                  penalty: torch.Tensor | None = None, min_p: float | torch.Tensor | None = None,
                  vocab_limit: int | None = None) -> torch.Tensor:
    """Draw one token id per row from ``logits`` ``(B, vocab)``; returns ``(B,)`` int64.

    ``vocab_limit``: draw only ids below it (:func:`limit_vocab`), for a model with more rows than
    its tokenizer has tokens; ``bias``/``penalty`` may be as wide as ``logits`` or ``vocab_limit``.

    ``temperature == 0`` is greedy (exact argmax; ``top_k``/``top_p`` are then irrelevant), and so is
    any temperature below ``GREEDY_TEMPERATURE`` (1e-5, as vLLM).
    Otherwise the logits are divided by ``temperature``, ``top_k`` keeps the k largest logits (all
    tokens tied with the k-th stay), and ``top_p`` (nucleus) keeps the smallest set of most likely
    tokens whose total probability reaches ``top_p`` (always at least the most likely one, so
    ``top_p=0`` keeps only it, as HF's ``TopPLogitsWarper`` and llama.cpp do; tokens
    tied with the last one kept stay too, so the set never depends on how a sort orders equal
    probabilities). Each setting is a number for all rows or a ``(B,)`` tensor per row
    (``top_k <= 0`` and ``top_p >= 1`` then mean no filter for that row; an int ``top_k`` of 0 is no
    filter too, as HF ``generate``, vLLM and llama.cpp read it). Everything runs in fp32.

    The draw is a Gumbel-max (exponential race) over the kept tokens, its noise a hash of
    ``(seed, step, token id)`` (:func:`random_bits`): the same seed gives the same tokens on every
    device for the same logits. ``seed`` is an int (row i uses ``seed + i``) or a ``(B,)`` tensor;
    ``step`` (int or ``(B,)``) is the index of the token being drawn, so successive draws differ.
    Without ``seed`` one is drawn from ``generator`` (or torch's global generator). ``bias``
    (``(B, vocab)``, optional) is added to the logits before anything else, greedy rows included:
    the serving engine's ``logit_bias`` and presence/frequency penalties. ``penalty`` (``(B, vocab)``
    factors, optional: 1 for unseen tokens, the repetition penalty ``p > 0`` for tokens already in
    the sequence) is applied first, to the raw logits, as HF's ``RepetitionPenaltyLogitsProcessor``:
    a logit ``x`` becomes ``x * p`` when ``x < 0``, else ``x / p``. ``min_p`` (a number or ``(B,)``,
    in ``[0, 1]``, 0 = off; HF's ``MinPLogitsWarper``, after ``top_k``/``top_p`` as HF orders them)
    keeps the tokens whose probability is at least ``min_p`` times the row's largest, i.e. whose
    scaled logit is at least the row's maximum + ``log(min_p)``; greedy rows ignore it.

    Eager code never sorts the whole vocabulary unless it must: ``top_k`` takes a top-k selection,
    and ``top_p`` looks for each row's nucleus among its ``NUCLEUS_CANDIDATES`` most likely tokens
    (a top-k selection) and sorts the vocabulary only when some row's nucleus is larger. When
    every sampled row is filtered, only the kept candidates are hashed: the same draw as hashing
    the whole vocabulary, since a token's noise depends only on its id. Compiled graphs (no host
    reads) sort. All paths give the same tokens.
    """
    logits, bias, penalty = (limit_vocab(t, vocab_limit) for t in (logits, bias, penalty))
    logits = logits.float()  # bf16 has too few mantissa bits for a faithful softmax/cumsum
    if penalty is not None:
        logits = _penalize(logits, penalty)
    if bias is not None:
        logits = logits + bias
    B, V = logits.shape
    if not isinstance(temperature, torch.Tensor) and temperature < GREEDY_TEMPERATURE:
        return argmax_rows(logits)
    device = logits.device
    per_row_t = isinstance(temperature, torch.Tensor)
    if per_row_t:  # rows at temperature 0 (below GREEDY_TEMPERATURE) are greedy
        t = temperature.to(device).float()
        greedy = t < GREEDY_TEMPERATURE
        scaled = logits / torch.where(greedy, torch.ones_like(t), t)[:, None]
    else:  # (x / 1 == x exactly; the same fp32 division as the per-row case otherwise)
        scaled = logits if temperature == 1 else logits / _per_row(temperature, B, device).float()[:, None]
    if isinstance(top_k, int) and top_k == 0:  # HF/vLLM/llama.cpp: top_k 0 is no top-k filter
        top_k = None
    candidates = None
    eager = not torch.compiler.is_compiling()
    nucleus = top_p is not None and (isinstance(top_p, torch.Tensor) or top_p < 1.0)
    if top_k is not None and not nucleus and eager:
        candidates = _top_k_candidates(scaled, top_k, greedy if per_row_t else None)
    if candidates is None and (top_k is not None or nucleus):
        scaled, candidates = _filter(scaled, top_k, top_p if nucleus else None, greedy if per_row_t else None,
                                     NUCLEUS_CANDIDATES if eager else None)
    if min_p is not None and (isinstance(min_p, torch.Tensor) or min_p > 0):
        # The threshold depends only on the row's maximum, which top-k/top-p always keep: filter
        # the candidates when there are some (their largest is the row's), else the whole row.
        log_min_p = torch.log(_per_row(min_p, B, device).float())[:, None]  # 0 -> -inf: keeps all
        if candidates is not None:
            values = candidates[0]
            values = values.masked_fill(values < values.amax(dim=-1, keepdim=True) + log_min_p, float("-inf"))
            candidates = (values, candidates[1])
        else:
            scaled = scaled.masked_fill(scaled < scaled.amax(dim=-1, keepdim=True) + log_min_p, float("-inf"))
    if seed is None:
        seed = new_seed(generator)
    seeds = row_seeds(seed, B, device) if not isinstance(seed, torch.Tensor) else seed.to(device)
    keys = _row_keys(seeds, _per_row(step, B, device).long())
    if candidates is not None:
        # Only the top-k tokens can win: hash just those ids (the noise depends only on the id, so
        # the draw is the full-vocabulary draw), in id order so that ties resolve as argmax does.
        ids, order = candidates[1].sort(dim=-1)
        kept = candidates[0].gather(1, order)
        drawn = ids.gather(1, (kept + _gumbel(keys, _hash32(ids.int()))).argmax(dim=-1, keepdim=True))[:, 0]
    else:
        drawn = argmax_rows(scaled + _gumbel(keys, _id_hashes(V, device)))
    return torch.where(greedy, argmax_rows(logits), drawn) if per_row_t else drawn


def limit_vocab(x: torch.Tensor | None, vocab_limit: int | None) -> Any:
    """The first ``vocab_limit`` columns of ``x`` ``(B, V)`` (a view; ``x`` itself when None or
    ``>= V``; None stays None): what generation draws from. A model may have more rows than its
    tokenizer has tokens (a nanoGPT export padded to 50,304 rows for GPT-2's 50,257 tokens, HF
    embeddings resized with ``pad_to_multiple_of``); ids past the tokenizer's cannot be decoded,
    so generation never draws them, as vLLM and llama.cpp never emit them. The ids are a prefix:
    a drawn id needs no remapping, and in a compiled step the slice is static."""
    if x is None or vocab_limit is None or vocab_limit >= x.size(-1):
        return x
    return x[..., :vocab_limit]


def check_vocab_limit(vocab_limit: int | None) -> None:
    """Raise a ``ValueError`` unless ``vocab_limit`` is None or an integer >= 1."""
    if vocab_limit is not None and (isinstance(vocab_limit, bool) or not isinstance(vocab_limit, int)
                                    or vocab_limit < 1):
        raise ValueError(f"vocab_limit must be an integer >= 1 (the tokenizer's vocab_size) or None, "
                         f"got {vocab_limit!r}")


def _penalize(logits: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """HF's repetition penalty ``where(x < 0, x * p, x / p)`` with factors ``p`` ``(B, V)``, bit for
    bit (one of the two terms is exactly 0, and ``x * 1 == x / 1 == x``: unseen tokens keep their
    logit), without the select: an eager CPU ``torch.where`` over (8, 50,257) took 4.8 ms on one
    core, this 0.26 ms. Returns a new tensor (in place from there: fewer large temporaries, which
    an eager CPU step pays for in page faults)."""
    return logits.clamp(min=0).div_(penalty).addcmul_(logits.clamp(max=0), penalty)


def _top_k_candidates(scaled: torch.Tensor, top_k: int | torch.Tensor,
                      greedy: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(values, ids)`` ``(B, n)`` of every token the top-k filter keeps, for eager code (a host
    read or two): each row's k largest plus the tokens tied with its k-th (n = the most kept in a
    row; a row's extra entries, below its k-th, are -inf). ``top_k`` is one int or a ``(B,)``
    tensor; ``greedy`` rows (drawn by argmax anyway) need none. ``None`` when some row keeps the
    whole vocabulary (no filter): the caller then takes the full-vocabulary path."""
    V = scaled.size(1)
    if isinstance(top_k, torch.Tensor):
        k = top_k.to(scaled.device).long()
        if greedy is not None:
            k = torch.where(greedy, torch.ones_like(k), k)
        lo, hi = (int(v) for v in torch.aminmax(k))
        if lo <= 0 or hi >= V:
            return None
        values, ids = torch.topk(scaled, hi, dim=-1)
        kth = values.gather(1, (k - 1)[:, None])
    else:
        if top_k >= V:
            return None
        values, ids = torch.topk(scaled, top_k, dim=-1)
        kth = values[:, -1:]
    n = int((scaled >= kth).sum(dim=-1).max())
    if n > values.size(1):  # ties with the k-th stay (bf16 logits tie often)
        values, ids = torch.topk(scaled, n, dim=-1)
    return values.masked_fill(values < kth, float("-inf")), ids


# Eager top-p looks for each row's nucleus among this many of its most likely tokens first (a
# top-k selection: ~0.2 ms at 50,257 ids instead of ~5 ms for sorting them) and sorts the whole
# vocabulary only when some row's nucleus is larger (e.g. a flat distribution at top_p=0.95).
NUCLEUS_CANDIDATES = 256


def _filter(scaled: torch.Tensor, top_k: int | torch.Tensor | None, top_p: float | torch.Tensor | None,
            greedy: torch.Tensor | None, budget: int | None
            ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """top-k, then top-p of the rest, settings one number or ``(B,)`` per row: returns the
    filtered logits ``(B, V)`` (dropped tokens -inf) and None or, when every row's kept tokens are
    known to be among ``budget`` candidates, the candidates ``(values, ids)`` ``(B, budget)``
    (-inf where dropped; the logits are then returned unfiltered by top-p, as only the
    candidates are drawn from). ``budget=None`` (compiled graphs): sorts instead of selecting, no host
    read. ``greedy`` rows (drawn by argmax anyway) keep only their top token."""
    B, V = scaled.shape
    device = scaled.device
    if top_k is not None:
        if isinstance(top_k, torch.Tensor):
            k = top_k.to(device).long()
            k = torch.where((k <= 0) | (k > V), torch.full_like(k, V), k)
            if budget is None:
                kth = scaled.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
            else:  # a selection of the largest k instead of a sort (one host read)
                kth = torch.topk(scaled, int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        elif top_k < V:
            kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p is None:
        return scaled, None
    p = _per_row(top_p, B, device).float()[:, None]
    if greedy is not None:
        p = torch.where(greedy[:, None], torch.zeros_like(p), p)
    probs = scaled.softmax(dim=-1)
    threshold, candidates = _nucleus(probs, p, budget)
    if candidates is None:
        return scaled.masked_fill(probs < threshold, float("-inf")), None
    # Only the candidates are drawn from: the whole filtered row is not needed (not built).
    sorted_probs, ids = candidates
    return scaled, (scaled.gather(1, ids).masked_fill(sorted_probs < threshold, float("-inf")), ids)


def _nucleus(probs: torch.Tensor, top_p: torch.Tensor, budget: int | None
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Each row's nucleus as a threshold ``(B, 1)`` on ``probs`` ``(B, V)``: the row keeps the
    tokens whose probability is at least it. ``top_p`` ``(B, 1)``, >= 1 keeps all (threshold 0).

    The nucleus: the most likely tokens, in order, as long as the ones before reach less than
    ``top_p`` (at least one), plus every token tied with the last of them (a threshold keeps
    ties, so the kept set does not depend on how equal probabilities are ordered). Only the sorted
    probabilities matter, so with ``budget`` the row's ``budget`` largest (a top-k selection) give
    the same threshold as a sort of all ``V`` whenever the nucleus ends inside them; when some
    row's does not (one host read), the whole rows are sorted. Also returns ``(sorted probs, ids)``
    ``(B, budget)`` of the candidates when every row has a nucleus (``top_p < 1``) and all of its
    tokens are among them (none tied with the last candidate), else None.
    """
    V = probs.size(-1)
    selected = budget is not None and budget < V
    if selected:
        sorted_probs, ids = torch.topk(probs, budget, dim=-1)
    else:
        sorted_probs, ids = probs.sort(dim=-1, descending=True)
    # A token stays while the tokens before it total less than top_p. The small slack makes sums
    # that equal top_p up to fp32 rounding (0.5 + 0.3 vs 0.8) count as reaching it.
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    inside = before < top_p - 1e-6
    inside[:, 0] = True
    n = inside.sum(dim=-1, keepdim=True)
    filtering = top_p < 1.0
    threshold = torch.where(filtering, sorted_probs.gather(1, n - 1), torch.zeros_like(top_p))
    if not selected:
        return threshold, None
    overflow, complete = torch.stack([((n == budget) & filtering).any(),
                                      (filtering & (sorted_probs[:, -1:] < threshold)).all()]).tolist()
    if overflow:  # some nucleus may reach past the candidates: sort the whole rows
        return _nucleus(probs, top_p, None)
    return threshold, (sorted_probs, ids) if complete else None


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None, *,
                        repetition_penalty: float = 1.0, min_p: float | None = None) -> None:
    """Raise a ``ValueError`` naming the fix for any out-of-range sampling setting."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0 \
            or math.isinf(temperature):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 or None: no top-k filter), got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0.0 <= top_p <= 1.0):  # 0: the most likely token only, as HF/llama.cpp/OpenAI
        raise ValueError(f"top_p must be in [0, 1] (0: only the most likely token; 1 or None: no nucleus filter), "
                         f"got {top_p!r}")
    if isinstance(repetition_penalty, bool) or not isinstance(repetition_penalty, (int, float)) \
            or not 0.0 < repetition_penalty < math.inf:
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = no penalty; HF and vLLM use "
                         f"e.g. 1.1-1.3), got {repetition_penalty!r}")
    f32 = torch.finfo(torch.float32)
    if not f32.tiny <= repetition_penalty <= f32.max:  # it multiplies fp32 logits: 1e300 overflowed (a crash)
        raise ValueError(f"repetition_penalty must be in [{f32.tiny:.4g}, {f32.max:.4g}] (a float32 number > 0), "
                         f"got {repetition_penalty!r}")
    if min_p is not None and (isinstance(min_p, bool) or not isinstance(min_p, (int, float))
                              or not 0.0 <= min_p <= 1.0):
        raise ValueError(f"min_p must be in [0, 1] (0 or None for no min-p filter), got {min_p!r}")


# --- the forwards: prefill and the one decode step ------------------------------------------------
def prefill(model: GPT, input_ids: torch.Tensor, input_pos: torch.Tensor, mask: torch.Tensor | None,
            position_ids: torch.Tensor | None = None, cache_row: int = 0) -> torch.Tensor:
    """Run a whole window ``(B, T)`` into cache slots ``input_pos`` and return the last logits ``(B, V)``
    (the LM head runs on the last position only: ``logits_to_keep=1``)."""
    return model(input_ids, input_pos=input_pos, mask=mask, position_ids=position_ids, cache_row=cache_row,
                 logits_to_keep=1)[:, -1]


def decode_one_token(model: GPT, token: torch.Tensor, input_pos: torch.Tensor, mask: torch.Tensor,
                     position_ids: torch.Tensor) -> torch.Tensor:
    """Feed one token per row ``(B, 1)`` into each row's cache slot ``input_pos`` ``(B, 1)``;
    return the logits ``(B, V)``."""
    return model(token, input_pos=input_pos, mask=mask, position_ids=position_ids)[:, -1]


def decode_step(model: GPT, token: torch.Tensor, input_pos: torch.Tensor, mask: torch.Tensor,
                position_ids: torch.Tensor, temperature: float | torch.Tensor, top_k: int | torch.Tensor | None,
                top_p: float | torch.Tensor | None, seeds: torch.Tensor,
                steps: torch.Tensor, bias: torch.Tensor | None = None, *, penalty: torch.Tensor | None = None,
                min_p: float | torch.Tensor | None = None,
                vocab_limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The one decode step of :func:`stream` and the serving engine: feed ``token`` ``(B, 1)``
    and draw the next token of every row with :func:`sample_logits` (``bias``, ``penalty``,
    ``min_p``, ``vocab_limit``: its logit bias, repetition-penalty factors, min-p and id limit);
    returns ``(next (B,), logits (B, V))``, the logits as the model gave them (their first
    ``vocab_limit`` columns with a limit: the ids drawn from, for logprobs). Sampling sits
    inside the step so a compiled (CUDA-graph) step needs no host sync per token except reading
    the token."""
    logits = limit_vocab(decode_one_token(model, token, input_pos, mask, position_ids), vocab_limit)
    return sample_logits(logits, temperature, top_k, top_p, seed=seeds, step=steps, bias=bias, penalty=penalty,
                         min_p=min_p, vocab_limit=vocab_limit), logits


# Inductor options of the CPU decode step (see :func:`compiled_decode_step`). Not ``freezing``
# (weights as constants, oneDNN-prepacked fp32 linears): it measured no faster here (6x384 BPE,
# 1 thread, interleaved: fp32 9.19 vs 9.29 ms per token, int8 4.71 vs 4.61; a packed oneDNN GEMV
# is slower than the column-major one at one row), and weights baked in as constants could go
# stale. The weights stay inputs of the graph, so weights changed in place after compiling
# (training on, ``load_state_dict``) are used by the next step (tested). Multiply-adds are
# contracted into FMA instructions (inductor compiles with ``-ffp-contract=off`` by default): one
# instruction and one rounding instead of two in every GEMV loop (int8 50,257 x 384 GEMV 0.61 ->
# 0.56 ms; bf16 4-5%).
CPU_COMPILE_OPTIONS = {"cpp_wrapper": True, "cpp.enable_floating_point_contract_flag": "fast"}
# Every combination of rows, cache length (a generation's prompt + new tokens, up to the context),
# weights dtype and sampling settings is its own static-shape graph of the one ``decode_step``;
# torch's default of 8 graphs per function made the 9th such call in a process fall back to
# eager decoding for good. ``compiled_decode_step`` raises torch's limit to this.
DECODE_STEP_RECOMPILE_LIMIT = 64


def compiled_decode_step(device: torch.device, mode: str | None = "auto",
                         fn: Callable[..., Any] | None = None) -> Callable[..., Any]:
    """:func:`decode_step` (or ``fn``: :func:`generation_step`, the decode step with the generation
    loop's bookkeeping) under ``torch.compile``, the whole step one graph (``fullgraph``: static
    cache, static shapes, sampling inside). ``mode="auto"``: ``reduce-overhead`` (CUDA graphs) on
    CUDA, the default mode elsewhere. Call a compiled :func:`decode_step` through
    :func:`run_compiled_step`. Graphs are kept on the function's code object, so wrapping it again
    reuses them."""
    fn = decode_step if fn is None else fn
    if mode == "auto":
        mode = "reduce-overhead" if device.type == "cuda" else None
    import torch._dynamo

    if torch._dynamo.config.recompile_limit < DECODE_STEP_RECOMPILE_LIMIT:  # process-wide: no per-function limit
        torch._dynamo.config.recompile_limit = DECODE_STEP_RECOMPILE_LIMIT
    key = (fn, mode, device.type)
    if key not in _COMPILED_STEPS:  # a torch.compile wrapper costs ~0.5 ms to make: once per process
        if mode is None and device.type == "cpu":
            # A CPU step is a chain of small kernels, each called by inductor's generated wrapper; in
            # C++ (``cpp_wrapper``) that chain costs less per call than the Python wrapper (measured,
            # 6x384 BPE, 1 thread, interleaved: int8 4.61 -> 4.27 ms per token, fp32 9.3 -> 8.9).
            _COMPILED_STEPS[key] = torch.compile(fn, fullgraph=True, dynamic=False, options=CPU_COMPILE_OPTIONS)
        else:
            _COMPILED_STEPS[key] = torch.compile(fn, mode=mode, fullgraph=True, dynamic=False)
    return _COMPILED_STEPS[key]


_COMPILED_STEPS: dict[tuple[Any, ...], Callable[..., Any]] = {}


def step_for(model: GPT, compile: bool, fn: Callable[..., Any] | None = None, *,
             rows: int | None = None) -> Callable[..., Any]:
    """The step to run on ``model``: ``fn`` (default :func:`decode_step`) compiled by
    :func:`compiled_decode_step` when ``compile`` is asked for and it has not failed on this model
    before (see :func:`note_compile_failure`), else ``fn`` itself, eager.

    ``rows`` (the rows of the KV cache the step will run on; default: the live cache's, as the
    serving engine's): where the model's decode forward of that many rows is our whole-step CPU
    op (``GPT.fused_decode_applies``), the step stays eager
    even with ``compile``: one op call per token plus the sampling, while torch.compile's guards
    and wrappers cost ~0.5-0.8 ms per call around the same op (NOTES "[cpu3"; 6x384 BPE int8 at
    one thread: ~2.0 ms per token eager against ~2.7 compiled), and no compilation is waited for."""
    fn = decode_step if fn is None else fn
    rows = rows or model._cache_batch
    if not compile or (rows and model.fused_decode_applies(rows)):
        return fn
    error = getattr(model, "_decode_compile_error", None)
    if error is not None:
        warnings.warn(f"compile=True ignored: the decode step failed to compile on this model before ({error}); "
                      f"decoding eagerly", stacklevel=3)
        return fn
    return compiled_decode_step(model.device) if fn is decode_step else compiled_decode_step(model.device, fn=fn)


def note_compile_failure(model: GPT, error: Exception) -> None:
    """Warn that the compiled decode step failed (the caller decodes eagerly: same tokens) and
    remember it on ``model``, so later calls do not pay for another failing compilation."""
    message = f"{type(error).__name__}: {str(error)[:200]}"
    model._decode_compile_error = message
    warnings.warn(f"torch.compile of the decode step failed ({message}); decoding eagerly instead", stacklevel=3)


def _cudagraph_thread_state() -> None:
    """Give this thread the CUDA-graph-tree state torch keeps per thread, if it lacks it.

    torch sets that state up on the thread that imports ``torch._inductor.cudagraph_trees``; up to
    torch 2.11 at least, a CUDA-graph step run from any other plain thread (the serving engine's,
    once ``generate(compile=True)`` ran on the main thread) fails with a bare ``AssertionError``,
    and the step fell back to eager. Newer torch sets the state up lazily, as done here."""
    trees = sys.modules.get("torch._inductor.cudagraph_trees")
    if trees is None or hasattr(trees.local, "tree_manager_containers") \
            or torch._C._is_key_in_tls("tree_manager_containers"):
        return  # not imported yet (the first compile imports it on this thread), or set up
    if hasattr(trees, "_initialize_tls"):
        trees._initialize_tls(trees.local)
        return
    import threading
    from collections import defaultdict

    trees.local.tree_manager_containers = {}
    trees.local.tree_manager_locks = defaultdict(threading.Lock)
    torch._C._stash_obj_in_tls("tree_manager_containers", trees.local.tree_manager_containers)
    torch._C._stash_obj_in_tls("tree_manager_locks", trees.local.tree_manager_locks)


def run_compiled_step(step_fn: Callable[..., tuple[torch.Tensor, ...]], *args: Any,
                      **kwargs: Any) -> tuple[torch.Tensor, ...]:
    """Call a compiled step. Under CUDA graphs the outputs live in the graph's memory, which the
    next replay overwrites: mark the new step and copy the outputs out (two tiny copies)."""
    _cudagraph_thread_state()
    torch.compiler.cudagraph_mark_step_begin()
    # Only CUDA graphs reuse output memory; a CPU step returns fresh tensors (no copy of the logits).
    return tuple(t.clone() if t.is_cuda else t for t in step_fn(*args, **kwargs))


# --- input handling ----------------------------------------------------------------------------------
def _as_padded_batch(input_ids: torch.Tensor | Sequence[Sequence[int]], vocab_size: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids (B, P), valid (B, P) bool)``: a list of prompts is left-padded with 0s."""
    if isinstance(input_ids, torch.Tensor):
        check_token_ids(input_ids, vocab_size)
        ids = input_ids.to(device=device, dtype=torch.long)
        return ids, torch.ones_like(ids, dtype=torch.bool)
    if isinstance(input_ids, (str, bytes)) or not isinstance(input_ids, Sequence) or not input_ids \
            or not all(isinstance(row, (Sequence, torch.Tensor)) and not isinstance(row, str) for row in input_ids):
        raise ValueError("input_ids must be a (batch, seq_len) tensor or a non-empty list of token id lists "
                         "(e.g. [[464, 2068], [40]]); encode text with the tokenizer first")
    rows = [[int(t) for t in row] for row in input_ids]
    if any(len(row) == 0 for row in rows):
        raise ValueError("empty prompt: every prompt needs at least one token (e.g. the tokenizer's eot id)")
    P = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), P, dtype=torch.long)
    valid = torch.zeros(len(rows), P, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, P - len(row):] = torch.tensor(row, dtype=torch.long)
        valid[i, P - len(row):] = True
    check_token_ids(torch.tensor([t for row in rows for t in row]), vocab_size, ndim=1)
    return ids.to(device), valid.to(device)


def base_seed(seed: int | None, generator: torch.Generator | None) -> int:
    """The seed of row 0 of a generation: ``seed``, else one drawn from ``generator`` (kept for
    compatibility: the generator only seeds the hash, so its device no longer matters), else one
    drawn from torch's global generator (``torch.manual_seed`` makes it reproducible)."""
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        return seed
    return new_seed(generator)


# --- the loop ------------------------------------------------------------------------------------
def stream(model: GPT, input_ids: torch.Tensor | Sequence[Sequence[int]], max_new_tokens: int, *,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           repetition_penalty: float = 1.0, min_p: float | None = None, seed: int | None = None,
           generator: torch.Generator | None = None, eot_id: int | Sequence[int] | None = None,
           stop_strings: Sequence[str] | None = None, tokenizer: Decoder | None = None,
           compile: bool = False, vocab_limit: int | None = None, _views: bool = False) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, ``(B,)`` int64 on the model's device, as it is produced.

    ``input_ids`` is a ``(B, T)`` tensor or a list of prompts (lists of ids) of any lengths.
    Sampling: see :func:`sample_logits`; ``repetition_penalty`` (> 0, 1 = off) penalizes every token
    of the row's prompt (padding excluded) and of its continuation so far, as HF's ``generate``
    and vLLM do; ``min_p`` (in [0, 1], None or 0 = off) is HF's min-p filter. Row ``i`` draws
    with seed ``seed + i``, so a row gives the same tokens alone (seeded ``seed + i``) or in any
    batch, on any device (for the same logits). ``generator`` (deprecated) seeds from a
    ``torch.Generator``; with neither, a seed is drawn from torch's global generator. A row is
    finished when it produces ``eot_id`` (one id, or a sequence of ids any of which finishes it: a
    model folder's ``eos_token_id`` list, as HF's ``generate`` takes) or when its text (one
    :class:`TextStream` per row, decoded with ``tokenizer``) completes one of ``stop_strings``;
    finished rows keep yielding ``eot_id`` (its first id; 0 when there is none) and the loop ends
    when every row is finished or after ``max_new_tokens`` steps. ``compile=True`` compiles the
    decode step (:func:`compiled_decode_step`; falls back to eager with a warning where that
    fails). ``vocab_limit`` (the tokenizer's ``vocab_size``): never draw an id >= it
    (:func:`limit_vocab`; :func:`stream_text` and :func:`sample_texts` set it from their
    tokenizer). Windows: see the module docstring. The model's KV cache is in use until the
    iterator ends or is closed: one generation per model at a time. (``_views``,
    for :func:`generate`: yield views of the step buffers, valid until the next generation on the model.)
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty=repetition_penalty,
                        min_p=min_p)
    check_vocab_limit(vocab_limit)
    stops = list(stop_strings or [])
    if stops and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer (anything with .decode(ids) -> str) to read the text")
    TextStream(tokenizer, stops)  # validates the stop strings at the call
    device = model.device
    V = model.config.vocab_size
    prompt, prompt_valid = _as_padded_batch(input_ids, V, device)
    eos = eos_ids(eot_id, V)
    seeds = row_seeds(base_seed(seed, generator), prompt.size(0), device)
    C = model.config.context_length
    if prompt.size(1) > C and max_new_tokens > 0:
        warnings.warn(f"the prompt has {prompt.size(1)} tokens, more than context_length {C}: using its last {C}",
                      stacklevel=3)
        prompt, prompt_valid = prompt[:, -C:], prompt_valid[:, -C:]
    texts = [TextStream(tokenizer, stops) for _ in range(prompt.size(0))] if stops else None
    # Everything above runs at the call; the loop below runs as the caller iterates.
    # No limit when it keeps every row: exactly the step (and compiled graph) without one.
    limit = vocab_limit if vocab_limit is not None and vocab_limit < V else None
    sampling = _Sampling(temperature, top_k, top_p, repetition_penalty, min_p, limit)
    return _steps(model, prompt, prompt_valid, max_new_tokens, sampling, seeds, eos, texts, compile, not _views)


def eos_ids(eot_id: int | Sequence[int] | None, vocab_size: int | None = None) -> tuple[int, ...]:
    """The ids that finish a row, from ``eot_id``: None (none), one id, or a sequence of ids (HF's
    ``eos_token_id``: an int or a list), duplicates dropped; each must be a token id of a model of
    ``vocab_size`` ids (when given)."""
    if eot_id is None:
        return ()
    try:
        try:
            items = [operator.index(eot_id)]  # one id (an int, a numpy or 0-d tensor integer)
        except TypeError:
            items = list(eot_id)  # type: ignore[arg-type]
        if isinstance(eot_id, bool) or any(isinstance(t, bool) for t in items):
            raise TypeError
        out = [operator.index(t) for t in items]
    except TypeError:
        raise ValueError(f"eot_id must be a token id or a sequence of token ids, got {eot_id!r}") from None
    for t in out:
        if vocab_size is not None and not 0 <= t < vocab_size:
            raise ValueError(f"eot_id {t} is not a token id of this model (vocab_size {vocab_size})")
    return tuple(dict.fromkeys(out))


class _Sampling:
    """One generation's sampling settings (numbers: the same for every row)."""

    def __init__(self, temperature: float, top_k: int | None, top_p: float | None,
                 repetition_penalty: float = 1.0, min_p: float | None = None,
                 vocab_limit: int | None = None) -> None:
        self.args = (temperature, top_k, top_p)
        self.repetition_penalty = float(repetition_penalty)
        self.min_p = float(min_p) if min_p else None  # 0: off, the same graph as without
        self.vocab_limit = vocab_limit

    def step_kwargs(self, bufs: _Buffers) -> dict[str, Any]:
        """The keyword arguments of :func:`generation_step` beyond ``self.args``: none when both
        settings are off, so the step (and its compiled graph) is exactly the one without them."""
        kwargs: dict[str, Any] = {}
        if bufs.penalty is not None:
            kwargs.update(penalty=bufs.penalty, repeat=bufs.repeat)
        if self.min_p is not None:
            kwargs["min_p"] = self.min_p
        if self.vocab_limit is not None:
            kwargs["vocab_limit"] = self.vocab_limit
        return kwargs

    def sample(self, logits: torch.Tensor, bufs: _Buffers, step: int) -> torch.Tensor:
        return sample_logits(logits, *self.args, seed=bufs.seeds, step=step, penalty=bufs.penalty, min_p=self.min_p,
                             vocab_limit=self.vocab_limit)


# The new-token buffer (int64, one row per sequence) is allocated for at most this many tokens up
# front and doubled when full (:meth:`_Buffers.make_room`): ``max_new_tokens=10**10`` (run until
# the end-of-text token) asked for an 80 GB buffer at once and died, while a long generation past
# the context (the sliding window) is legitimate. 2**20 tokens is 8 MiB per row, far beyond what
# any generation here reaches in practice, so a doubling (for a compiled step: one new graph, as
# the buffer's shape is static in it) happens only past a million tokens.
PREALLOCATED_NEW_TOKENS = 1 << 20


class _Buffers:
    """The device tensors a generation's decode step reads and updates, for ``B`` rows, a cache of
    ``max_len`` slots and up to ``capacity`` new tokens. The step (:func:`generation_step`) does
    all of a token's bookkeeping on them, so a compiled (CUDA-graph) step is one graph replay per
    token and nothing else. They are marked static (fixed addresses: a CUDA graph reads and
    writes them in place, and copies nothing in per replay); under CUDA graphs they and the KV
    caches are kept on the model for the next generation of the same shapes (see :func:`_steps`),
    since new addresses would make torch record the graph again."""

    def __init__(self, B: int, max_len: int, capacity: int, dtype: torch.dtype, device: torch.device,
                 n_eos: int = 1) -> None:
        self.key = (B, max_len, capacity, dtype, device, n_eos)
        self.limit = capacity  # the most new tokens; the buffer starts at most PREALLOCATED_NEW_TOKENS long
        self.out = torch.zeros(B, min(capacity, PREALLOCATED_NEW_TOKENS), dtype=torch.long, device=device)
        # Slot s of row b is visible (0) once written and not padding; else -inf.
        self.mask = torch.full((B, 1, 1, max_len), float("-inf"), dtype=dtype, device=device)
        self.pos = torch.zeros(B, 1, dtype=torch.long, device=device)  # position of the token fed next
        # [cache slot of the token fed next, index in ``out`` of the token drawn next]
        self.counters = torch.zeros(2, dtype=torch.long, device=device)
        self.seeds = torch.zeros(B, dtype=torch.long, device=device)
        self.done = torch.zeros(B, dtype=torch.bool, device=device)  # rows finished (eot / stop string)
        # The ids that finish a row (-1: none); the first one pads finished rows. Its length is
        # static in a compiled step (one graph per number of ids).
        self.eot = torch.full((n_eos,), -1, dtype=torch.long, device=device)
        self.finished = torch.zeros(1, dtype=torch.bool, device=device)  # every row done
        self.caches: list[Any] | None = None  # the KV caches, kept between generations (CUDA graphs)
        # Repetition penalty (made by ``use_penalty`` when a generation asks for one): the factor
        # of every token id per row ``(B, V)`` (1: not in the row yet) and the penalty ``(B, 1)``.
        self.penalty: torch.Tensor | None = None
        self.repeat: torch.Tensor | None = None
        for t in self.tensors():
            torch._dynamo.mark_static_address(t)

    def use_penalty(self, penalty: float, prompt: torch.Tensor, prompt_valid: torch.Tensor, vocab_size: int) -> None:
        """Set up the repetition-penalty factors: ``penalty`` for every id of each row's prompt
        (its valid, unpadded tokens), 1 elsewhere; ``penalty == 1``: none (``self.penalty`` None)."""
        if penalty == 1.0:
            self.penalty = self.repeat = None
            return
        B, device = prompt.size(0), prompt.device
        if self.penalty is None or self.penalty.shape != (B, vocab_size):
            self.penalty = torch.empty(B, vocab_size, device=device)
            self.repeat = torch.empty(B, 1, device=device)
            torch._dynamo.mark_static_address(self.penalty)
            torch._dynamo.mark_static_address(self.repeat)
        assert self.repeat is not None
        self.repeat.fill_(penalty)
        seen = torch.zeros(B, vocab_size, device=device).scatter_add_(1, prompt, prompt_valid.float())
        torch.where(seen > 0, self.repeat, torch.ones_like(self.repeat), out=self.penalty)

    def make_room(self, k: int) -> None:
        """Make ``out`` hold new token ``k``: when it is full, a new buffer twice as long (up to
        ``max_new_tokens``; see ``PREALLOCATED_NEW_TOKENS``) with the tokens so far. Views of the
        old one (:func:`generate`'s) keep their values: it is no longer written."""
        B, capacity = self.out.shape
        if k < capacity:
            return
        out = torch.zeros(B, min(2 * capacity, max(self.limit, k + 1)), dtype=torch.long, device=self.out.device)
        out[:, :capacity] = self.out
        self.out = out  # (the key stays: a later generation of these shapes reuses the grown buffer)
        torch._dynamo.mark_static_address(self.out)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The arguments of :func:`generation_step` after the model, in order."""
        return self.out, self.mask, self.pos, self.counters, self.seeds, self.done, self.eot, self.finished


def _record(out: torch.Tensor, step: torch.Tensor, done: torch.Tensor, eot: torch.Tensor, finished: torch.Tensor,
            token: torch.Tensor, penalty: torch.Tensor | None = None, repeat: torch.Tensor | None = None) -> None:
    """Store new token ``step`` ``(1,)`` of every row ``(B,)`` in ``out``: rows already finished get
    the (first) end-of-text id (0 without one), a row that drew one of the ids of ``eot`` ``(E,)``
    is finished, and
    ``finished`` says whether every row is. With a repetition penalty, the token's factor in
    ``penalty`` ``(B, V)`` becomes the row's ``repeat`` ``(B, 1)``."""
    token = torch.where(done, eot[:1].clamp(min=0), token)
    out.index_copy_(1, step, token[:, None])
    if penalty is not None:
        penalty.scatter_(1, token[:, None], repeat)
    done |= torch.isin(token, eot)
    torch.all(done, dim=0, keepdim=True, out=finished)  # (one op each: a CPU step's bookkeeping is per-op cost)


def generation_step(model: GPT, out: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, counters: torch.Tensor,
                    seeds: torch.Tensor, done: torch.Tensor, eot: torch.Tensor, finished: torch.Tensor,
                    length: int | None, temperature: float, top_k: int | None, top_p: float | None, *,
                    penalty: torch.Tensor | None = None, repeat: torch.Tensor | None = None,
                    min_p: float | None = None, vocab_limit: int | None = None) -> None:
    """One token of :func:`stream`'s loop, bookkeeping included, on the buffers of
    :class:`_Buffers`: feed the last new token at cache slot ``counters[0]`` and position ``pos``,
    draw the next one with :func:`decode_step` (sampling step ``counters[1]``), store it in
    ``out`` (:func:`_record`) and advance the slot, the positions and the step, all in place, so
    that compiled it is one graph (under CUDA graphs one replay) that reads nothing from the host
    and needs nothing done around it. ``length``: attend to the first ``length`` cache slots only
    (eager: the filled ones); None: all of them (one static shape for every step). ``penalty``,
    ``repeat``: the repetition-penalty buffers of :class:`_Buffers` (updated in place too);
    ``min_p``, ``vocab_limit``: see :func:`sample_logits`. On a CPU where the whole-step op
    applies, a greedy step without a repetition penalty is all of this in one op call
    (``GPT.fused_greedy_step``: the same results bit for bit, without ~20 eager ops)."""
    if penalty is None and not isinstance(temperature, torch.Tensor) and temperature < GREEDY_TEMPERATURE \
            and model.fused_greedy_step(out, mask, pos, counters, done, eot, finished, length, vocab_limit):
        return  # all of the below as one op call on a CPU (GPT.fused_greedy_step)
    slot, step = counters[0:1], counters[1:2]
    mask.index_fill_(3, slot, 0.0)  # the slot written now becomes visible
    token = out.index_select(1, step - 1)  # (B, 1): the newest token
    visible = mask if length is None else mask[..., :length]
    nxt, _ = decode_step(model, token, slot, visible, pos, temperature, top_k, top_p, seeds,
                         step, penalty=penalty, min_p=min_p, vocab_limit=vocab_limit)  # (step (1,): every row's)
    _record(out, step, done, eot, finished, nxt, penalty, repeat)
    pos.add_(1)
    counters.add_(1)


class _Window:
    """The tokens so far (the left-padded prompt and the new tokens in ``bufs.out``) and the cache
    window over them, for :func:`_steps`. All rows of a generation sit at the same cache slot;
    the attention mask is one additive float buffer in the model's dtype, updated in place."""

    def __init__(self, model: GPT, prompt: torch.Tensor, prompt_valid: torch.Tensor, bufs: _Buffers,
                 seeds: torch.Tensor, eos: tuple[int, ...], repetition_penalty: float = 1.0) -> None:
        self.model, self.bufs = model, bufs
        self.prompt, self.prompt_valid = prompt, prompt_valid
        self.P = prompt.size(1)
        self.k = 0  # new tokens so far
        self.start = 0  # the window is tokens[:, start:n] of prompt + new tokens; its slots are 0 .. n-start-1
        bufs.seeds.copy_(seeds)
        bufs.done.zero_()
        bufs.eot.fill_(-1)
        for i, t in enumerate(eos):  # fills: a copy from host memory would sync the device
            bufs.eot[i].fill_(t)
        bufs.use_penalty(repetition_penalty, prompt, prompt_valid, model.config.vocab_size)

    @property
    def n(self) -> int:
        """Tokens so far, prompt included."""
        return self.P + self.k

    def latest(self) -> torch.Tensor:
        """The newest token of every row ``(B,)`` (a view of the buffer)."""
        return self.bufs.out[:, self.k - 1]

    def fill(self, start: int) -> torch.Tensor:
        """Prefill tokens[:, start:n] into slots 0..; return the last logits ``(B, V)``."""
        b = self.bufs
        self.start = start
        T = self.n - start
        ids, valid = self.prompt, self.prompt_valid
        if self.k:
            ids = torch.cat([ids, b.out[:, :self.k]], dim=1)
            valid = torch.cat([valid, torch.ones_like(b.out[:, :self.k], dtype=torch.bool)], dim=1)
        ids, window_valid = ids[:, start:], valid[:, start:]
        mask = self.model.causal_mask[:T, :T] & window_valid[:, None, None, :]  # (B, 1, T, T)
        # A padding query attends to itself only; an all-masked row would make SDPA return NaN.
        diag = torch.arange(T, device=mask.device)
        mask[:, 0, diag, diag] = True
        b.mask.fill_(float("-inf"))
        b.mask[:, 0, 0, :T].masked_fill_(window_valid, 0.0)
        position_ids = (window_valid.long().cumsum(dim=1) - 1).clamp(min=0)
        b.pos.copy_(position_ids[:, -1:] + 1)
        return prefill(self.model, ids, diag, mask, position_ids)

    def refill(self, start: int, sampling: _Sampling) -> None:
        """Prefill the window from ``start``, draw the next token from its last logits and store it."""
        self.bufs.make_room(self.k)
        token = sampling.sample(self.fill(start), self.bufs, self.k)
        b = self.bufs
        b.counters[0].fill_(self.n - start)  # (fills: a copy from host memory would sync the device)
        b.counters[1].fill_(self.k)
        _record(b.out, b.counters[1:2], b.done, b.eot, b.finished, token, b.penalty, b.repeat)
        b.counters[1:2].add_(1)
        self.k += 1

    def decode(self, step_fn: Callable[..., Any], sampling: _Sampling, compiled: bool) -> None:
        """Feed the newest token of every row and draw and store the next one."""
        self.bufs.make_room(self.k)
        if compiled:  # the full, static-shape mask: one graph serves every step
            torch.compiler.cudagraph_mark_step_begin()
            step_fn(self.model, *self.bufs.tensors(), None, *sampling.args, **sampling.step_kwargs(self.bufs))
        else:  # attend to the filled slots only (O(filled) per token)
            step_fn(self.model, *self.bufs.tensors(), self.n - self.start, *sampling.args,
                    **sampling.step_kwargs(self.bufs))
        self.k += 1


# Device types where a generation that stops at eot reads "every row is done" one step late
# (:class:`_LateFlag`): devices that run asynchronously to the host.
READ_DONE_LATE_ON = ("cuda",)


class _LateFlag:
    """A boolean device flag (``bufs.finished``) read one step late without stalling the device:
    after each step an asynchronous copy into pinned host memory; after the next step is launched
    the host waits for that copy only, while the device runs the new step. Read at once and
    synchronously, the flag would leave the device idle while the host launches each next step.
    (The cost: one step run after every row finished; its token is not yielded.)"""

    def __init__(self, flag: torch.Tensor) -> None:
        self.flag = flag
        cuda = flag.device.type == "cuda"
        self.host = torch.zeros(2, dtype=torch.bool, pin_memory=cuda)
        self.events = [torch.cuda.Event(), torch.cuda.Event()] if cuda else None
        self.copies = 0

    def copy(self) -> None:
        """Copy the flag as the step just launched will leave it."""
        i = self.copies % 2
        self.host[i:i + 1].copy_(self.flag, non_blocking=True)
        if self.events is not None:
            self.events[i].record()
        self.copies += 1

    def previous(self) -> bool:
        """The flag as the step before the last one left it."""
        i = self.copies % 2  # the copy before the last one
        if self.events is not None:
            self.events[i].synchronize()
        return bool(self.host[i])


# Device types whose compiled steps read their buffers at fixed addresses (CUDA graphs): there
# :func:`_steps` keeps the step buffers and KV caches on the model for the next generation.
KEEP_STEP_BUFFERS_ON = ("cuda",)


def _buffers(model: GPT, B: int, max_len: int, capacity: int, kept: bool, n_eos: int = 1) -> _Buffers:
    """The step buffers of a generation: those kept on ``model`` by the last one when ``kept`` and
    the shapes match (CUDA graphs: same addresses, no new recording), else new ones."""
    key = (B, max_len, capacity, model.dtype, model.device, n_eos)
    last = model.__dict__.pop("_decode_buffers", None)
    if kept and last is not None and last.key == key:
        return last
    return _Buffers(B, max_len, capacity, model.dtype, model.device, n_eos)


@torch.no_grad()
def _steps(model: GPT, prompt: torch.Tensor, prompt_valid: torch.Tensor, max_new_tokens: int, sampling: _Sampling,
           seeds: torch.Tensor, eos: tuple[int, ...], texts: list[TextStream] | None, compile: bool,
           copy: bool = True) -> Iterator[torch.Tensor]:
    """The generation loop of :func:`stream` on a validated, left-padded prompt. Each step is one
    call of :func:`generation_step` (compiled: one graph); the host reads the device only to stop
    at one of the ids ``eos`` or a stop string. ``copy=False``: yield views of the step buffers (valid until
    the next generation on ``model``; :func:`generate` stacks them at the end)."""
    if max_new_tokens == 0:
        return
    C = model.config.context_length
    B, P = prompt.shape
    max_len = min(C, P + max_new_tokens - 1)  # the last sampled token is never fed back
    check_done = bool(eos) or texts is not None
    step_fn = step_for(model, compile, generation_step, rows=B)
    # Under CUDA graphs the buffers and KV caches stay on the model for the next generation of
    # these shapes; the new-token buffer is rounded up to a power of two so that nearby lengths
    # share one graph.
    kept = step_fn is not generation_step and model.device.type in KEEP_STEP_BUFFERS_ON
    capacity = 1 << (max_new_tokens - 1).bit_length() if kept else max_new_tokens
    bufs = _buffers(model, B, max_len, capacity, kept, max(1, len(eos)))
    window = _Window(model, prompt, prompt_valid, bufs, seeds, eos, sampling.repetition_penalty)
    # Stopping at eot on an asynchronous device (no stop strings: their check needs every token's
    # value at once): whether every row is done is read one step late, so the device is never idle.
    late = _LateFlag(bufs.finished) if eos and texts is None and \
        model.device.type in READ_DONE_LATE_ON else None
    check_inputs = model.check_inputs
    model.setup_cache(B, max_len, caches=bufs.caches)
    if step_fn is not generation_step:
        _cudagraph_thread_state()  # per thread, so once per generation
    try:
        model.check_inputs = False  # ids were range-checked above; the per-step check syncs the device
        for step in range(max_new_tokens):
            if step == 0:
                window.refill(0, sampling)
            elif window.n - window.start > C:  # the window would outgrow the context: slide it (module docstring)
                window.refill(window.n - max(1, C // 2), sampling)
            else:
                step_fn = _decode_or_fall_back(window, step_fn, sampling)
            if late is not None:
                late.copy()
                if step and late.previous():  # every row had finished: this step was not needed
                    break
            token = window.latest()
            if texts is not None:
                _mark_stopped(bufs.done, token, texts)
            yield token.clone() if copy and kept else token
            # (_mark_stopped updates done, not finished)
            if check_done and late is None and bool(bufs.finished if texts is None else bufs.done.all()):
                break
    finally:
        bufs.caches = [block.attn.kv_cache for block in model.transformer.h] if kept else None
        model.clear_cache()
        model.check_inputs = check_inputs
        if kept:
            model._decode_buffers = bufs  # freed by model.clear_cache()


def _decode_or_fall_back(window: _Window, step_fn: Callable[..., Any], sampling: _Sampling) -> Callable[..., Any]:
    """One decode step; a compiled step that fails falls back to eager (always correct) for good."""
    if step_fn is generation_step:
        window.decode(step_fn, sampling, compiled=False)
        return step_fn
    try:
        window.decode(step_fn, sampling, compiled=True)
        return step_fn
    except Exception as e:  # noqa: BLE001 - any compiler failure
        note_compile_failure(window.model, e)
        # A compilation fails before the step runs: nothing has advanced.
        window.decode(generation_step, sampling, compiled=False)
        return generation_step


def _mark_stopped(done: torch.Tensor, token: torch.Tensor, texts: list[TextStream]) -> None:
    """Mark rows whose text (one :class:`TextStream` per row) just completed a stop string."""
    for b, (t, finished) in enumerate(zip(token.tolist(), done.tolist(), strict=True)):
        if not finished:
            texts[b].push(t)
            if texts[b].stopped:
                done[b] = True


# HF ``generate`` arguments a user may carry over, and what does their job here.
_HF_ARGUMENTS = {
    "do_sample": "temperature=0 is greedy (do_sample=False); any temperature > 0 samples",
    "eos_token_id": "eot_id= (an id or a list of ids)",
    "pad_token_id": "nothing: finished rows are padded with eot_id (its first id)",
    "attention_mask": "pass prompts of different lengths as a list of lists of ids (left-padded with a mask "
                      "for you); a (B, T) tensor is taken as it is",
    "num_return_sequences": "repeat the prompt in the batch (row i draws with seed + i)",
    "max_length": "max_new_tokens (new tokens, the prompt not counted)",
    "num_beams": "nothing (no beam search); temperature=0 is greedy",
}


def check_hf_arguments(kwargs: dict[str, Any], where: str = "generate") -> None:
    """A ``TypeError`` naming the equivalent for HF ``generate`` arguments that this API spells
    otherwise (was Python's bare "got an unexpected keyword argument 'do_sample'")."""
    for name in kwargs:
        if name in _HF_ARGUMENTS:
            raise TypeError(f"{where}() has no argument {name!r} (HF generate's); here: {_HF_ARGUMENTS[name]}")


@torch.no_grad()
def generate(model: GPT, input_ids: torch.Tensor | Sequence[Sequence[int]], max_new_tokens: int,
             **kwargs: Any) -> torch.Tensor | list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens and return prompt + continuation.

    For a ``(B, T)`` tensor the result is a ``(B, T + n)`` tensor, ``n <= max_new_tokens`` (fewer
    when every row stopped early; rows that stopped earlier are padded with ``eot_id``, its first
    id for a sequence). For a list of prompts it is a list of lists, each row ending at its stop
    token (one of ``eot_id``, included, as HF does). Keyword arguments are those of :func:`stream`
    (``temperature=0`` is greedy).
    """
    check_hf_arguments(kwargs)
    new = list(stream(model, input_ids, max_new_tokens, _views=True, **kwargs))  # stacked below: no copy per token
    is_tensor = isinstance(input_ids, torch.Tensor)
    if is_tensor:
        prompt = input_ids.to(device=model.device, dtype=torch.long)
        return torch.cat([prompt, torch.stack(new, dim=1)], dim=1) if new else prompt
    eos = set(eos_ids(kwargs.get("eot_id")))
    stops = kwargs.get("stop_strings") or []
    tokenizer = kwargs.get("tokenizer")
    cont = torch.stack(new, dim=1).tolist() if new else [[] for _ in input_ids]
    out = []
    for prompt_row, row in zip(input_ids, cont, strict=True):
        end = len(row)
        end = next((i + 1 for i, t in enumerate(row) if t in eos), end)
        if stops:
            end = min(end, _stop_end(row[:end], TextStream(tokenizer, stops)))
        out.append([int(t) for t in prompt_row] + row[:end])
    return out


def _stop_end(row: list[int], text: TextStream) -> int:
    """Number of tokens up to and including the one whose text completes a stop string."""
    for i, t in enumerate(row):
        text.push(t)
        if text.stopped:
            return i + 1
    return len(row)


# --- text ------------------------------------------------------------------------------------------
def stream_text(model: GPT, tokenizer: Any, prompt: str | Sequence[int], max_new_tokens: int, *,
                stop_strings: Sequence[str] | None = None, **kwargs: Any) -> Iterator[str]:
    """Generate from one prompt and yield the continuation as text pieces as they become final.

    A piece is held back while it may still change (see :class:`TextStream`): bytes of an
    incomplete UTF-8 character and a tail that could be the start of a stop string. Generation
    stops at the tokenizer's end-of-text token or another id of ``eot_id`` (not yielded) or at a
    stop string (the text before it is yielded, the stop string is not). Other keyword arguments
    are those of :func:`stream`.
    """
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("empty prompt: give some text (or the end-of-text token's ids)")
        prompt_ids = prompt_ids_for(tokenizer, prompt)[1]  # "<|endoftext|>" in it is the token, as the CLI reads it
    else:
        prompt_ids = [int(t) for t in prompt]
    text = TextStream(tokenizer, [s for s in (stop_strings or []) if s])
    kwargs.setdefault("eot_id", getattr(tokenizer, "eot", None))
    kwargs.setdefault("vocab_limit", getattr(tokenizer, "vocab_size", None))  # only ids it can decode
    eos = set(eos_ids(kwargs["eot_id"]))
    for token in stream(model, [prompt_ids], max_new_tokens, **kwargs):
        t = int(token[0])
        if t in eos:
            break
        piece = text.push(t)
        if piece:
            yield piece
        if text.stopped:
            return
    piece = text.flush()
    if piece:
        yield piece


def prompt_ids_for(tokenizer: Any, prompt: str | None) -> tuple[str, list[int]]:
    """``(prompt text, ids)`` for sampling: ``None`` means the end-of-text token where the
    tokenizer has one (the text is then ``""``), else a newline. "<|endoftext|>" written in the
    prompt is the end-of-text token, as nanoGPT's sample.py and HF's tokenizer read a prompt."""
    if prompt is not None:
        ids = encode_as_hf(tokenizer, prompt)
        if not ids:
            raise ValueError("the prompt is empty; give some text, or leave the prompt out for the default")
        return prompt, ids
    if tokenizer.eot is not None:
        return "", [tokenizer.eot]
    return "\n", tokenizer.encode("\n")


def sample_texts(model: GPT, tokenizer: Any, prompt_ids: Sequence[int], num_samples: int, max_new_tokens: int, *,
                 stop_strings: Sequence[str] = (), **kwargs: Any) -> list[str]:
    """``num_samples`` finished continuations of one prompt, generated as one batch (what
    ``gpt2 sample`` prints after the prompt): each ends before the end-of-text token or before
    its first stop string (or another id of ``eot_id``). Other keyword arguments are those of
    :func:`stream`."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    stops = [s for s in stop_strings if s]
    kwargs.setdefault("eot_id", getattr(tokenizer, "eot", None))
    kwargs.setdefault("vocab_limit", getattr(tokenizer, "vocab_size", None))  # only ids it can decode
    eos = set(eos_ids(kwargs["eot_id"]))
    rows = generate(model, [list(prompt_ids)] * num_samples, max_new_tokens, stop_strings=stops,
                    tokenizer=tokenizer, **kwargs)
    texts = []
    for row in rows:
        text = TextStream(tokenizer, stops)
        new = row[len(prompt_ids):]
        parts = [text.push(t) for t in new if t not in eos]
        texts.append("".join(parts) + text.flush())
    return texts
