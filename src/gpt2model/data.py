"""Token datasets: prepare text into token files, then sample (x, y) batches from them.

A dataset folder (written by :func:`prepare_dataset` / ``gpt2 prepare``) holds

- ``train.bin``, ``val.bin``: the token ids, raw little-endian ``uint16`` (vocabularies up to 65,536)
  or ``uint32``, read back with ``np.memmap`` so a dataset never has to fit in RAM;
- ``meta.json``: tokenizer spec, vocabulary size, dtype, token counts per split, sha256 + size of
  every source file, the split fraction and a format version;
- the tokenizer's files (``tokenizer_spec.json`` + ``vocab.json``/``merges.txt`` or ``tokenizer.json``).

Decisions (and why):

- **Documents.** Input files are documents, concatenated in the order given (folders: sorted
  paths) with the tokenizer's ``eot`` id *between* consecutive documents (the char tokenizer has no
  ``eot``, so its documents are simply concatenated). A single file therefore encodes exactly like
  the whole text (Tiny Shakespeare with GPT-2 BPE = 338,025 tokens).
- **Split.** The first ``int(n * (1 - val_fraction))`` tokens of the concatenated stream are
  ``train``, the rest ``val`` -- nanoGPT's "first 90% / last 10%". For Tiny Shakespeare with the
  char tokenizer that is exactly nanoGPT's 1,003,854 / 111,540. (nanoGPT's GPT-2 ``shakespeare``
  splits the *characters* and encodes each half, giving 301,966 / 36,059; splitting tokens gives
  304,222 / 33,803 and makes ``val_fraction`` mean a fraction of what training sees.)
- **Streaming and exactness.** Files are read in chunks (bounded memory) and each chunk is encoded
  independently on all cores. A chunk ends just before a ``"\\n"`` (or, failing that, a space) whose
  preceding character is not whitespace. GPT-2's pre-tokenizer regex (tiktoken's and HF's ByteLevel
  one) never lets a token run from a non-whitespace character into a following whitespace
  character, and the last token before the cut never needs to look past it, so the pieces
  pre-tokenize -- and hence BPE-encode -- exactly as the whole text does (tested against
  whole-text encoding). Cutting anywhere else is not safe: ``"a\\n\\nb"`` cut after the newlines
  gives ``"\\n\\n"`` as one token where the whole text has two.
- **Atomic output.** Everything is written into ``.<out>.tmp-<pid>-<random>`` next to ``<out>`` and
  swapped into place at the end (``fileio.replace_dir``), so an interrupted prepare never leaves a
  folder that looks complete; :func:`open_dataset` still checks that ``meta.json`` exists and that
  the ``.bin`` sizes match it.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .fileio import (
    BOM,
    FolderLock,
    atomic_write_json,
    disk_full_names,
    fsync_dir,
    recover_dir,
    remove_stale_temporaries,
    replace_dir,
    temp_sibling,
)
from .tokenizer import (
    BPETokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    UnknownCharError,
    load_tokenizer,
    model_tokenizer,
    split_special,
)

FORMAT_VERSION = 1
META_FILE = "meta.json"
SPLITS = ("train", "val")
MIN_SPLIT_TOKENS = 2  # one (x, y) pair: the least a split can be trained or evaluated on
# Named datasets: name -> (asset, default tokenizer).
NAMED_DATASETS: dict[str, tuple[str, str]] = {
    "shakespeare_char": ("tinyshakespeare/input.txt", "char"),
    "shakespeare": ("tinyshakespeare/input.txt", "gpt2"),
}
# Files a dataset folder may hold; an existing --out folder holding anything else is not replaced.
_DATASET_FILES = {"train.bin", "val.bin", META_FILE, "tokenizer_spec.json", "vocab.json", "merges.txt",
                  "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}


# --- reading text -----------------------------------------------------------------------------------
def _safe_cut(text: str) -> int:
    """The last index ``p > 0`` where ``text`` can be cut with encode(text[:p]) + encode(text[p:]) ==
    encode(text) for GPT-2-style pre-tokenizers: ``text[p]`` is a newline (else a space) and
    ``text[p-1]`` is not whitespace. 0 when there is none."""
    for sep in ("\n", " "):
        p = text.rfind(sep)
        while p > 0:
            if not text[p - 1].isspace():
                return p
            p = text.rfind(sep, 0, p)
    return 0


def _read_chunks(path: Path, chunk_bytes: int, errors: str, info: dict[str, Any],
                 keep_whole: Sequence[str] = ()) -> Iterator[tuple[str, int]]:
    """Yield ``(text, raw_bytes_read)`` pieces of the UTF-8 file ``path``, cut where encoding is exact
    (see :func:`_safe_cut`). Fills ``info`` with the file's ``bytes`` and ``sha256`` when done.
    ``keep_whole``: strings (special tokens read as tokens) never cut in two, not even where a long
    stretch without whitespace forces a cut."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    at_start = True  # a byte-order mark before the first character is dropped (no part of the text)
    sha = hashlib.sha256()
    offset = 0  # bytes read so far (for error messages)
    buf = ""
    read_since_yield = 0
    with open(path, "rb") as f:
        while True:
            raw = f.read(chunk_bytes)
            pending = len(decoder.getstate()[0])  # bytes of a character split by the previous read
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} is not valid UTF-8: byte offset {offset - pending + e.start} "
                                 f"({e.reason}, byte {e.object[e.start:e.start + 1]!r}). Convert the file to "
                                 f"UTF-8, or pass errors='replace' (CLI: --errors replace) to substitute "
                                 f"U+FFFD for bad bytes") from None
            if at_start and text:
                text, at_start = text.removeprefix(BOM), False
            sha.update(raw)
            offset += len(raw)
            read_since_yield += len(raw)
            buf += text
            if not raw:
                if buf or read_since_yield:
                    yield buf, read_since_yield
                break
            cut = _safe_cut(buf)
            if cut == 0 and len(buf) > 16 * chunk_bytes:
                warnings.warn(f"{path}: no whitespace in {len(buf):,} characters near byte {offset:,}; cutting "
                              f"there (BPE may differ from whole-file encoding at this one point)", stacklevel=2)
                cut = len(buf) - _partial_suffix(buf, keep_whole)
            if cut:
                yield buf[:cut], read_since_yield
                buf = buf[cut:]
                read_since_yield = 0
    info["bytes"] = offset
    info["sha256"] = sha.hexdigest()


def _partial_suffix(text: str, strings: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that begins one of ``strings`` without completing it."""
    for k in range(min(max(map(len, strings), default=1) - 1, len(text) - 1), 0, -1):
        if any(s.startswith(text[-k:]) and len(s) > k for s in strings):
            return k
    return 0


def _iter_corpus(sources: Sequence[Path], chunk_bytes: int, errors: str,
                 infos: list[dict[str, Any]] | None = None,
                 keep_whole: Sequence[str] = ()) -> Iterator[tuple[str | None, int]]:
    """All sources as one stream of ``(text, raw_bytes)``; ``(None, 0)`` marks the end of each document
    except the last."""
    for i, path in enumerate(sources):
        info: dict[str, Any] = {"path": str(path)}
        yield from _read_chunks(path, chunk_bytes, errors, info, keep_whole)
        if infos is not None:
            infos.append(info)
        if i + 1 < len(sources):
            yield None, 0


def resolve_sources(inputs: Sequence[str | Path], glob: str = "*.txt") -> list[Path]:
    """Text files to read: files as given, folders searched recursively for ``glob`` (sorted),
    skipping hidden files and folders (a name starting with "."; as HF datasets and Arrow skip
    them): a notebook's .ipynb_checkpoints/ copies or a .venv/ would otherwise join the corpus,
    duplicated documents leaking into val. Name one explicitly to read it."""
    if not inputs:
        raise ValueError("no input given: pass text files, folders, or a dataset name "
                         f"({', '.join(NAMED_DATASETS)})")
    out: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            every = list(path.rglob(glob))
            matches = [p for p in every if p.is_file()]
            found = sorted(p for p in matches if not any(part.startswith(".") for part in p.relative_to(path).parts))
            broken = sorted(p for p in every if p.is_symlink() and not p.exists()
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if broken:  # (was skipped silently: a document missing from the corpus without a word)
                raise FileNotFoundError(f"{broken[0]} is a broken symbolic link (to {os.readlink(broken[0])}, which "
                                        f"does not exist){f' and {len(broken) - 1} more' if len(broken) > 1 else ''}; "
                                        f"restore its target or remove the link")
            if not found:
                hidden = f" (only hidden ones, which are skipped: {matches[0]}, ...; name them directly)" \
                    if matches else ""
                raise FileNotFoundError(f"folder {path} has no files matching {glob!r} (searched recursively)"
                                        f"{hidden}; pass --glob to match your files")
            out.extend(found)
        elif path.is_file():
            out.append(path)
        else:
            raise FileNotFoundError(f"input {path} does not exist (expected a text file, a folder, or one of "
                                    f"the named datasets {', '.join(NAMED_DATASETS)})")
    seen: set[Path] = set()
    unique = []
    for p in out:  # the same file given twice is read once
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


# --- preparing -------------------------------------------------------------------------------------
def _build_tokenizer(kind: str, sources: Sequence[Path], vocab_size: int | None, errors: str,
                     unknown_char: str | None, chunk_bytes: int) -> Tokenizer:
    if unknown_char is not None and kind in ("gpt2", "bpe"):  # was silently ignored
        raise ValueError(f"--unknown-char only applies to a char tokenizer; {kind}'s byte-level BPE encodes every "
                         f"character, so drop it")
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "char":
        # First streamed pass: the vocabulary is every character of every file.
        texts = (t for t, _ in _iter_corpus(sources, chunk_bytes, errors) if t)
        return CharTokenizer.from_text(texts, unknown=unknown_char)
    if kind == "bpe":
        if vocab_size is None:
            raise ValueError("--tokenizer bpe needs --vocab-size (e.g. 4096)")
        texts = (t for t, _ in _iter_corpus(sources, chunk_bytes, errors) if t)
        return BPETokenizer.train(texts, vocab_size)
    if Path(kind).expanduser().is_dir():  # reuse a saved tokenizer (e.g. a model's, for fine-tuning)
        tok = model_tokenizer(kind)  # (a HF GPT-2 folder without tokenizer files: GPT-2's, as its loaders read it)
        if unknown_char is not None:
            if not isinstance(tok, CharTokenizer):
                raise ValueError("--unknown-char only applies to a char tokenizer")
            tok = CharTokenizer(tok.chars, unknown=unknown_char)
        return tok
    raise ValueError(f"unknown tokenizer {kind!r}: use char, gpt2, bpe, or a folder that holds a saved tokenizer")


def prepare_dataset(inputs: str | Path | Sequence[str | Path], out: str | Path | None = None, *,
                    tokenizer: str | None = None, vocab_size: int | None = None, val_fraction: float = 0.1,
                    glob: str = "*.txt", errors: str = "strict", unknown_char: str | None = None,
                    chunk_bytes: int = 1 << 20, progress: bool = True, overwrite: bool = False,
                    special_tokens: bool = False) -> Path:
    """Tokenize text into a dataset folder (see the module docstring) and return its path.

    ``inputs``: text files, folders (searched recursively for ``glob``), or a named dataset
    (``shakespeare_char``, ``shakespeare``). ``tokenizer``: ``char``, ``gpt2``, ``bpe`` (needs
    ``vocab_size``) or a folder with a saved tokenizer; default: the named dataset's, else ``gpt2``.
    ``out``: default ``data/<name>``. ``errors``: ``strict`` (non-UTF-8 bytes are an error naming the
    file and byte offset) or ``replace``. ``unknown_char``: char tokenizer only, replacement for
    characters outside the vocabulary (only relevant with a reused tokenizer). An existing dataset
    at ``out`` is replaced only with ``overwrite``; a lock (``.<out>.lock`` next to it, removed at the
    end) keeps two prepares from writing one folder. ``special_tokens``: read the tokenizer's special-token
    strings written in the text (``<|endoftext|>``, a ChatML tokenizer's ``<|im_start|>`` ...) as those
    tokens, as HF's tokenizer does (TRL / run_clm datasets); by default they are ordinary text (and a
    warning counts them). ``-`` (or a pipe such as ``/dev/stdin``) reads standard input.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    inputs = list(inputs)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1): training needs a val split to "
                         f"evaluate on (e.g. 0.1)")
    with contextlib.ExitStack() as stack:
        inputs = [_spool_stream(i, stack) for i in inputs]
        return _prepare(inputs, out, tokenizer, vocab_size, val_fraction, glob, errors, unknown_char, chunk_bytes,
                        progress, overwrite, special_tokens)


def _spool_stream(item: str | Path, stack: contextlib.ExitStack) -> str | Path:
    """``-`` or a pipe/terminal (``/dev/stdin``) -> a temp file holding its bytes: the char and BPE
    tokenizers read the corpus twice, and a stream can be read only once."""
    path = Path(item)
    is_stream = str(item) == "-" or (path.exists() and not path.is_file() and not path.is_dir())
    if not is_stream:
        return item
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpt2-prepare-")))
    spooled = folder / ("stdin.txt" if str(item) in ("-", "/dev/stdin") else f"{path.name}.txt")
    with open(sys.stdin.buffer.fileno() if str(item) == "-" else path, "rb", closefd=False) as src, \
            open(spooled, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return spooled


def _prepare(inputs: list[str | Path], out: str | Path | None, tokenizer: str | None, vocab_size: int | None,
             val_fraction: float, glob: str, errors: str, unknown_char: str | None, chunk_bytes: int,
             progress: bool, overwrite: bool, special_tokens: bool = False) -> Path:
    if errors not in ("strict", "replace"):
        raise ValueError(f"errors={errors!r} must be 'strict' or 'replace'")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes={chunk_bytes} must be positive")
    if vocab_size is not None and tokenizer != "bpe":
        raise ValueError("vocab_size (--vocab-size) only applies to --tokenizer bpe; the others fix their own")
    named = len(inputs) == 1 and str(inputs[0]) in NAMED_DATASETS and not Path(inputs[0]).exists()
    if named:
        from .assets import asset_path

        name = str(inputs[0])
        asset, default_tokenizer = NAMED_DATASETS[name]
        sources = [asset_path(asset)]
    else:
        sources = resolve_sources(inputs, glob)
        first = Path(inputs[0]).expanduser()
        name = first.stem if first.is_file() else first.resolve().name
        default_tokenizer = "gpt2"
    out = Path(out if out is not None else Path("data") / name).expanduser()
    cwd = Path.cwd()
    if out.resolve() == cwd or out.resolve() in cwd.parents:  # "--out ." was "PosixPath('.') has an empty name"
        raise ValueError(f"--out {out} is the current folder (or holds it): the finished dataset folder is swapped "
                         f"into place, which would leave this shell in a deleted folder; pass a folder below it, "
                         f"e.g. --out {name}")
    # A re-run with --out inside an input folder must not read its own output (or temp folders).
    given = sources
    sources = [p for p in sources if out.resolve() not in p.resolve().parents
               and not p.resolve().parent.name.startswith(f".{out.name}.")
                   and p.name != f".{out.name}.lock"]
    if given and not sources:
        raise ValueError(f"every input is inside --out {out}, the dataset folder being written (read as its own "
                         f"output, so left out); write the dataset to another folder, e.g. --out "
                         f"{out.parent / (out.name + '_data')}")
    total_bytes = sum(p.stat().st_size for p in sources)
    if total_bytes == 0:
        raise ValueError(f"empty corpus: {', '.join(map(str, sources[:5])) or 'the inputs'} hold no text")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    with FolderLock(out.with_name(f".{out.name}.lock"), f"dataset folder {out}", remove=True):
        recover_dir(out)  # a prepare killed mid-swap
        if out.is_dir():
            foreign = sorted(p.name for p in out.iterdir() if p.name not in _DATASET_FILES)
            if foreign:
                raise ValueError(f"--out {out} exists and holds files that are not part of a dataset "
                                 f"({', '.join(foreign[:5])}); pick another folder")
            if any(out.iterdir()) and not overwrite:
                raise ValueError(f"--out {out} already holds a dataset; pass --overwrite to replace it (or "
                                 f"choose another --out)")
        _write_dataset(out, name, sources, tokenizer or default_tokenizer, vocab_size, val_fraction, errors,
                       unknown_char, chunk_bytes, total_bytes, progress, special_tokens)
    return out


def _write_dataset(out: Path, name: str, sources: list[Path], tokenizer: str, vocab_size: int | None,
                   val_fraction: float, errors: str, unknown_char: str | None, chunk_bytes: int, total_bytes: int,
                   progress: bool, special_tokens: bool = False) -> None:
    tok = _build_tokenizer(tokenizer, sources, vocab_size, errors, unknown_char, chunk_bytes)
    if special_tokens and not getattr(tok, "special_tokens", None):  # was silently ignored
        raise ValueError(f"--special-tokens reads a tokenizer's special-token strings as those tokens, but the "
                         f"{tok.name} tokenizer has none; drop it")
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)
    remove_stale_temporaries(out.parent, name=out.name)  # temp folders of killed prepares of `out`
    tmp = temp_sibling(out)
    tmp.mkdir()
    try:
        infos: list[dict[str, Any]] = []
        specials: dict[str, int] = {}
        try:
            with disk_full_names(out / "train.bin"):
                n, has_text = _encode_to_file(tok, sources, tmp / "train.bin", dtype, errors, chunk_bytes,
                                              total_bytes, progress, infos, specials, special_tokens)
        except UnknownCharError as e:  # the one place where --unknown-char exists
            raise UnknownCharError(f"{e} (gpt2 prepare: pass --unknown-char C to replace them by C)") from None
        if specials:
            shown = ", ".join(f"{t!r} ({c:,}x)" for t, c in sorted(specials.items(), key=lambda x: -x[1])[:3])
            hint = (". Separate documents by files (prepare puts end-of-text between files), not by "
                    "'<|endoftext|>' text" if "<|endoftext|>" in specials else "")
            warnings.warn(f"the text holds special-token strings, encoded as ordinary text, not as the special "
                          f"tokens (HF's tokenizer reads them as the tokens; prepare does with --special-tokens): "
                          f"{shown}{hint}", stacklevel=2)
        shown = ", ".join(map(str, sources[:5]))
        if not has_text:
            raise ValueError(f"empty corpus: {shown} hold only whitespace; give files with text")
        # Split the concatenated stream: move the tail into val.bin, truncate the rest in place.
        n_train = int(n * (1.0 - val_fraction))
        if min(n_train, n - n_train) < MIN_SPLIT_TOKENS:
            raise ValueError(f"{shown} encode to only {n:,} tokens: with val_fraction {val_fraction} that is "
                             f"{n_train:,} train and {n - n_train:,} val tokens, and each split needs at least "
                             f"{MIN_SPLIT_TOKENS} (a useful dataset has far more). Give more text"
                             + (" or a larger --val-fraction" if n - n_train < MIN_SPLIT_TOKENS <= n_train else ""))
        with disk_full_names(out / "val.bin"), open(tmp / "train.bin", "rb+") as f, open(tmp / "val.bin", "wb") as v:
            f.seek(n_train * dtype.itemsize)
            shutil.copyfileobj(f, v, 1 << 24)
            f.truncate(n_train * dtype.itemsize)
            v.flush()
            os.fsync(v.fileno())
            os.fsync(f.fileno())
        tok.save(tmp)
        meta = {
            "format_version": FORMAT_VERSION,
            "name": name,
            "tokenizer": tok.spec(),
            "vocab_size": tok.vocab_size,
            "eot": tok.eot,
            "dtype": dtype.name,
            "tokens": {"train": n_train, "val": n - n_train},
            "val_fraction": val_fraction,
            "split": "first int(n * (1 - val_fraction)) tokens of the concatenated stream are train, the rest val",
            "documents": "input files in order, separated by the eot token" if tok.eot is not None
                         else "input files in order, concatenated (the tokenizer has no eot token)",
            "errors": errors,
            "special_tokens": "read as tokens" if special_tokens else "text",
            "sources": [{"path": i["path"], "bytes": i["bytes"], "sha256": i["sha256"]} for i in infos],
        }
        atomic_write_json(tmp / META_FILE, meta)  # written last: its presence marks a complete folder
        fsync_dir(tmp)
        replace_dir(tmp, out)  # an earlier dataset (checked above to hold only dataset files) is swapped out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _encode_to_file(tok: Tokenizer, sources: Sequence[Path], path: Path, dtype: np.dtype, errors: str,
                    chunk_bytes: int, total_bytes: int, progress: bool,
                    infos: list[dict[str, Any]], specials: dict[str, int] | None = None,
                    special_tokens: bool = False) -> tuple[int, bool]:
    """Stream-encode all sources into ``path``; batches of chunks go to ``tok.encode_batch`` (all
    cores). Memory: one batch of text + its tokens, independent of corpus size. Returns the number
    of tokens and whether the corpus holds anything but whitespace. ``specials``: counts of the
    tokenizer's special-token strings found in the text (encoded as text), added to; with
    ``special_tokens`` they are read as the tokens instead (and not counted)."""
    from tqdm import tqdm

    batch_chars = max(chunk_bytes, 1) * 2 * (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                             else (os.cpu_count() or 1))
    n_tokens = 0
    has_text = False
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="encoding",
               disable=not progress, dynamic_ncols=True)
    eot = np.array([tok.eot if tok.eot is not None else 0], dtype=dtype)
    table: dict[str, int] = dict(getattr(tok, "special_tokens", {})) if special_tokens else {}

    def flush(items: list[str | None], nbytes: int) -> None:
        nonlocal n_tokens
        texts = [t for t in items if t is not None]
        # (chunks are cut before whitespace, never inside a special-token string)
        if table:  # --special-tokens
            encoded = iter(_encode_batch_special(tok, texts, table))
        else:
            if specials is not None:
                for token in list(getattr(tok, "special_tokens", {}))[:16]:
                    found = sum(t.count(token) for t in texts)
                    if found:
                        specials[token] = specials.get(token, 0) + found
            encoded = iter(tok.encode_batch(texts))
        for item in items:
            ids = eot if item is None else next(encoded)
            f.write(ids.astype(dtype, copy=False).tobytes())
            n_tokens += len(ids)
        bar.update(nbytes)
        bar.set_postfix_str(f"{n_tokens:,} tokens", refresh=False)

    with bar, open(path, "wb") as f:
        items: list[str | None] = []
        chars = nbytes = 0
        for text, raw in _iter_corpus(sources, chunk_bytes, errors, infos, keep_whole=list(table)):
            if text is None and tok.eot is None:
                continue
            items.append(text)
            has_text = has_text or (bool(text) and not text.isspace())
            chars += len(text or "")
            nbytes += raw
            if chars >= batch_chars:
                flush(items, nbytes)
                items, chars, nbytes = [], 0, 0
        flush(items, nbytes)
        f.flush()
        os.fsync(f.fileno())
    return n_tokens, has_text


def _encode_batch_special(tok: Tokenizer, texts: list[str], table: dict[str, int]) -> list[np.ndarray]:
    """``tok.encode(text, allowed_special=table)`` of each text, with the ordinary pieces between the
    special tokens encoded together on all cores (``encode_batch``)."""
    pieces = [split_special(t, table) for t in texts]
    ordinary = iter(tok.encode_batch([p for ps in pieces for p in ps if isinstance(p, str) and p]))
    out = []
    for ps in pieces:
        parts = [np.array([p], dtype=np.uint32) if isinstance(p, int) else next(ordinary) for p in ps if p != ""]
        out.append(np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32))
    return out


# --- reading a dataset -----------------------------------------------------------------------------
class TokenDataset:
    """A validated dataset folder. ``split(name)`` returns the tokens as a read-only ``np.memmap``."""

    def __init__(self, directory: Path, meta: dict[str, Any]) -> None:
        self.directory = directory
        self.meta = meta
        self.vocab_size: int = int(meta["vocab_size"])
        self.eot: int | None = meta.get("eot")
        self.dtype = np.dtype(meta["dtype"])
        self._tokenizer: Tokenizer | None = None

    def tokenizer(self) -> Tokenizer:
        """The tokenizer the dataset was encoded with (loaded once)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.directory)
            if self._tokenizer.vocab_size != self.vocab_size:
                raise ValueError(f"{self.directory}: tokenizer has {self._tokenizer.vocab_size} tokens but "
                                 f"{META_FILE} says {self.vocab_size}; the folder is inconsistent, re-run prepare")
        return self._tokenizer

    def num_tokens(self, split: str) -> int:
        return int(self.meta["tokens"][self._check_split(split)])

    def split(self, split: str) -> np.ndarray:
        """``"train"`` or ``"val"`` -> 1-D token array (``np.memmap``; an empty array for an empty split,
        which cannot be memory-mapped)."""
        split = self._check_split(split)
        if self.num_tokens(split) == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.directory / f"{split}.bin", dtype=self.dtype, mode="r")

    def _check_split(self, split: str) -> str:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return split

    def __repr__(self) -> str:
        t = self.meta["tokens"]
        return (f"TokenDataset({str(self.directory)!r}, vocab_size={self.vocab_size}, train={t['train']:,}, "
                f"val={t['val']:,}, dtype={self.dtype.name})")


def open_dataset(directory: str | Path) -> TokenDataset:
    """Open and validate a dataset folder written by :func:`prepare_dataset`.

    Raises ``FileNotFoundError`` for a missing folder and ``ValueError`` for an incomplete one
    (no ``meta.json``: an interrupted prepare) or one whose ``.bin`` files do not match ``meta.json``.
    """
    import json

    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"dataset folder {directory} does not exist; create it with "
                                f"'gpt2 prepare <text files or shakespeare_char> --out {directory}'")
    meta_path = directory / META_FILE
    if not meta_path.is_file() and (directory / "config.json").is_file():
        raise ValueError(f"{directory} is a model folder (config.json), not a dataset: pass a folder written by "
                         f"'gpt2 prepare' (train.bin, val.bin, {META_FILE})")
    if not meta_path.is_file():
        raise ValueError(f"{directory} is not a complete dataset: {META_FILE} is missing (an interrupted "
                         f"'gpt2 prepare'?). Run 'gpt2 prepare ... --out {directory}' again")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path} is not valid JSON ({e}); re-run 'gpt2 prepare'") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path} holds a JSON {type(meta).__name__}, not a dataset's metadata object; re-run "
                         f"'gpt2 prepare'")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{meta_path} has format_version={version!r}; this gpt2model reads version "
                         f"{FORMAT_VERSION}. Re-run 'gpt2 prepare'")
    try:
        dtype = np.dtype(meta["dtype"])
        vocab_size = int(meta["vocab_size"])
        counts = {s: int(meta["tokens"][s]) for s in SPLITS}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{meta_path} lacks or has a bad field ({type(e).__name__}: {e}); re-run 'gpt2 prepare'"
                         ) from None
    if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)) or vocab_size > np.iinfo(dtype).max + 1:
        raise ValueError(f"{meta_path}: dtype {dtype} cannot hold vocab_size {vocab_size}")
    for s in SPLITS:
        path = directory / f"{s}.bin"
        if not path.is_file():
            raise ValueError(f"{directory} is not a complete dataset: {path.name} is missing. Re-run 'gpt2 prepare'")
        expected = counts[s] * dtype.itemsize
        size = path.stat().st_size
        if size != expected:
            raise ValueError(f"{path} has {size:,} bytes but {META_FILE} says {counts[s]:,} {dtype.name} tokens "
                             f"({expected:,} bytes): the file is truncated or from another prepare. "
                             f"Re-run 'gpt2 prepare'")
        if counts[s] and vocab_size <= np.iinfo(dtype).max:
            _check_id_range(np.memmap(path, dtype=dtype, mode="r"), vocab_size, path)
    return TokenDataset(directory, meta)


def _check_id_range(tokens: np.ndarray, vocab_size: int, path: Path) -> None:
    """Every id < vocab_size: checked once here, since the trainer skips the per-forward check.
    Chunked, so a large split is scanned at memory speed without loading it whole."""
    step = 1 << 26
    for start in range(0, len(tokens), step):
        chunk = tokens[start:start + step]
        top = int(chunk.max())
        if top >= vocab_size:
            where = start + int(np.argmax(chunk >= vocab_size))
            raise ValueError(f"{path} holds token id {top} (first bad one at position {where:,}) but the "
                             f"vocabulary has {vocab_size} ids: the file is damaged or from another tokenizer. "
                             f"Re-run 'gpt2 prepare'")


# --- batches ---------------------------------------------------------------------------------------
def _split_name(tokens: np.ndarray, name: str | None) -> str:
    if name:
        return name
    filename = getattr(tokens, "filename", None)  # np.memmap knows its file (train.bin / val.bin)
    return f"split {Path(filename).name}" if filename else "the token split"


def _check_tokens(tokens: np.ndarray, context_length: int, batch_size: int, name: str | None) -> None:
    if batch_size < 1 or context_length < 1:
        raise ValueError(f"batch_size={batch_size} and context_length={context_length} must be positive")
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if len(tokens) < context_length + 1:
        raise ValueError(f"{_split_name(tokens, name)} has {len(tokens):,} tokens, too few for one window of "
                         f"context_length + 1 = {context_length + 1}; use a larger corpus (or --val-fraction) "
                         f"or a smaller context_length")


def _windows(tokens: np.ndarray, starts: np.ndarray, context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    # One contiguous slice per window (sequential reads from the memmap), then int64 for embeddings.
    buf = np.stack([np.asarray(tokens[s:s + context_length + 1]) for s in starts.tolist()]).astype(np.int64)
    return torch.from_numpy(buf[:, :-1].copy()), torch.from_numpy(buf[:, 1:].copy())


class BatchSampler:
    """Random (x, y) training windows, deterministic for a seed, resumable, rank-aware.

    Batch ``i`` comes from a generator seeded with ``(seed, i)``: it draws ``world_size *
    batch_size`` window offsets and this rank returns rows ``[rank*batch_size:(rank+1)*batch_size]``,
    so every rank draws the same global batch and keeps its own slice (2 ranks x B == 1 rank x 2B,
    exactly). Seeding per batch makes the state two integers (``seed``, ``step``): JSON-able, and
    resuming is exact.

    ``tokens`` is usually the memmap from :meth:`TokenDataset.split`; it is kept open for the
    sampler's lifetime. nanoGPT re-creates its memmap every batch because the process RSS grows as
    pages are touched; those are clean, file-backed page-cache pages that the kernel drops under
    memory pressure (re-mapping only hides them from RSS), so re-opening buys nothing and costs two
    syscalls per batch. Each window is copied out of the map, so returned tensors never pin it.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, context_length: int, seed: int, rank: int = 0,
                 world_size: int = 1, *, name: str | None = None) -> None:
        _check_tokens(tokens, context_length, batch_size, name)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if seed < 0:
            raise ValueError(f"seed={seed} must be non-negative")
        self.tokens = tokens
        self.batch_size = batch_size
        self.context_length = context_length
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.step = 0  # batches drawn so far

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``: int64 CPU tensors of shape (batch_size, context_length), ``y`` = ``x`` shifted by one."""
        rng = np.random.default_rng([self.seed, self.step])
        starts = rng.integers(0, len(self.tokens) - self.context_length, size=self.world_size * self.batch_size)
        self.step += 1
        mine = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return _windows(self.tokens, mine, self.context_length)

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "step": self.step, "global_batch": self.world_size * self.batch_size,
                "context_length": self.context_length, "num_tokens": len(self.tokens)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue the stream saved by :meth:`state_dict` (also with another rank/world_size split of
        the same global batch)."""
        mine = self.state_dict()
        for key in ("global_batch", "context_length", "num_tokens"):
            if key in state and int(state[key]) != mine[key]:
                raise ValueError(f"cannot resume the batch stream: saved {key}={state[key]} but this sampler "
                                 f"has {mine[key]} (the same data, context_length and world_size*batch_size "
                                 f"are needed for an exact resume)")
        self.seed = int(state["seed"])
        self.step = int(state["step"])


def eval_batches(tokens: np.ndarray, batch_size: int, context_length: int, max_batches: int | None = None,
                 *, name: str | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed, deterministic evaluation set of (x, y) batches.

    The split is tiled with non-overlapping windows (every token is a target once, except a tail
    shorter than a window); when that is more than ``max_batches * batch_size`` windows, that many
    are taken evenly spaced over the split instead. The last batch may be smaller: weight batch
    losses by ``x.numel()`` when averaging.
    """
    _check_tokens(tokens, context_length, batch_size, name)
    n_windows = (len(tokens) - 1) // context_length  # non-overlapping windows that fit
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches={max_batches} must be positive (or None for the whole split)")
    if max_batches is None or n_windows <= max_batches * batch_size:
        starts = np.arange(n_windows, dtype=np.int64) * context_length
    else:
        n_windows = max_batches * batch_size
        starts = np.linspace(0, len(tokens) - context_length - 1, n_windows).round().astype(np.int64)
    return [_windows(tokens, starts[i:i + batch_size], context_length) for i in range(0, n_windows, batch_size)]
