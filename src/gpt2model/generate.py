"""Generation: a static KV cache, ``prefill`` + ``decode_one_token`` (gpt-fast's design), sampling.

The loop in :func:`stream` is the only generation loop; :func:`generate` collects it and
:func:`stream_text` turns it into text. Each step feeds one token against the preallocated cache,
so a token costs O(context), not O(context²) as re-running the whole window would.

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

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch.nn import functional as F

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
    """

    def __init__(self, tokenizer: Decoder, stop_strings: Sequence[str] = ()) -> None:
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        stops = list(stop_strings or ())
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop strings must be non-empty strings, got {stops!r}")
        self.tokenizer = tokenizer
        self.stop_strings = stops
        self.stopped = False
        self._pending: list[int] = []  # tokens whose text may still be an incomplete character
        self._held = ""  # decoded text not yet released: a possible start of a stop string

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became final (possibly ``""``)."""
        if self.stopped:
            return ""
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

    def flush(self) -> str:
        """The text still held back, at the end of generation (``""`` once stopped)."""
        if self.stopped:
            return ""
        piece = self.tokenizer.decode(self._pending) if self._pending else ""
        self._pending = []
        return self._release(piece, final=True)

    def _find_stop(self, text: str) -> int:
        return min((i for i in (text.find(s) for s in self.stop_strings) if i >= 0), default=-1)

    def _release(self, piece: str, final: bool) -> str:
        text = self._held + piece
        cut = self._find_stop(text) if self.stop_strings else -1
        if cut >= 0:
            self.stopped = True
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
def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token id per row from ``logits`` ``(B, vocab)``; returns ``(B,)`` int64.

    ``temperature == 0`` is greedy (argmax; ``top_k``/``top_p`` are then irrelevant). Otherwise
    the logits are divided by ``temperature``, ``top_k`` keeps the k largest logits (all tokens
    tied with the k-th stay), and ``top_p`` (nucleus) keeps the smallest set of most likely tokens
    whose total probability reaches ``top_p`` (always at least the most likely one). Everything is
    done in fp32 whatever the model's dtype, and ``generator`` makes the draw reproducible.
    """
    logits = logits.float()  # bf16 has too few mantissa bits for a faithful softmax/cumsum
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # A token is dropped when the tokens before it already reach top_p. The small slack makes
        # sums that equal top_p up to fp32 rounding (0.5 + 0.3 vs 0.8) count as reaching it.
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = before >= top_p - 1e-6
        drop_sorted[:, 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        probs = probs.masked_fill(drop, 0.0)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise a ``ValueError`` naming the fix for any out-of-range sampling setting."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0 \
            or math.isinf(temperature):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None for no top-k filter), got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] (or None for no nucleus filter), got {top_p!r}")


# --- the two forwards --------------------------------------------------------------------------------
def prefill(model: GPT, input_ids: torch.Tensor, input_pos: torch.Tensor, mask: torch.Tensor,
            position_ids: torch.Tensor) -> torch.Tensor:
    """Run a whole window ``(B, T)`` into cache slots ``input_pos`` and return the last logits ``(B, V)``."""
    return model(input_ids, input_pos=input_pos, mask=mask, position_ids=position_ids)[:, -1]


def decode_one_token(model: GPT, token: torch.Tensor, input_pos: torch.Tensor, mask: torch.Tensor,
                     position_ids: torch.Tensor) -> torch.Tensor:
    """Feed one token per row ``(B, 1)`` into cache slot ``input_pos`` ``(1,)``; return logits ``(B, V)``."""
    return model(token, input_pos=input_pos, mask=mask, position_ids=position_ids)[:, -1]


def _decode_fn(compile: bool) -> Callable[..., torch.Tensor]:
    """The decode step, compiled when asked. ``torch.compile`` keeps its graphs on the function's
    code object, so wrapping it again per call reuses them (no module-level state needed)."""
    if not compile:
        return decode_one_token
    # Static cache => static shapes: one graph serves every step (input_pos is a tensor).
    return torch.compile(decode_one_token, dynamic=False)


# --- input handling ----------------------------------------------------------------------------------
def _as_padded_batch(input_ids: torch.Tensor | Sequence[Sequence[int]],
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(ids (B, P), valid (B, P) bool, ragged)``: a list of prompts is left-padded with 0s."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2:
            hint = " (for one prompt use ids[None])" if input_ids.dim() == 1 else ""
            raise ValueError(f"input_ids must be a (batch, seq_len) tensor or a list of id lists, got shape "
                             f"{tuple(input_ids.shape)}{hint}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.size(1) == 0 or input_ids.size(0) == 0:
            raise ValueError("empty prompt: give at least one token per row (e.g. the tokenizer's eot id)")
        ids = input_ids.to(device=device, dtype=torch.long)
        return ids, torch.ones_like(ids, dtype=torch.bool), False
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
    return ids.to(device), valid.to(device), True


def _check_id_range(ids: torch.Tensor, vocab_size: int) -> None:
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token id {lo if lo < 0 else hi} is out of range: ids must be in [0, {vocab_size}) "
                         f"for this model's vocab_size {vocab_size}")


def _make_generator(seed: int | None, generator: torch.Generator | None,
                    device: torch.device) -> torch.Generator | None:
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is None:
        return generator
    return torch.Generator(device=device).manual_seed(int(seed))


# --- the loop ------------------------------------------------------------------------------------
def stream(model: GPT, input_ids: torch.Tensor | Sequence[Sequence[int]], max_new_tokens: int, *,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           seed: int | None = None, generator: torch.Generator | None = None, eot_id: int | None = None,
           stop_strings: Sequence[str] | None = None, tokenizer: Decoder | None = None,
           compile: bool = False) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, ``(B,)`` int64 on the model's device, as it is produced.

    ``input_ids`` is a ``(B, T)`` tensor or a list of prompts (lists of ids) of any lengths.
    Sampling: see :func:`sample_logits`; ``seed`` (or a ``torch.Generator``) makes it
    reproducible. A row is finished when it produces ``eot_id`` or when its generated text
    (decoded with ``tokenizer``) contains one of ``stop_strings``; finished rows keep yielding
    ``eot_id`` (0 when there is none) and the loop ends when every row is finished or after
    ``max_new_tokens`` steps. ``compile=True`` compiles the decode step with ``torch.compile``
    (falls back to eager with a warning where that fails). Windows: see the module docstring.
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    stops = list(stop_strings or [])
    if stops and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer (anything with .decode(ids) -> str) to read the text")
    TextStream(tokenizer, stops)  # validates the stop strings at the call
    device = model.device
    prompt, prompt_valid, _ = _as_padded_batch(input_ids, device)
    _check_id_range(prompt, model.config.vocab_size)
    if eot_id is not None and not 0 <= eot_id < model.config.vocab_size:
        raise ValueError(f"eot_id {eot_id} is not a token id of this model (vocab_size {model.config.vocab_size})")
    gen = _make_generator(seed, generator, device)
    C = model.config.context_length
    if prompt.size(1) > C and max_new_tokens > 0:
        warnings.warn(f"the prompt has {prompt.size(1)} tokens, more than context_length {C}: using its last {C}",
                      stacklevel=3)
        prompt, prompt_valid = prompt[:, -C:], prompt_valid[:, -C:]
    texts = [TextStream(tokenizer, stops) for _ in range(prompt.size(0))] if stops else None
    # Everything above runs at the call; the loop below runs as the caller iterates.
    return _steps(model, prompt, prompt_valid, max_new_tokens,
                  lambda logits: sample_logits(logits, temperature, top_k, top_p, gen), eot_id, texts, compile)


class _Window:
    """The tokens fed so far (left-padded rows) and the cache window over them, for :func:`_steps`."""

    def __init__(self, model: GPT, prompt: torch.Tensor, prompt_valid: torch.Tensor, max_new_tokens: int) -> None:
        B, P = prompt.shape
        total = P + max_new_tokens
        self.model = model
        self.tokens = torch.zeros(B, total, dtype=torch.long, device=prompt.device)  # every token, padded
        self.tokens[:, :P] = prompt
        self.valid = torch.ones(B, total, dtype=torch.bool, device=prompt.device)
        self.valid[:, :P] = prompt_valid
        self.max_len = min(model.config.context_length, total - 1)  # the last sampled token is never fed back
        # Running decode mask over all cache slots: slot s becomes visible when it is written.
        self.attn_mask = torch.zeros(B, 1, 1, self.max_len, dtype=torch.bool, device=prompt.device)
        self.start, self.n = 0, P  # the window is tokens[:, start:n]; its slots are 0 .. n-start-1
        self.next_pos = torch.zeros(B, 1, dtype=torch.long, device=prompt.device)
        self.slot = torch.zeros(1, dtype=torch.long, device=prompt.device)

    def fill(self, start: int) -> torch.Tensor:
        """Prefill tokens[:, start:n] into slots 0..; return the last logits ``(B, V)``."""
        self.start = start
        T = self.n - start
        window_valid = self.valid[:, start:self.n]
        self.attn_mask.zero_()
        self.attn_mask[:, 0, 0, :T] = window_valid
        mask = self.model.causal_mask[:T, :T] & self.attn_mask[..., :T]  # (B, 1, T, T): only the window's slots
        # A padding query attends to itself only; an all-masked row would make SDPA return NaN.
        diag = torch.arange(T, device=mask.device)
        mask[:, 0, diag, diag] = True
        position_ids = (window_valid.long().cumsum(dim=1) - 1).clamp(min=0)
        self.next_pos = position_ids[:, -1:] + 1
        return prefill(self.model, self.tokens[:, start:self.n], diag, mask, position_ids)

    def append(self, token: torch.Tensor) -> None:
        self.tokens[:, self.n] = token
        self.n += 1

    def decode(self, decode: Callable[..., torch.Tensor], token: torch.Tensor, full_mask: bool) -> torch.Tensor:
        """Feed the newest token of every row; return the next logits ``(B, V)``."""
        self.slot.fill_(self.n - 1 - self.start)
        self.attn_mask.index_fill_(3, self.slot, True)
        # Eager: attend to the filled slots only (O(filled) per token). Compiled: the full,
        # static-shape mask, so one graph serves every step.
        step_mask = self.attn_mask if full_mask else self.attn_mask[..., : self.n - self.start]
        logits = decode(self.model, token[:, None], self.slot, step_mask, self.next_pos)
        self.next_pos = self.next_pos + 1
        return logits


@torch.no_grad()
def _steps(model: GPT, prompt: torch.Tensor, prompt_valid: torch.Tensor, max_new_tokens: int,
           sample: Callable[[torch.Tensor], torch.Tensor], eot_id: int | None, texts: list[TextStream] | None,
           compile: bool) -> Iterator[torch.Tensor]:
    """The generation loop of :func:`stream` on a validated, left-padded prompt."""
    if max_new_tokens == 0:
        return
    B = prompt.size(0)
    C = model.config.context_length
    pad_id = eot_id if eot_id is not None else 0
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    check_done = eot_id is not None or texts is not None
    window = _Window(model, prompt, prompt_valid, max_new_tokens)
    decode = _decode_fn(compile)
    check_inputs = model.check_inputs
    model.setup_cache(B, window.max_len)
    try:
        model.check_inputs = False  # ids were range-checked above; the per-step check syncs the device
        logits = window.fill(0)
        for step in range(max_new_tokens):
            token = sample(logits)
            if check_done:
                token = torch.where(done, torch.full_like(token, pad_id), token)
            window.append(token)
            if check_done:
                if eot_id is not None:
                    done |= token == eot_id
                if texts is not None:
                    _mark_stopped(done, token, texts)
            yield token
            if step == max_new_tokens - 1 or (check_done and bool(done.all())):
                break
            if window.n - window.start > C:  # the window would outgrow the context: slide it (module docstring)
                logits = window.fill(window.n - max(1, C // 2))
                continue
            try:
                logits = window.decode(decode, token, full_mask=decode is not decode_one_token)
            except Exception as e:  # noqa: BLE001 - any compiler failure: eager is always correct
                if decode is decode_one_token:
                    raise
                warnings.warn(f"torch.compile of the decode step failed ({type(e).__name__}: "
                              f"{str(e)[:200]}); decoding eagerly instead", stacklevel=2)
                decode = decode_one_token  # rewriting the same cache slot again is harmless
                logits = window.decode(decode, token, full_mask=True)
    finally:
        model.clear_cache()
        model.check_inputs = check_inputs


def _mark_stopped(done: torch.Tensor, token: torch.Tensor, texts: list[TextStream]) -> None:
    """Mark rows whose text (one :class:`TextStream` per row) just completed a stop string."""
    for b, t in enumerate(token.tolist()):
        if not done[b]:
            texts[b].push(t)
            if texts[b].stopped:
                done[b] = True


@torch.no_grad()
def generate(model: GPT, input_ids: torch.Tensor | Sequence[Sequence[int]], max_new_tokens: int,
             **kwargs: Any) -> torch.Tensor | list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens and return prompt + continuation.

    For a ``(B, T)`` tensor the result is a ``(B, T + n)`` tensor, ``n <= max_new_tokens`` (fewer
    when every row stopped early; rows that stopped earlier are padded with ``eot_id``). For a list
    of prompts it is a list of lists, each row ending at its stop token (``eot_id`` included, as
    HF does). Keyword arguments are those of :func:`stream` (``temperature=0`` is greedy).
    """
    new = list(stream(model, input_ids, max_new_tokens, **kwargs))
    is_tensor = isinstance(input_ids, torch.Tensor)
    if is_tensor:
        prompt = input_ids.to(device=model.device, dtype=torch.long)
        return torch.cat([prompt, torch.stack(new, dim=1)], dim=1) if new else prompt
    eot_id = kwargs.get("eot_id")
    stops = kwargs.get("stop_strings") or []
    tokenizer = kwargs.get("tokenizer")
    cont = torch.stack(new, dim=1).tolist() if new else [[] for _ in input_ids]
    out = []
    for prompt_row, row in zip(input_ids, cont, strict=True):
        end = len(row)
        if eot_id is not None and eot_id in row:
            end = row.index(eot_id) + 1
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
    stops at the tokenizer's end-of-text token (not yielded) or at a stop string (the text before
    it is yielded, the stop string is not). Other keyword arguments are those of :func:`stream`.
    """
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("empty prompt: give some text (or the end-of-text token's ids)")
        prompt_ids = tokenizer.encode(prompt)
    else:
        prompt_ids = [int(t) for t in prompt]
    text = TextStream(tokenizer, [s for s in (stop_strings or []) if s])
    kwargs.setdefault("eot_id", getattr(tokenizer, "eot", None))
    eot_id = kwargs["eot_id"]
    for token in stream(model, [prompt_ids], max_new_tokens, **kwargs):
        t = int(token[0])
        if t == eot_id:
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
    tokenizer has one (the text is then ``""``), else a newline."""
    if prompt is not None:
        ids = tokenizer.encode(prompt)
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
    its first stop string. Other keyword arguments are those of :func:`stream`."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    stops = [s for s in stop_strings if s]
    kwargs.setdefault("eot_id", getattr(tokenizer, "eot", None))
    eot_id = kwargs["eot_id"]
    rows = generate(model, [list(prompt_ids)] * num_samples, max_new_tokens, stop_strings=stops,
                    tokenizer=tokenizer, **kwargs)
    texts = []
    for row in rows:
        text = TextStream(tokenizer, stops)
        new = row[len(prompt_ids):]
        parts = [text.push(t) for t in new if t != eot_id]
        texts.append("".join(parts) + text.flush())
    return texts
