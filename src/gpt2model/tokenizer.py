"""Tokenizers: text <-> token ids, one small interface, three implementations.

Every tokenizer has ``name``, ``vocab_size``, ``eot`` (the end-of-text id, or ``None``),
``encode(text) -> list[int]``, ``decode(ids) -> str``, ``encode_batch(texts) -> list[np.ndarray]``
(all cores, uint32 arrays: used by ``gpt2 prepare``), ``spec() -> dict`` and ``save(directory)``.
:func:`load_tokenizer` reads back whatever ``save`` wrote.

- :class:`CharTokenizer`: one id per character, ids = the sorted unique characters of a corpus
  (nanoGPT's ``shakespeare_char``). No end-of-text token.
- :class:`GPT2Tokenizer`: OpenAI's 50,257-token byte-level BPE through tiktoken, built offline from
  ``encoder.json`` + ``vocab.bpe``; id-for-id identical to ``tiktoken.get_encoding("gpt2")``.
- :class:`BPETokenizer`: a new byte-level BPE of any vocabulary size trained on your corpus with HF
  ``tokenizers`` (GPT-2's pre-tokenizer and byte alphabet, so every string round-trips exactly).

``<|endoftext|>`` in user text: ``encode`` treats the literal string as ordinary text (tiktoken's
``disallowed_special=()``), so text can never inject the special token; document boundaries get the
``eot`` id appended explicitly by the caller (``gpt2 prepare`` does this between files).
``encode(text, allowed_special="all")`` (or ``{"<|endoftext|>"}``) reads it as the ``eot`` id instead,
as tiktoken's argument of that name does; ``"all"`` covers every token of ``special_tokens`` (a HF
``tokenizer.json``'s special added tokens too, e.g. a fine-tune's ``<|im_start|>``).
``decode`` turns the ``eot`` id back into the string ``"<|endoftext|>"``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence, Set
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .fileio import atomic_path, atomic_write_json

SPEC_FILE = "tokenizer_spec.json"
EOT_TEXT = "<|endoftext|>"
# GPT-2's pre-tokenizer regex, as tiktoken writes it (tiktoken_ext/openai_public.py).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_VOCAB_SIZE = 50257  # OpenAI's GPT-2 BPE: 50,000 merges + 256 bytes + <|endoftext|>
GPT2_VOCAB_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_MERGES_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"


def _num_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


@runtime_checkable
class Tokenizer(Protocol):
    """What every tokenizer provides (see the module docstring)."""

    name: str
    vocab_size: int
    eot: int | None
    special_tokens: dict[str, int]  # special-token text -> id: <|endoftext|>, a fine-tune's added ones

    def encode(self, text: str, *, allowed_special: Set[str] | str = frozenset()) -> list[int]:
        """Text -> token ids. Special-token text such as ``<|endoftext|>`` is ordinary text unless
        named in ``allowed_special`` (or ``"all"``), as tiktoken's argument of that name."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text (a slice ending inside a multi-byte character gives U+FFFD there)."""
        ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """``encode`` of many texts, on all cores where the tokenizer can, as integer arrays."""
        ...

    def token_bytes(self, token: int) -> bytes:
        """The UTF-8 bytes one token stands for: part of a character for some byte-level BPE tokens,
        whose ``decode([token])`` is then U+FFFD (OpenAI's chat logprobs report these bytes)."""
        ...

    def spec(self) -> dict[str, Any]:
        """What ``tokenizer_spec.json`` stores to rebuild this tokenizer (``load_tokenizer``)."""
        ...

    def save(self, directory: str | Path) -> None:
        """Write the tokenizer's files into ``directory`` (created if needed)."""
        ...


def _write_spec(directory: str | Path, spec: dict[str, Any]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(directory / SPEC_FILE, {"format_version": 1, **spec})
    return directory


# tokenizer_config.json's class for a char tokenizer's tokenizer.json (the generic fast tokenizer).
CHAR_HF_CLASS = "PreTrainedTokenizerFast"


def _drop_char_hf_class(directory: Path) -> None:
    """Saving another tokenizer over a char tokenizer's folder: the tokenizer_config.json class that
    CharTokenizer wrote would make transformers read the folder's BPE with the generic class."""
    config = directory / "tokenizer_config.json"
    try:
        old = json.loads(config.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return
    if isinstance(old, dict) and old.get("tokenizer_class") == CHAR_HF_CLASS:
        del old["tokenizer_class"]
        if old:
            atomic_write_json(config, old)
        else:
            config.unlink()


def _allowed(allowed_special: Set[str] | str, special_tokens: dict[str, int]) -> dict[str, int]:
    """The special tokens (text -> id) that ``allowed_special`` lets ``encode`` read as tokens."""
    if isinstance(allowed_special, str):
        if allowed_special != "all":
            raise ValueError(f"allowed_special must be a set of special-token strings or 'all', got "
                             f"{allowed_special!r}")
        return special_tokens
    return {t: i for t, i in special_tokens.items() if t in allowed_special}


def _outside(ids: Sequence[int], vocab_size: int, vocabulary: str) -> ValueError:
    """The error for ids outside ``[0, vocab_size)`` (the first 5 of them), naming ``vocabulary``."""
    bad = [i for i in ids if not 0 <= i < vocab_size][:5]
    return ValueError(f"ids {bad} are outside {vocabulary} [0, {vocab_size})")


def split_special(text: str, special_tokens: dict[str, int]) -> list[str | int]:
    """``text`` cut at each occurrence of a special token's text (the longest where several
    match): ordinary pieces as strings, the special tokens as their ids (in order), as tiktoken's
    ``encode(text, allowed_special=...)`` and HF's tokenizers cut text before encoding the pieces."""
    if not special_tokens or not any(t in text for t in special_tokens):
        return [text]
    pattern = re.compile("|".join(re.escape(t) for t in sorted(special_tokens, key=len, reverse=True)))
    out: list[str | int] = []
    start = 0
    for m in pattern.finditer(text):
        out += [text[start:m.start()], special_tokens[m.group()]]
        start = m.end()
    return [*out, text[start:]]


def _no_surrogates(text: str) -> str:
    """tiktoken's rule for a string holding lone surrogates (a JSON "\\ud800", undecodable bytes of a
    command-line argument): each becomes U+FFFD, which is all UTF-8 can say; a pair joins into its
    character. HF's tokenizers raise a TypeError on them, tiktoken's numpy encoder a UnicodeEncodeError."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _encode_special(text: str, encode: Any, special_tokens: dict[str, int]) -> list[int]:
    ids: list[int] = []
    for piece in split_special(text, special_tokens):
        if isinstance(piece, int):
            ids.append(piece)
        elif piece:
            ids += encode(piece)
    return ids


def encode_as_hf(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` as HF's tokenizer reads text handed to it (a prompt in HF's pipelines
    and vLLM, a task's text in lm-eval): special-token strings written in it (``"<|endoftext|>"``, a
    fine-tune's ``"<|im_start|>"``) are those tokens (``encode(text, allowed_special="all")``), not
    ordinary text as ``encode`` (and ``gpt2 prepare``) reads them. A tokenizer without
    ``special_tokens`` (any object with ``encode``) encodes as it does."""
    if getattr(tokenizer, "special_tokens", None):
        return tokenizer.encode(text, allowed_special="all")
    return tokenizer.encode(text)


class UnknownCharError(ValueError):
    """Text holds characters outside a char tokenizer's vocabulary."""


# --- characters ---------------------------------------------------------------------------------
class CharTokenizer:
    """One id per character: id ``i`` is the ``i``-th character of ``chars`` (sorted, unique).

    ``unknown``: a character of the vocabulary to use for characters outside it. By default
    (``None``) encoding an unknown character raises ``ValueError`` naming it, because silently
    mapping it would corrupt the data without anyone noticing.
    """

    name = "char"
    eot: int | None = None  # a character vocabulary has no spare symbol for end-of-text
    special_tokens: dict[str, int] = {}  # noqa: RUF012 - none, and never changed

    def __init__(self, chars: str | Iterable[str], unknown: str | None = None) -> None:
        chars = "".join(sorted(set(chars)))
        if not chars:
            raise ValueError("a character tokenizer needs at least one character; the corpus is empty")
        if unknown is not None and unknown not in chars:
            raise ValueError(f"replacement character {unknown!r} is not in the vocabulary; pick one of {chars!r}")
        self.chars = chars
        self.vocab_size = len(chars)
        self.unknown = unknown
        self._stoi = {c: i for i, c in enumerate(chars)}
        # Sorted code points for vectorised encoding with np.searchsorted (~50x faster than a dict
        # lookup per character, which matters for a 1 GB corpus).
        self._codes = np.array([ord(c) for c in chars], dtype=np.uint32)

    @classmethod
    def from_text(cls, text: str | Iterable[str], unknown: str | None = None) -> CharTokenizer:
        """Vocabulary = the sorted unique characters of ``text`` (a string or an iterable of chunks,
        so a large corpus can be streamed)."""
        if isinstance(text, str):
            return cls(set(text), unknown=unknown)
        seen: set[str] = set()
        for chunk in text:
            seen.update(chunk)
        return cls(seen, unknown=unknown)

    def _encode_array(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        ids = np.searchsorted(self._codes, codes).astype(np.uint32)
        bad = ids >= self.vocab_size
        bad[~bad] = self._codes[ids[~bad]] != codes[~bad]
        if bad.any():
            if self.unknown is None:
                where = np.flatnonzero(bad)
                unknown = sorted({chr(c) for c in codes[where[:100_000]]})
                shown = ", ".join(repr(c) for c in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
                raise UnknownCharError(f"{int(bad.sum())} character(s) not in the {self.vocab_size}-character "
                                       f"vocabulary (first at position {int(where[0])}): {shown}. Leave them "
                                       f"out, build the vocabulary from text that contains them, or create the "
                                       f"tokenizer with unknown=<a character> to replace them")
            ids[bad] = self._stoi[self.unknown]
        return ids

    def encode(self, text: str, *, allowed_special: Set[str] | str = frozenset()) -> list[int]:
        return self._encode_array(text).tolist()  # no special tokens: allowed_special changes nothing

    def decode(self, ids: Sequence[int]) -> str:
        ids = list(map(int, ids))
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):  # -1 would index the last character
            raise _outside(ids, self.vocab_size, "the character vocabulary")
        return "".join(self.chars[i] for i in ids)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self._encode_array(t) for t in texts]

    def token_bytes(self, token: int) -> bytes:
        return self.decode([token]).encode("utf-8")

    def spec(self) -> dict[str, Any]:
        return {"type": "char", "vocab_size": self.vocab_size, "chars": self.chars, "unknown": self.unknown}

    def save(self, directory: str | Path) -> None:
        """``tokenizer_spec.json`` (ours), and the same tokenizer for transformers: ``tokenizer.json`` +
        ``tokenizer_config.json``, so ``AutoTokenizer.from_pretrained`` on a char model's folder gives
        our ids (without them it built an empty GPT-2 tokenizer that encodes every text to ``[]``)."""
        directory = _write_spec(directory, self.spec())
        if any("\ud800" <= c <= "\udfff" for c in self.chars):
            return  # lone surrogates (a str from surrogateescape) are no UTF-8 text: HF's tokenizers cannot hold them
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

        hf = Tokenizer(models.WordLevel(dict(self._stoi), unk_token=self.unknown))
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one piece per character
        hf.decoder = decoders.Fuse()  # joined as they are (WordLevel's default puts spaces between tokens)
        with atomic_path(directory / BPETokenizer.FILE) as tmp:
            hf.save(str(tmp))
        # The generic class: the folder's config.json says gpt2, whose tokenizer class would expect a BPE.
        atomic_write_json(directory / "tokenizer_config.json", {"tokenizer_class": CHAR_HF_CLASS})

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


# --- OpenAI GPT-2 BPE -----------------------------------------------------------------------------
_TIKTOKEN_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def _no_tiktoken_cache() -> Iterator[None]:
    """tiktoken copies even local files into a cache folder unless TIKTOKEN_CACHE_DIR is "" (its
    documented "cache nothing" value); set it just while we read the files."""
    with _TIKTOKEN_ENV_LOCK:
        old = os.environ.get("TIKTOKEN_CACHE_DIR")
        os.environ["TIKTOKEN_CACHE_DIR"] = ""
        try:
            yield
        finally:
            if old is None:
                del os.environ["TIKTOKEN_CACHE_DIR"]
            else:
                os.environ["TIKTOKEN_CACHE_DIR"] = old


@functools.lru_cache(maxsize=4)
def _tiktoken_encoding(vocab_json: str, merges: str, check_hash: bool):
    """Build (once per pair of files) the tiktoken encoding for a GPT-2-style vocab.json + merges."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    with _no_tiktoken_cache():
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=merges, encoder_json_file=vocab_json,
            vocab_bpe_hash=GPT2_MERGES_SHA256 if check_hash else None,
            encoder_json_hash=GPT2_VOCAB_JSON_SHA256 if check_hash else None)
    n = len(ranks)  # the special token comes after the mergeable ones (50256 for GPT-2)
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT_TEXT: n}, explicit_n_vocab=n + 1)


class GPT2Tokenizer:
    """OpenAI's GPT-2 byte-level BPE (50,257 tokens, ``<|endoftext|>`` = 50256) via tiktoken.

    Built offline from ``vocab.json``/``encoder.json`` + ``merges.txt``/``vocab.bpe``: by default the
    project's data files (``assets.asset_path("gpt2/...")``, sha256-checked), or the files of a saved
    folder. The encoding is built once per process and cached.
    """

    name = "gpt2"

    def __init__(self, vocab_json: str | Path | None = None, merges: str | Path | None = None) -> None:
        if (vocab_json is None) != (merges is None):
            raise ValueError("pass both vocab_json and merges, or neither (the project's GPT-2 files)")
        if vocab_json is None:
            from .assets import asset_path

            vocab_json, merges = asset_path("gpt2/encoder.json"), asset_path("gpt2/vocab.bpe")
            check_hash = True
        else:
            check_hash = False  # a saved/HF folder: any GPT-2-style BPE is fine
        self._files = (Path(vocab_json), Path(merges))
        for f in self._files:
            if not f.is_file():
                raise FileNotFoundError(f"GPT-2 tokenizer file {f} is missing")
        try:
            self._enc = _tiktoken_encoding(str(self._files[0].resolve()), str(self._files[1].resolve()), check_hash)
        except (AssertionError, KeyError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{self._files[0]} / {self._files[1]} are not a valid GPT-2 vocab.json + merges "
                             f"pair ({type(e).__name__}: {e})") from None
        self.vocab_size: int = self._enc.n_vocab
        self.eot: int | None = self._enc.eot_token
        self.special_tokens: dict[str, int] = {EOT_TEXT: self._enc.eot_token}

    @property
    def files(self) -> tuple[Path, Path]:
        """The ``(vocab.json, merges.txt)`` pair this tokenizer was built from (GGUF export reads them)."""
        return self._files

    def encode(self, text: str, *, allowed_special: Set[str] | str = frozenset()) -> list[int]:
        # By default "<|endoftext|>" in user text is ordinary text, never the eot id (tiktoken's
        # encode_ordinary; its plain encode() would raise instead).
        allowed = _allowed(allowed_special, self.special_tokens)
        return _encode_special(text, self._enc.encode_ordinary, allowed) if allowed else self._enc.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        # errors="replace": a slice of ids can end inside a multi-byte character (e.g. while
        # streaming); whole encodings always decode exactly.
        ids = list(map(int, ids))
        try:
            return self._enc.decode(ids, errors="replace")
        except (KeyError, OverflowError):  # tiktoken's "Invalid token" / a negative id
            raise _outside(ids, self.vocab_size, "the GPT-2 vocabulary") from None

    def token_bytes(self, token: int) -> bytes:
        if not 0 <= int(token) < self.vocab_size:
            raise ValueError(f"id {token} is outside the GPT-2 vocabulary [0, {self.vocab_size})")
        return self._enc.decode_single_token_bytes(int(token))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # tiktoken's Rust core releases the GIL, so threads use every core; encode_to_numpy avoids
        # building Python int lists (~36 bytes per token).
        def encode(text: str) -> np.ndarray:
            try:
                return self._enc.encode_to_numpy(text, disallowed_special=())
            except UnicodeEncodeError:
                return self._enc.encode_to_numpy(_no_surrogates(text), disallowed_special=())

        if len(texts) <= 1:
            return [encode(t) for t in texts]
        with ThreadPoolExecutor(min(_num_threads(), len(texts))) as pool:
            return list(pool.map(encode, texts))

    def spec(self) -> dict[str, Any]:
        return {"type": "gpt2", "vocab_size": self.vocab_size, "eot": self.eot,
                "files": ["vocab.json", "merges.txt"]}

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer_spec.json`` + ``vocab.json`` + ``merges.txt`` (HF's GPT-2 file names, so
        ``transformers.GPT2TokenizerFast.from_pretrained(directory)`` works on the folder too)."""
        directory = _write_spec(directory, self.spec())
        for src, name in zip(self._files, ("vocab.json", "merges.txt"), strict=True):
            dst = directory / name
            if dst.exists() and dst.resolve() == src.resolve():
                continue
            with atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)
        # transformers reads a tokenizer.json before vocab.json + merges.txt: one left by a tokenizer saved
        # here before (a char model's, a fine-tune's) would be read instead of these.
        (directory / BPETokenizer.FILE).unlink(missing_ok=True)
        _drop_char_hf_class(directory)

    def __repr__(self) -> str:
        return f"GPT2Tokenizer(vocab_size={self.vocab_size})"


# --- a new byte-level BPE -------------------------------------------------------------------------
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the alphabet of vocab.json and of
    byte-level BPE token strings)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


_UNICODE_TO_BYTE = {c: b for b, c in byte_to_unicode().items()}


class BPETokenizer:
    """A byte-level BPE trained on your corpus with HF ``tokenizers``.

    GPT-2's design: the ByteLevel pre-tokenizer (GPT-2 regex, no added prefix space) maps every byte
    to a symbol, the 256 byte symbols are the initial alphabet, so any Unicode string encodes and
    decodes back exactly. ``<|endoftext|>`` is a special token (id 0); as with GPT-2, the literal
    string in user text is encoded as ordinary text.
    """

    name = "bpe"
    FILE = "tokenizer.json"

    def __init__(self, tokenizer: Any) -> None:
        from tokenizers import decoders, models

        if not isinstance(tokenizer.model, models.BPE) or not isinstance(tokenizer.decoder, decoders.ByteLevel):
            # token_bytes, streaming text and GGUF export read tokens as byte-level BPE pieces
            raise ValueError(f"this tokenizer.json is a {type(tokenizer.model).__name__} model with a "
                             f"{type(tokenizer.decoder).__name__} decoder, not a byte-level BPE (GPT-2's kind: "
                             f"a BPE model with a ByteLevel decoder); gpt2model reads only byte-level BPEs")
        self._tok = tokenizer
        # Treat "<|endoftext|>" in input text as ordinary text (same rule as GPT2Tokenizer).
        self._tok.encode_special_tokens = True
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eot: int | None = tokenizer.token_to_id(EOT_TEXT)
        # Its special added tokens ("<|endoftext|>"; a fine-tune's "<|im_start|>", pad ...): text
        # unless allowed_special names them (HF's tokenizers then still match non-special added tokens).
        self.special_tokens: dict[str, int] = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items()
                                               if t.special}
        # What a HF fine-tune's folder says beyond tokenizer.json (TRL's setup_chat_format: eos_token
        # "<|im_end|>" and a ChatML template), kept through prepare -> dataset -> training run folder
        # so that sample/serve/export stop where the model was taught to and use its template.
        self.eos_token: str | None = None  # HF's eos_token where it is not end-of-text
        self.chat_template: str | None = None

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> BPETokenizer:
        """Train on an iterable of text chunks (streamed: memory ~ the number of distinct words)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < 257:
            raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs 256 byte tokens "
                             f"+ <|endoftext|> = 257 at least")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=[EOT_TEXT])
        tok.train_from_iterator(texts, trainer=trainer)
        got = tok.get_vocab_size(with_added_tokens=True)
        if got < vocab_size:
            warnings.warn(f"the corpus only supports {got} BPE tokens (asked for {vocab_size}): no pair "
                          f"occurs at least min_frequency={min_frequency} times any more", stacklevel=2)
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as e:  # the Rust side raises a bare Exception for bad JSON
            raise ValueError(f"cannot read tokenizer file {path}: {e}") from None

    @classmethod
    def from_vocab_merges(cls, vocab_json: str | Path, merges: str | Path) -> BPETokenizer:
        """A byte-level BPE from HF's slow-tokenizer files, as ``transformers.GPT2TokenizerFast`` builds
        one from them (its GPT2Converter): a GPT-2 trained with its own vocabulary and saved as
        ``vocab.json`` + ``merges.txt`` (e.g. ``ByteLevelBPETokenizer.save_model``), whose ids are not
        laid out as OpenAI's files (which :class:`GPT2Tokenizer` reads through tiktoken). The folder's
        ``added_tokens.json`` (tokens added after training: id -> token beyond the vocabulary) is read
        too; ``<|endoftext|>`` and the tokens ``special_tokens_map.json`` names are special."""
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        vocab_json, merges = Path(vocab_json), Path(merges)
        try:
            vocab = json.loads(vocab_json.read_text(encoding="utf-8-sig"))
            lines = merges.read_text(encoding="utf-8-sig").splitlines()
            pairs = [tuple(ln.split(" ")) for ln in lines if ln and not ln.startswith("#version")]
            if not isinstance(vocab, dict) or any(len(p) != 2 for p in pairs):
                raise ValueError("vocab.json must map token -> id and each merges line must be two tokens")
            model = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False)
        except Exception as e:  # noqa: BLE001 - JSON, I/O, and the Rust side's bare Exception
            raise ValueError(f"{vocab_json} / {merges} are not a valid vocab.json + merges.txt pair "
                             f"({type(e).__name__}: {e})") from None
        tok = HFTokenizer(model)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        folder = vocab_json.parent
        special = {EOT_TEXT}
        with contextlib.suppress(OSError, ValueError, AttributeError):
            for v in json.loads((folder / "special_tokens_map.json").read_text(encoding="utf-8-sig")).values():
                for item in v if isinstance(v, list) else [v]:
                    special.add(item["content"] if isinstance(item, dict) else item)
        added: dict[str, int] = {}
        if (folder / "added_tokens.json").is_file():
            try:
                added = json.loads((folder / "added_tokens.json").read_text(encoding="utf-8-sig"))
                order = sorted(added.items(), key=lambda kv: kv[1])
                if [i for _, i in order] != list(range(len(vocab), len(vocab) + len(order))):
                    raise ValueError(f"its ids {[i for _, i in order][:5]} do not continue the vocabulary's "
                                     f"{len(vocab)} ids")
            except (ValueError, TypeError, AttributeError) as e:
                raise ValueError(f"{folder / 'added_tokens.json'} is not a JSON object of tokens added after the "
                                 f"{len(vocab)} of vocab.json ({e})") from None
            for text, _ in order:
                tok.add_tokens([AddedToken(text, special=text in special, normalized=False)])
        present = [t for t in special if t in vocab]  # special tokens of the vocabulary keep their ids
        if present:
            tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in sorted(present)])
        return cls(tok)

    def hf_json(self) -> dict[str, Any]:
        """The tokenizer as HF's ``tokenizer.json`` holds it (vocabulary, merges, added tokens)."""
        return json.loads(self._tok.to_str())

    def encode(self, text: str, *, allowed_special: Set[str] | str = frozenset()) -> list[int]:
        allowed = _allowed(allowed_special, self.special_tokens)
        if allowed:
            return _encode_special(text, self._encode, allowed)
        return self._encode(text)

    def _encode(self, text: str) -> list[int]:
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:  # lone surrogates
            return self._tok.encode(_no_surrogates(text), add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        ids = list(map(int, ids))
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):  # HF's decode drops unknown ids silently
            raise _outside(ids, self.vocab_size, "this BPE's vocabulary")
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_bytes(self, token: int) -> bytes:
        piece = self._tok.id_to_token(int(token))
        if piece is None:
            raise ValueError(f"id {token} is outside this BPE's vocabulary [0, {self.vocab_size})")
        # HF's ByteLevel decoder (what decode runs): a token all of whose characters are in the byte
        # alphabet is those bytes ("<|endoftext|>" too); any other token (an added "hello world", with
        # its space) is its own UTF-8 text
        try:
            return bytes(_UNICODE_TO_BYTE[c] for c in piece)
        except KeyError:
            return piece.encode("utf-8")

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # encode_batch runs on all cores (Rayon) on the Rust side.
        try:
            encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        except TypeError:  # lone surrogates
            encodings = self._tok.encode_batch([_no_surrogates(t) for t in texts], add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encodings]

    def spec(self) -> dict[str, Any]:
        return {"type": "bpe", "vocab_size": self.vocab_size, "eot": self.eot, "files": [self.FILE]}

    def save(self, directory: str | Path) -> None:
        directory = _write_spec(directory, self.spec())
        with atomic_path(directory / self.FILE) as tmp:
            self._tok.save(str(tmp))
        _drop_char_hf_class(directory)
        if self.chat_template is not None:  # where transformers >= 4.43 (and hf.find_chat_template) read it
            with atomic_path(directory / "chat_template.jinja") as tmp:
                tmp.write_text(self.chat_template, encoding="utf-8")
        if self.eos_token is not None:  # HF's tokenizer_config.json (its other keys, if any, kept)
            config = directory / "tokenizer_config.json"
            try:
                old = json.loads(config.read_text(encoding="utf-8-sig"))
            except (OSError, ValueError):
                old = None
            old = old if isinstance(old, dict) else {}
            if old.get("eos_token") != self.eos_token:
                atomic_write_json(config, {**old, "eos_token": self.eos_token})

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def same_ids(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether every token id means the same bytes under both tokenizers, so that ids encoded by
    one are read correctly by a model trained with the other (a dataset's vs a model's)."""
    if a.vocab_size != b.vocab_size or a.eot != b.eot:
        return False
    if isinstance(a, CharTokenizer) and isinstance(b, CharTokenizer):
        return a.chars == b.chars
    # not by type: GPT-2's vocabulary read from a tokenizer.json (BPETokenizer) is GPT2Tokenizer's
    return all(a.token_bytes(i) == b.token_bytes(i) for i in range(a.vocab_size))


def extends(base: Tokenizer, grown: Tokenizer) -> bool:
    """Whether ``grown`` is ``base`` with tokens added after its ids (HF's ``add_tokens`` /
    ``add_special_tokens``, e.g. a ChatML fine-tune's ``<|im_start|>``): more ids, the same
    end-of-text id, and every id of ``base`` the same bytes in both. A model of ``base`` can then
    learn ``grown``'s data once its embedding has rows for the new ids."""
    if grown.vocab_size <= base.vocab_size or grown.eot != base.eot:
        return False
    if isinstance(base, CharTokenizer) or isinstance(grown, CharTokenizer):
        return False  # a character vocabulary is sorted: new characters move the old ids
    return all(base.token_bytes(i) == grown.token_bytes(i) for i in range(base.vocab_size))


def eos_id(tokenizer: Any) -> int | None:
    """The id HF's ``eos_token`` names: a fine-tune's own (``<|im_end|>``) where its folder says so
    (:class:`BPETokenizer` ``eos_token``), else the end-of-text id (None without one)."""
    named = getattr(tokenizer, "eos_token", None)
    if named is not None:
        ids = tokenizer.encode(named, allowed_special="all")
        if len(ids) == 1:
            return ids[0]
    return getattr(tokenizer, "eot", None)


def _hf_extras(tok: BPETokenizer, folder: Path) -> BPETokenizer:
    """``tok`` with the eos token and chat template of the HF folder it was read from (see
    :class:`BPETokenizer`); a tokenizer_config.json that cannot be read adds nothing."""
    from .hf import find_chat_template

    with contextlib.suppress(ValueError):
        found = find_chat_template(folder)
        tok.chat_template = found[0] if found else None
    with contextlib.suppress(OSError, ValueError, AttributeError):
        eos = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8-sig")).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if isinstance(eos, str) and eos != EOT_TEXT and len(tok.encode(eos, allowed_special="all")) == 1:
            tok.eos_token = eos
    return tok


# --- loading --------------------------------------------------------------------------------------
def load_tokenizer(name_or_path: str | Path) -> CharTokenizer | GPT2Tokenizer | BPETokenizer:
    """``"gpt2"`` -> OpenAI's GPT-2 BPE; a folder written by some tokenizer's ``save()`` (a dataset
    or model folder) -> that tokenizer; a HF GPT-2 folder with ``vocab.json`` + ``merges.txt`` (no
    spec file) -> GPT-2 BPE from those files; a folder with only a ``tokenizer.json`` -> that BPE."""
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        if str(name_or_path) == "gpt2":
            return GPT2Tokenizer()
        if path.exists():
            raise ValueError(f"{path} is a file; pass the folder that holds {SPEC_FILE} (a dataset or model "
                             f"folder), or 'gpt2'")
        raise FileNotFoundError(f"no tokenizer folder at {path}; pass a dataset folder written by "
                                f"'gpt2 prepare', a model folder, or 'gpt2'")
    spec_path = path / SPEC_FILE
    if spec_path.is_file():
        try:
            spec = json.loads(spec_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{spec_path} is not valid JSON ({e}); the file is corrupt or truncated") from None
        if not isinstance(spec, dict):
            raise ValueError(f"{spec_path} holds a JSON {type(spec).__name__}, not a tokenizer spec object; the file "
                             f"is damaged")
        kind = spec.get("type")
        if kind == "char":
            if not isinstance(spec.get("chars"), str) or not isinstance(spec.get("unknown"), (str, type(None))):
                raise ValueError(f"{spec_path}: a char tokenizer spec needs 'chars' (a string) and 'unknown' (a "
                                 f"character or null); the file is damaged")
            tok: CharTokenizer | GPT2Tokenizer | BPETokenizer = CharTokenizer(spec["chars"], spec.get("unknown"))
        elif kind == "gpt2":
            tok = GPT2Tokenizer(path / "vocab.json", path / "merges.txt")
        elif kind == "bpe":
            tok = _hf_extras(BPETokenizer.from_file(path / BPETokenizer.FILE), path)
        else:
            raise ValueError(f"{spec_path} has unknown tokenizer type {kind!r} (expected char, gpt2 or bpe)")
        if spec.get("vocab_size") not in (None, tok.vocab_size):
            raise ValueError(f"{spec_path} says vocab_size={spec['vocab_size']} but its files give "
                             f"{tok.vocab_size}; the folder is inconsistent")
        return tok
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        try:
            gpt2: GPT2Tokenizer | None = GPT2Tokenizer(path / "vocab.json", path / "merges.txt")
        except ValueError:  # not laid out as OpenAI's files: a BPE of its own (trained with HF tokenizers)
            gpt2 = None
        if (path / BPETokenizer.FILE).is_file():
            # HF keeps tokens added to GPT-2's vocabulary (a fine-tune's pad token, ...) only in tokenizer.json,
            # which HF's GPT2TokenizerFast reads: without them the model's extra ids could not be decoded.
            full = BPETokenizer.from_file(path / BPETokenizer.FILE)
            if gpt2 is None or full.vocab_size > gpt2.vocab_size:
                return _hf_extras(full, path)
        if gpt2 is None or (path / "added_tokens.json").is_file():
            return _hf_extras(BPETokenizer.from_vocab_merges(path / "vocab.json", path / "merges.txt"), path)
        return gpt2
    if (path / BPETokenizer.FILE).is_file():
        return _hf_extras(BPETokenizer.from_file(path / BPETokenizer.FILE), path)
    raise FileNotFoundError(f"{path} has no tokenizer: expected {SPEC_FILE} (written by gpt2model), or HF's "
                            f"vocab.json + merges.txt, or tokenizer.json")


def model_tokenizer(name_or_path: str | Path) -> CharTokenizer | GPT2Tokenizer | BPETokenizer:
    """The tokenizer of a model: its folder's (:func:`load_tokenizer`), or OpenAI's GPT-2 BPE for a
    hub name or for a HF folder without tokenizer files (config.json + weights, as downloaded by
    hand) whose vocabulary is GPT-2's size or larger. ``FileNotFoundError`` otherwise."""
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        return GPT2Tokenizer() if not path.exists() else load_tokenizer(path)
    try:
        return load_tokenizer(path)
    except FileNotFoundError:
        try:
            vocab_size = json.loads((path / "config.json").read_text(encoding="utf-8-sig")).get("vocab_size")
        except (OSError, ValueError, AttributeError):
            vocab_size = None
        if not isinstance(vocab_size, int) or vocab_size < GPT2_VOCAB_SIZE:
            raise
        return GPT2Tokenizer()

