"""Dataset preparation (streamed, chunked, atomic) and batch sampling, checked against whole-text
encoding, nanoGPT's split sizes, and hand-built expectations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2model.cli import main
from gpt2model.data import BatchSampler, eval_batches, open_dataset, prepare_dataset
from gpt2model.tokenizer import GPT2Tokenizer

# Whitespace-heavy, multi-script text: the cases where a careless chunk cut changes BPE tokens.
TRICKY = (
    "First line\n\n\nthree newlines above;  two spaces, trailing spaces   \n"
    "\t\ttabs\r\nCRLF\r\n\r\n   leading spaces\n"
    "日本語の文章には空白がありません。中文也没有空格。\n"
    "emoji 🎉👍🏽 👩‍👩‍👧‍👦, accents déjà vu, e\u0301\n"
    "it's we'll 123456 3.14 <|endoftext|> done.\n"
) * 40


def _tokens(ds) -> np.ndarray:
    return np.concatenate([ds.split("train"), ds.split("val")])


# --- prepare: named datasets -----------------------------------------------------------------------
def test_prepare_shakespeare_char_equals_nanogpt(shakespeare_text, tmp_path):
    out = prepare_dataset("shakespeare_char", tmp_path / "sc", progress=False)
    ds = open_dataset(out)
    assert ds.meta["tokens"] == {"train": 1_003_854, "val": 111_540}  # nanoGPT's shakespeare_char split
    assert ds.vocab_size == 65 and ds.dtype == np.uint16 and ds.eot is None
    assert isinstance(ds.split("train"), np.memmap)
    tok = ds.tokenizer()
    assert tok.decode(ds.split("train")) == shakespeare_text[:1_003_854]
    assert tok.decode(ds.split("val")) == shakespeare_text[1_003_854:]
    src = ds.meta["sources"][0]
    assert src["bytes"] == 1_115_394
    assert src["sha256"] == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    assert {p.name for p in out.iterdir()} == {"train.bin", "val.bin", "meta.json", "tokenizer_spec.json",
                                               "tokenizer.json", "tokenizer_config.json"}  # (the latter: HF's)


def test_prepare_shakespeare_gpt2_chunked_equals_whole(shakespeare_text, tmp_path):
    # 4 KiB chunks: ~270 independently encoded pieces must give exactly the whole-text encoding.
    out = prepare_dataset("shakespeare", tmp_path / "s", chunk_bytes=4096, progress=False)
    ds = open_dataset(out)
    whole = GPT2Tokenizer().encode(shakespeare_text)
    assert len(whole) == 338_025
    assert _tokens(ds).tolist() == whole
    assert ds.meta["tokens"] == {"train": int(338_025 * 0.9), "val": 338_025 - int(338_025 * 0.9)}
    assert ds.tokenizer().decode(_tokens(ds)) == shakespeare_text


@pytest.mark.parametrize("kind", ["gpt2", "bpe"])
@pytest.mark.parametrize("chunk_bytes", [7, 64, 1000])
def test_chunked_encoding_is_exact_on_tricky_text(kind, chunk_bytes, tmp_path):
    src = tmp_path / "tricky.txt"
    src.write_bytes(TRICKY.encode())
    out = prepare_dataset([src], tmp_path / "out", tokenizer=kind, vocab_size=400 if kind == "bpe" else None,
                          val_fraction=0.1, chunk_bytes=chunk_bytes, progress=False)
    ds = open_dataset(out)
    tok = ds.tokenizer()
    assert _tokens(ds).tolist() == tok.encode(TRICKY)
    assert tok.decode(_tokens(ds)) == TRICKY


@pytest.mark.parametrize("kind", ["gpt2", "bpe"])
def test_chunked_encoding_is_exact_on_random_unicode_whitespace(kind, tmp_path):
    # Random text over an alphabet rich in the characters where Python's and the Rust regex's ideas
    # of whitespace could disagree (\x1c, \x85, NBSP, U+2028, U+3000, ...).
    alphabet = list("ab1' s!\n\t\r\x0b\x0c\x1c\x1f\x85\xa0\u2028\u3000\u200b") + ["é", "日", "🎉", "\r\n", "  "]
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(alphabet, size=20_000))
    src = tmp_path / "random.txt"
    src.write_bytes(text.encode())
    out = prepare_dataset([src], tmp_path / "out", tokenizer=kind, vocab_size=300 if kind == "bpe" else None,
                          val_fraction=0.1, chunk_bytes=33, progress=False)
    ds = open_dataset(out)
    assert _tokens(ds).tolist() == ds.tokenizer().encode(text)


def test_naive_chunk_cut_would_not_be_exact():
    # Why chunks are cut before a newline that follows a non-space: cutting after "\n\n" merges the
    # pair into one token ("\n\n" = 628) where the whole text has two "\n" (198, 198).
    tok = GPT2Tokenizer()
    text = "a\n\nb"
    assert tok.encode(text) == [64, 198, 198, 65]
    assert tok.encode("a\n\n") + tok.encode("b") == [64, 628, 65]
    assert tok.encode("a") + tok.encode("\n\nb") == tok.encode(text)


# --- prepare: files, folders, documents ------------------------------------------------------------
def test_folder_documents_separated_by_eot(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    docs = {"b.txt": "second document\n", "a.txt": "first document\n", "sub/c.txt": "third, nested 🎉"}
    for name, text in docs.items():
        (corpus / name).write_text(text, encoding="utf-8")
    (corpus / "notes.md").write_text("not matched by *.txt")
    ds = open_dataset(prepare_dataset([corpus], tmp_path / "out", tokenizer="gpt2", val_fraction=0.1,
                                      progress=False))
    tok = ds.tokenizer()
    ordered = [docs["a.txt"], docs["b.txt"], docs["sub/c.txt"]]  # sorted paths
    assert [Path(s["path"]).name for s in ds.meta["sources"]] == ["a.txt", "b.txt", "c.txt"]
    expected = tok.encode(ordered[0]) + [tok.eot] + tok.encode(ordered[1]) + [tok.eot] + tok.encode(ordered[2])
    assert _tokens(ds).tolist() == expected
    assert tok.decode(_tokens(ds)) == "<|endoftext|>".join(ordered)
    # --glob picks other files; the char tokenizer (no eot) concatenates and sees every file's characters
    ds = open_dataset(prepare_dataset([corpus], tmp_path / "md", tokenizer="char", glob="*.md", progress=False))
    assert ds.tokenizer().decode(_tokens(ds)) == "not matched by *.txt"
    ds = open_dataset(prepare_dataset([corpus / "a.txt", corpus / "sub" / "c.txt"], tmp_path / "chars",
                                      tokenizer="char", progress=False))
    assert ds.tokenizer().decode(_tokens(ds)) == docs["a.txt"] + docs["sub/c.txt"]
    assert "🎉" in ds.tokenizer().chars
    # --out inside the input folder with a catch-all glob: a re-run doesn't read its own output
    for _ in range(2):
        ds = open_dataset(prepare_dataset([corpus], corpus / "data", tokenizer="char", glob="*", progress=False,
                                          overwrite=True))
        assert len(ds.meta["sources"]) == 4


def test_split_sizes_add_up_and_trained_bpe_saved_with_dataset(shakespeare_text, tmp_path):
    src = tmp_path / "tiny.txt"
    src.write_text(shakespeare_text[:200_000])
    out = prepare_dataset([src], tmp_path / "bpe", tokenizer="bpe", vocab_size=512, val_fraction=0.25,
                          progress=False)
    ds = open_dataset(out)
    assert (out / "tokenizer.json").is_file() and ds.vocab_size == 512 and ds.eot == 0
    n = len(ds.tokenizer().encode(shakespeare_text[:200_000]))
    assert ds.meta["tokens"]["train"] + ds.meta["tokens"]["val"] == n
    assert ds.meta["tokens"]["train"] == int(n * 0.75)
    assert ds.tokenizer().decode(_tokens(ds)) == shakespeare_text[:200_000]


def test_reused_tokenizer_and_uint32_vocab(tmp_path):
    # A character vocabulary larger than 65,536 needs uint32 token files.
    chars = "".join(chr(c) for c in range(0x20000, 0x20000 + 70_000))
    src = tmp_path / "wide.txt"
    src.write_text(chars + chars[::-1], encoding="utf-8")
    ds = open_dataset(prepare_dataset([src], tmp_path / "wide", tokenizer="char", progress=False))
    assert ds.vocab_size == 70_000 and ds.dtype == np.uint32
    assert ds.tokenizer().decode(_tokens(ds)) == chars + chars[::-1]
    # --tokenizer <folder>: encode new text with an existing tokenizer (e.g. a model's)
    other = tmp_path / "other.txt"
    other.write_text(chars[:10] + "x")
    with pytest.raises(ValueError, match="not in the 70000-character vocabulary.*'x'"):
        prepare_dataset([other], tmp_path / "o", tokenizer=str(tmp_path / "wide"), progress=False)
    ds = open_dataset(prepare_dataset([other], tmp_path / "o", tokenizer=str(tmp_path / "wide"),
                                      unknown_char=chars[0], val_fraction=0.1, progress=False))
    assert ds.tokenizer().decode(_tokens(ds)) == chars[:10] + chars[0]


# --- bad input --------------------------------------------------------------------------------------
def test_non_utf8_error_names_file_and_offset(tmp_path):
    src = tmp_path / "latin1.txt"
    # A 3-byte character straddles the 16-byte read boundary; the bad byte 0xE9 is at offset 40.
    data = "x" * 15 + "€" + "y" * 22
    raw = data.encode() + b"\xe9t\xe9\n"
    assert raw.index(b"\xe9t") == 40
    src.write_bytes(raw)
    with pytest.raises(ValueError, match=r"latin1\.txt is not valid UTF-8: byte offset 40 .*--errors replace"):
        prepare_dataset([src], tmp_path / "out", tokenizer="char", chunk_bytes=16, progress=False)
    assert not (tmp_path / "out").exists()
    ds = open_dataset(prepare_dataset([src], tmp_path / "out", tokenizer="char", errors="replace", chunk_bytes=16,
                                      val_fraction=0.1, progress=False))
    assert ds.tokenizer().decode(_tokens(ds)) == data + "\ufffdt\ufffd\n"


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_dataset([tmp_path / "missing.txt"], tmp_path / "out", progress=False)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty corpus"):
        prepare_dataset([tmp_path / "empty.txt"], tmp_path / "out", progress=False)
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no files matching '\*\.txt'"):
        prepare_dataset([tmp_path / "folder"], tmp_path / "out", progress=False)
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_dataset([tmp_path / "a.txt"], tmp_path / "out", val_fraction=1.0, progress=False)
    with pytest.raises(ValueError, match="needs --vocab-size"):
        prepare_dataset([tmp_path / "a.txt"], tmp_path / "out", tokenizer="bpe", progress=False)
    with pytest.raises(ValueError, match="only applies to --tokenizer bpe"):
        prepare_dataset([tmp_path / "a.txt"], tmp_path / "out", tokenizer="gpt2", vocab_size=1000, progress=False)
    with pytest.raises(ValueError, match="unknown tokenizer 'wordpiece'"):
        prepare_dataset([tmp_path / "a.txt"], tmp_path / "out", tokenizer="wordpiece", progress=False)
    # an --out folder with the user's own files is never replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="thesis.tex"):
        prepare_dataset([tmp_path / "a.txt"], tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    with pytest.raises(FileNotFoundError, match="gpt2 prepare"):
        open_dataset(tmp_path / "nope")


# --- interrupted / damaged datasets -------------------------------------------------------------------
def test_interrupted_prepare_leaves_no_complete_looking_folder(tmp_path, monkeypatch):
    src = tmp_path / "a.txt"
    src.write_text("To be, or not to be: that is the question.\n" * 100)
    out = tmp_path / "ds"

    def interrupted(self, directory):
        raise KeyboardInterrupt

    monkeypatch.setattr(GPT2Tokenizer, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset([src], out, progress=False)
    assert not out.exists()
    # The temp folder is cleaned up, and the lock file (it was left beside the folder after every prepare).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    monkeypatch.undo()
    # A process killed outright (no cleanup) leaves only a hidden temp folder, which is not the dataset;
    # the next prepare removes it since its process is gone.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".ds.tmp-{dead.pid}"
    stale.mkdir()
    (stale / "train.bin").write_bytes(b"\0" * 10)
    with pytest.raises(FileNotFoundError):
        open_dataset(out)
    prepare_dataset([src], out, progress=False)
    assert not stale.exists()
    # An existing dataset is replaced only when asked to (it may have taken hours to build).
    with pytest.raises(ValueError, match="already holds a dataset; pass --overwrite"):
        prepare_dataset([src], out, tokenizer="char", progress=False)
    assert open_dataset(out).meta["tokenizer"]["type"] == "gpt2"
    ds = open_dataset(prepare_dataset([src], out, tokenizer="char", progress=False, overwrite=True))
    assert ds.meta["tokenizer"]["type"] == "char"


def test_prepare_takes_a_lock_naming_the_holder(tmp_path):
    from gpt2model.fileio import FolderBusyError, FolderLock

    src = tmp_path / "a.txt"
    src.write_text("To be, or not to be: that is the question.\n" * 20)
    with FolderLock(tmp_path / ".ds.lock", "dataset folder"), \
            pytest.raises(FolderBusyError, match=f"in use by PID {os.getpid()}"):
        prepare_dataset([src], tmp_path / "ds", tokenizer="char", progress=False)
    assert not (tmp_path / "ds").exists()
    prepare_dataset([src], tmp_path / "ds", tokenizer="char", progress=False)  # released: works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "ds"]  # no .ds.lock left beside it


def test_a_removed_lock_file_is_never_held_twice(tmp_path, monkeypatch):
    """The holder unlinks the lock file at release; a second process that opened it just before
    must notice it locked a removed file and lock the one at the path instead, or a third process
    would create a new file and hold "the" lock at the same time."""
    from gpt2model import fileio
    from gpt2model.fileio import FolderBusyError, FolderLock

    path = tmp_path / ".ds.lock"
    first = FolderLock(path, "dataset folder", remove=True).acquire()
    real_flock = fileio.fcntl.flock
    released = []

    def flock(fd, op):  # the holder finishes between the second process's open and its lock
        if not released:
            released.append(True)
            first.release()
        return real_flock(fd, op)

    monkeypatch.setattr(fileio.fcntl, "flock", flock)
    second = FolderLock(path, "dataset folder", remove=True).acquire()
    monkeypatch.undo()
    assert released and path.is_file()
    with pytest.raises(FolderBusyError):
        FolderLock(path, "dataset folder").acquire()
    second.release()
    assert not path.exists()


@pytest.mark.parametrize("text, kwargs, message", [
    ("To be, or not to be.\n" * 20, {"val_fraction": 0.0}, r"must be in \(0, 1\)"),
    ("a", {}, "encode to only 1 tokens"),
    ("abcdefgh", {}, "larger --val-fraction"),
    (" \n\t \n", {}, "only whitespace"),
])
def test_prepare_refuses_corpora_that_cannot_be_trained_on(tmp_path, text, kwargs, message):
    (tmp_path / "a.txt").write_text(text)
    with pytest.raises(ValueError, match=message):
        prepare_dataset([tmp_path / "a.txt"], tmp_path / "ds", tokenizer="char", progress=False, **kwargs)
    assert not (tmp_path / "ds").exists()


def test_ids_outside_the_vocabulary_are_caught_when_the_dataset_is_opened(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("All the world's a stage.\n" * 20)
    out = prepare_dataset([src], tmp_path / "ds", tokenizer="char", progress=False)
    vocab = open_dataset(out).vocab_size
    train = np.fromfile(out / "train.bin", dtype=np.uint16)
    train[7] = vocab + 3
    train.tofile(out / "train.bin")
    with pytest.raises(ValueError, match=f"train.bin holds token id {vocab + 3} .*position 7"):
        open_dataset(out)


def test_prepare_reads_standard_input(tmp_path):
    text = "To be, or not to be: that is the question.\n" * 20
    run = subprocess.run([sys.executable, "-m", "gpt2model", "prepare", "-", "--tokenizer", "char", "--out",
                          str(tmp_path / "ds"), "--quiet"], input=text.encode(), capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    ds = open_dataset(tmp_path / "ds")
    assert ds.tokenizer().decode(_tokens(ds)) == text


def test_unknown_char_hint_only_where_the_option_exists(tmp_path):
    from gpt2model.tokenizer import CharTokenizer

    with pytest.raises(ValueError, match="not in the") as e:
        CharTokenizer.from_text("abc").encode("abz")
    assert "--unknown-char" not in str(e.value)  # `gpt2 sample` shows this one: it has no such option
    CharTokenizer.from_text("abc " * 10).save(tmp_path / "tok")
    (tmp_path / "b.txt").write_text("abz " * 10)
    with pytest.raises(ValueError, match="pass --unknown-char"):
        prepare_dataset([tmp_path / "b.txt"], tmp_path / "ds", tokenizer=str(tmp_path / "tok"), progress=False)


def test_open_dataset_detects_partial_or_mismatched_folder(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("All the world's a stage, and all the men and women merely players.\n" * 50)
    out = prepare_dataset([src], tmp_path / "ds", tokenizer="char", progress=False)
    meta = json.loads((out / "meta.json").read_text())
    # truncated bin (a copy cut short)
    train = (out / "train.bin").read_bytes()
    (out / "train.bin").write_bytes(train[:-2])
    with pytest.raises(ValueError, match=r"train\.bin has .* bytes but meta\.json says .* truncated"):
        open_dataset(out)
    (out / "train.bin").write_bytes(train)
    # meta.json that doesn't match its bins
    (out / "meta.json").write_text(json.dumps({**meta, "tokens": {"train": 5, "val": meta["tokens"]["val"]}}))
    with pytest.raises(ValueError, match="says 5 uint16 tokens"):
        open_dataset(out)
    (out / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version=99"):
        open_dataset(out)
    (out / "meta.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        open_dataset(out)
    (out / "meta.json").write_text("[1]")  # was an AttributeError traceback
    with pytest.raises(ValueError, match="holds a JSON list, not a dataset's metadata object"):
        open_dataset(out)
    (out / "meta.json").unlink()
    with pytest.raises(ValueError, match="meta.json is missing .*interrupted"):
        open_dataset(out)


# --- batches -----------------------------------------------------------------------------------------
@pytest.fixture
def tokens() -> np.ndarray:
    return np.arange(10_000, dtype=np.uint16) % 5000  # position i holds i % 5000: windows are checkable


def test_sampler_windows_are_shifted_slices(tokens):
    s = BatchSampler(tokens, batch_size=4, context_length=16, seed=0)
    x, y = s.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    for row_x, row_y in zip(x, y, strict=True):
        start = int(row_x[0]) if int(row_x[0]) + 17 <= 5000 else None
        if start is not None:  # away from the wrap-around, the window is exactly tokens[start:start+17]
            assert row_x.tolist() == list(range(start, start + 16))
        assert row_y[:-1].tolist() == row_x[1:].tolist()
        assert (row_y[-1] - row_x[-1]) % 5000 == 1


def test_sampler_is_deterministic_and_resumes_exactly(tokens):
    a = BatchSampler(tokens, 8, 32, seed=1337)
    b = BatchSampler(tokens, 8, 32, seed=1337)
    c = BatchSampler(tokens, 8, 32, seed=1338)
    first = [a.next_batch() for _ in range(3)]
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(first, [b.next_batch() for _ in range(3)],
                                                                strict=True))
    assert not torch.equal(first[0][0], c.next_batch()[0])
    state = json.loads(json.dumps(a.state_dict()))  # plain JSON round trip
    expected = [a.next_batch() for _ in range(3)]
    resumed = BatchSampler(tokens, 8, 32, seed=0)  # the state, not the constructor seed, decides
    resumed.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, [resumed.next_batch() for _ in range(3)], strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    with pytest.raises(ValueError, match="global_batch=8 .* has 16"):
        BatchSampler(tokens, 16, 32, seed=0).load_state_dict(state)


def test_sampler_ranks_partition_the_global_batch(tokens):
    single = BatchSampler(tokens, 8, 32, seed=7)
    ranks = [BatchSampler(tokens, 4, 32, seed=7, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        x, y = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert not torch.equal(parts[0][0], parts[1][0])
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    # a 1-rank state resumes as 2 ranks with the same global batch
    state = single.state_dict()
    x, _ = single.next_batch()
    for r in ranks:
        r.load_state_dict(state)
    assert torch.equal(torch.cat([r.next_batch()[0] for r in ranks]), x)
    with pytest.raises(ValueError, match="rank=2"):
        BatchSampler(tokens, 4, 32, seed=7, rank=2, world_size=2)


def test_sampler_on_memmap_split(tmp_path):
    src = tmp_path / "a.txt"
    text = "".join(chr(97 + i % 26) for i in range(3000))
    src.write_text(text)
    ds = open_dataset(prepare_dataset([src], tmp_path / "ds", tokenizer="char", progress=False))
    x, y = BatchSampler(ds.split("train"), 2, 10, seed=0).next_batch()
    tok = ds.tokenizer()
    for row_x, row_y in zip(x, y, strict=True):
        assert tok.decode(row_x.tolist()) + tok.decode(row_y[-1:].tolist()) in text
    # the val split (300 tokens) is too short for context_length 300: the error names split, count, length
    with pytest.raises(ValueError, match=r"split val\.bin has 300 tokens, too few .* context_length \+ 1 = 301"):
        BatchSampler(ds.split("val"), 2, 300, seed=0)
    with pytest.raises(ValueError, match=r"split val\.bin has 300 tokens"):
        eval_batches(ds.split("val"), 2, 300)


def test_eval_batches_tile_small_splits_and_space_out_large_ones(tokens):
    batches = eval_batches(tokens[:1001], batch_size=4, context_length=100)
    xs = torch.cat([x for x, _ in batches])
    assert [len(x) for x, _ in batches] == [4, 4, 2]  # 10 non-overlapping windows cover 1000 targets
    assert xs[:, 0].tolist() == list(range(0, 1000, 100))
    assert torch.cat([y for _, y in batches]).flatten().tolist() == list(range(1, 1001))
    capped = eval_batches(tokens, batch_size=4, context_length=100, max_batches=2)
    starts = torch.cat([x for x, _ in capped])[:, 0].tolist()
    assert len(capped) == 2 and starts[0] == 0 and starts[-1] == (10_000 - 101) % 5000
    again = eval_batches(tokens, batch_size=4, context_length=100, max_batches=2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(capped, again, strict=True))
    with pytest.raises(ValueError, match="max_batches"):
        eval_batches(tokens, 4, 100, max_batches=0)


# --- CLI ---------------------------------------------------------------------------------------------------
def test_cli_prepare(tmp_path, capsys, data_dir):
    assert main(["prepare", "shakespeare_char", "--out", str(tmp_path / "sc"), "--quiet"]) == 0
    assert "train 1,003,854 tokens, val 111,540 tokens" in capsys.readouterr().out
    assert open_dataset(tmp_path / "sc").vocab_size == 65
    assert main(["prepare", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x")]) == 2
    assert "gpt2 prepare: error: input" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff" + b" ok" * 10)
    assert main(["prepare", str(bad), "--tokenizer", "char", "--out", str(tmp_path / "y"), "--quiet"]) == 2
    assert "byte offset 3" in capsys.readouterr().err
    for option in ("nan", "inf"):
        with pytest.raises(SystemExit):
            main(["prepare", str(bad), "--val-fraction", option, "--out", str(tmp_path / "z")])
        assert "is not a finite number" in capsys.readouterr().err
    assert main(["prepare", str(bad), "--tokenizer", "char", "--errors", "replace", "--out", str(tmp_path / "y"),
                 "--quiet"]) == 0



def test_cli_prepare_input_flag_folder_gpt2(tmp_path, capsys, data_dir):
    """The issue's form: gpt2 prepare --input SOME_FOLDER --tokenizer gpt2 --out DIR."""
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("Hello world.\n" * 50, encoding="utf-8")
    (folder / "sub" / "b.txt").write_text("Ünïcödé and 漢字 🙂\n" * 50, encoding="utf-8")
    out = tmp_path / "ds"
    assert main(["prepare", "--input", str(folder), "--tokenizer", "gpt2", "--out", str(out), "--quiet"]) == 0
    ds = open_dataset(out)
    assert ds.vocab_size == 50257 and ds.meta["tokens"]["train"] + ds.meta["tokens"]["val"] > 100
    assert main(["prepare", "--out", str(tmp_path / "none")]) == 2
    assert "no input" in capsys.readouterr().err


def test_disk_full_during_prepare_keeps_the_previous_dataset(tmp_path, monkeypatch, capsys):
    import errno

    import gpt2model.data as data

    src = tmp_path / "a.txt"
    src.write_text("To be, or not to be: that is the question.\n" * 20)
    out = prepare_dataset([src], tmp_path / "ds", tokenizer="char", progress=False)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data, "_encode_to_file", full_disk)
    assert main(["prepare", str(src), "--tokenizer", "gpt2", "--out", str(out), "--overwrite", "--quiet"]) == 1
    err = capsys.readouterr().err
    from gpt2model.fileio import mount_point

    assert f"no space left on {mount_point(out)} while writing {out / 'train.bin'}; what was there before is intact" \
        in err
    assert open_dataset(out).meta["tokenizer"]["type"] == "char"
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


@pytest.mark.parametrize("kind", ["gpt2", "char"])
def test_a_byte_order_mark_is_no_part_of_the_text(kind, tmp_path):
    """A UTF-8 BOM at the start of a file (Notepad writes one) marks the encoding: it was kept as a
    token (GPT-2: 3 byte tokens; char: a vocabulary entry) at the start of that document. Every
    file's BOM goes, a U+FEFF inside the text stays."""
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.txt").write_bytes(b"\xef\xbb\xbfHello there.\n")
    (corpus / "b.txt").write_bytes(b"\xef\xbb\xbfSecond \xef\xbb\xbf file.\n")
    ds = open_dataset(prepare_dataset([corpus], tmp_path / "out", tokenizer=kind, chunk_bytes=2,
                                      progress=False))
    text = ds.tokenizer().decode(_tokens(ds))
    sep = "<|endoftext|>" if kind == "gpt2" else ""
    assert text.replace(sep, "") == "Hello there.\nSecond \ufeff file.\n"
    assert sorted(s["bytes"] for s in ds.meta["sources"]) == [16, 20]  # the files, BOMs included


def test_inputs_that_are_all_inside_out_are_named_as_such(tmp_path):
    """`gpt2 prepare texts/ --out texts` (or a file inside --out) left every input out, as the dataset
    folder's own output, and then said "empty corpus: the inputs hold no text" about a folder full
    of text. Nothing is written and the texts stay."""
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("hello world\n" * 20)
    for inputs in ([tmp_path / "texts"], [tmp_path / "texts" / "a.txt"]):
        with pytest.raises(ValueError, match="every input is inside --out .*texts, the dataset folder being written"):
            prepare_dataset(inputs, tmp_path / "texts", tokenizer="char", progress=False, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "texts").iterdir()) == ["a.txt"]
    with pytest.raises(ValueError, match="empty corpus"):  # a truly empty input still says so
        (tmp_path / "empty.txt").write_text("")
        prepare_dataset([tmp_path / "empty.txt"], tmp_path / "out", tokenizer="char", progress=False)


def test_hidden_files_and_folders_inside_an_input_folder_are_skipped(tmp_path):
    """`gpt2 prepare notes/` read notes/.ipynb_checkpoints/a-checkpoint.txt (Jupyter's copy of a.txt)
    too, so the document went in twice (and could sit in both splits); a .venv/ inside a project
    folder added its packages' LICENSE.txt files. Hidden files and folders below an input folder
    are skipped, as HF datasets and Arrow skip them; a hidden input named directly is read."""
    notes = tmp_path / ".notes"  # the input folder itself may be hidden
    (notes / ".ipynb_checkpoints").mkdir(parents=True)
    (notes / "a.txt").write_text("alpha beta\n")
    (notes / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text("alpha beta\n")
    (notes / ".hidden.txt").write_text("gamma\n")
    ds = open_dataset(prepare_dataset([notes], tmp_path / "out", tokenizer="char", progress=False))
    assert [Path(s["path"]).name for s in ds.meta["sources"]] == ["a.txt"]
    assert ds.tokenizer().decode(_tokens(ds)) == "alpha beta\n"
    ds = open_dataset(prepare_dataset([notes, notes / ".hidden.txt"], tmp_path / "out2", tokenizer="char",
                                      progress=False))
    assert ds.tokenizer().decode(_tokens(ds)) == "alpha beta\ngamma\n"
    (notes / "a.txt").unlink()
    with pytest.raises(FileNotFoundError, match="only hidden ones, which are skipped"):
        prepare_dataset([notes], tmp_path / "out3", tokenizer="char", progress=False)


def test_a_broken_symbolic_link_in_an_input_folder_is_named(tmp_path):
    """A *.txt link whose target is gone was skipped silently: a document missing from the corpus."""
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("hello world\n" * 50)
    (tmp_path / "texts" / "b.txt").symlink_to(tmp_path / "gone.txt")
    with pytest.raises(FileNotFoundError, match=r"b.txt is a broken symbolic link \(to .*gone.txt, which does not "):
        prepare_dataset([tmp_path / "texts"], tmp_path / "ds", tokenizer="char", progress=False)


def test_special_tokens_with_a_char_tokenizer_is_refused(tmp_path):
    """`prepare --tokenizer char --special-tokens` ignored the option silently (a char vocabulary has none)."""
    (tmp_path / "a.txt").write_text("hello world\n" * 5)
    with pytest.raises(ValueError, match="--special-tokens reads .* but the char tokenizer has none; drop it"):
        prepare_dataset([tmp_path / "a.txt"], tmp_path / "ds", tokenizer="char", special_tokens=True, progress=False)
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("kind, extra", [("gpt2", {}), ("bpe", {"vocab_size": 260})])
def test_unknown_char_with_a_byte_level_tokenizer_is_refused(tmp_path, kind, extra):
    """`prepare --tokenizer gpt2 --unknown-char X` (or bpe) ignored the option silently."""
    (tmp_path / "a.txt").write_text("hello world\n" * 5)
    with pytest.raises(ValueError, match=f"--unknown-char only applies to a char tokenizer; {kind}'s"):
        prepare_dataset([tmp_path / "a.txt"], tmp_path / "ds", tokenizer=kind, unknown_char="?", progress=False,
                        **extra)
    assert not (tmp_path / "ds").exists()


def test_out_dot_is_refused_naming_why(tmp_path, monkeypatch):
    """`cd ds && gpt2 prepare ../a.txt --out .` failed with "PosixPath('.') has an empty name"; written
    there, the swap of the finished folder into place would leave the shell in a deleted folder
    (the next `gpt2 train --data .` then finds nothing). One error says so and what to pass."""
    (tmp_path / "a.txt").write_text("hello world\n" * 5)
    (tmp_path / "ds" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "ds" / "sub")
    for out in (".", "./", "..", tmp_path / "ds"):
        with pytest.raises(ValueError, match="is the current folder \\(or holds it\\).*e.g. --out a$"):
            prepare_dataset([tmp_path / "a.txt"], out, tokenizer="char", progress=False, overwrite=True)
    assert prepare_dataset([tmp_path / "a.txt"], "a", tokenizer="char", progress=False) == Path("a")


def test_special_token_strings_in_the_text_are_reported(tmp_path):
    """"<|endoftext|>" written in a file (documents joined by it in one file, as for HF's run_clm,
    which reads it as the token) became 7 ordinary tokens without a word: prepare now warns with
    the counts. A text without them prepares silently."""
    import warnings

    (tmp_path / "joined.txt").write_text("doc one<|endoftext|>doc two<|endoftext|>three\n")
    with pytest.warns(UserWarning, match=r"encoded as ordinary text.*'<\|endoftext\|>' \(2x\)\. Separate documents"):
        ds = open_dataset(prepare_dataset([tmp_path / "joined.txt"], tmp_path / "a", tokenizer="gpt2", progress=False,
                                          val_fraction=0.3))
    assert ds.tokenizer().eot not in _tokens(ds).tolist()  # still text (the documented rule)
    (tmp_path / "plain.txt").write_text("doc one. doc two. three\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_dataset([tmp_path / "plain.txt"], tmp_path / "b", tokenizer="gpt2", progress=False, val_fraction=0.3)


@pytest.mark.filterwarnings("ignore:.*no whitespace in")  # the forced cuts, on purpose
def test_special_tokens_option_reads_them_as_hf_tokenizer_does(tmp_path, data_dir, capsys):
    """A ChatML fine-tune's data (TRL's setup_chat_format adds <|im_start|>/<|im_end|> as special
    tokens): HF's tokenizer reads "<|im_start|>" written in the text as one token, as `gpt2 serve`
    writes the chat template. prepare could only encode it as 7 ordinary tokens, so the model
    never learned to end a turn with <|im_end|>; --special-tokens reads them as HF does: ids equal
    to HF's encode of each file, eot between files, also where a long stretch without whitespace
    forces a chunk cut next to a special token."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2TokenizerFast(str(data_dir / "gpt2" / "encoder.json"), str(data_dir / "gpt2" / "vocab.bpe"))
    hf.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    hf.save_pretrained(str(tmp_path / "chatml"))
    chat = "".join(f"<|im_start|>user\nHi {i}, how are you?<|im_end|>\n<|im_start|>assistant\nFine, thanks "
                   f"{i}!<|im_end|>\n" for i in range(40))
    texts = [chat, "x" * 40 + "<|im_start|>" + "y" * 57 + "<|im_end|>" + "<|endoftext|>" * 3 + "z" * 30 + "\n" + chat]
    for i, text in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(text)
    expected = hf.encode(texts[0]) + [50256] + hf.encode(texts[1])
    assert expected.count(50257) == 161 and expected.count(50256) == 4  # HF read them as tokens
    files = [tmp_path / "0.txt", tmp_path / "1.txt"]
    for chunk_bytes in (1 << 20, 4, 7):  # 4, 7: forced cuts inside the 'x'/'y'/'z' stretches
        ds = open_dataset(prepare_dataset(files, tmp_path / f"ds{chunk_bytes}", tokenizer=str(tmp_path / "chatml"),
                                          progress=False, special_tokens=True, chunk_bytes=chunk_bytes))
        assert _tokens(ds).tolist() == expected, chunk_bytes
    assert ds.meta["special_tokens"] == "read as tokens"
    assert main(["prepare", *map(str, files), "--out", str(tmp_path / "cli"), "--tokenizer", str(tmp_path / "chatml"),
                 "--special-tokens", "--quiet"]) == 0
    assert _tokens(open_dataset(tmp_path / "cli")).tolist() == expected
    with pytest.warns(UserWarning, match="prepare does with --special-tokens"):  # the default: text, as before
        ds = open_dataset(prepare_dataset(files, tmp_path / "text", tokenizer=str(tmp_path / "chatml"), progress=False))
    assert 50257 not in _tokens(ds).tolist() and ds.meta["special_tokens"] == "text"


def test_prepare_with_a_hf_model_folder_without_tokenizer_files_uses_gpt2s(tmp_path):
    """A GPT-2 folder downloaded by hand (config.json + model.safetensors, as the hub error message
    suggests) samples, evaluates and fine-tunes with OpenAI's GPT-2 tokenizer, but `prepare
    --tokenizer FOLDER` said "has no tokenizer". Now the same rule: GPT-2's vocabulary size or more
    means GPT-2's BPE; a smaller vocabulary still needs the tokenizer files."""
    (tmp_path / "a.txt").write_text("To be, or not to be: that is the question.\n" * 20)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 50257}))
    ds = open_dataset(prepare_dataset([tmp_path / "a.txt"], tmp_path / "ds", tokenizer=str(tmp_path / "hf"),
                                      progress=False))
    assert _tokens(ds).tolist() == GPT2Tokenizer().encode((tmp_path / "a.txt").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 65}))
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        prepare_dataset([tmp_path / "a.txt"], tmp_path / "ds2", tokenizer=str(tmp_path / "hf"), progress=False)


def test_a_forced_cut_never_falls_inside_a_special_token_string():
    """The end of a chunk that begins a special-token string (read as a token with --special-tokens)
    moves to the next chunk, never more than the chunk minus one character (a cut at or before its
    start would yield nothing and keep the whole text)."""
    from gpt2model.data import _partial_suffix

    specials = ["<|im_start|>", "<|a_very_long_special_token|>"]
    assert _partial_suffix("abc<|im_", specials) == 5 and _partial_suffix("abc<|im_start|>", specials) == 0
    assert _partial_suffix("x<|a_very_long_spec", specials) == 18  # a long special token, a short chunk
    assert _partial_suffix("<|a_very_long", specials) == 0 and _partial_suffix("<", specials) == 0
    assert _partial_suffix("abc<", []) == 0
