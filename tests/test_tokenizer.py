"""Tokenizers against independent references: nanoGPT's char vocabulary rule, tiktoken's own
``get_encoding("gpt2")`` registry path, and HF transformers' GPT-2 tokenizer."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import gpt2model
from gpt2model.tokenizer import BPETokenizer, CharTokenizer, GPT2Tokenizer, load_tokenizer

# Text that stresses byte-level BPE: accents (composed and combining), CJK, emoji (ZWJ sequences,
# skin tones, flags), RTL scripts, code, whitespace runs, CRLF, tabs, NBSP, U+2028, digits, and the
# literal special-token string.
MIXED = (
    "Héllo wörld, naïve café — déjà vu. e\u0301 vs \u00e9\n"
    "日本語のテキスト、中文字符和한국어 텍스트。\n"
    "Emoji: 🎉👍🏽 👩‍👩‍👧‍👦 🇫🇷 ✨\r\n"
    "Ελληνικά, русский, עברית, العربية\n"
    "def f(x):\n\treturn {'a': [1, 2, 3]}  # comment\n"
    "    indented    with   runs     of  spaces   \n\n\n\t\t\ttabs\r\n\r\n"
    "\u00a0non-breaking\u00a0space\u2028line separator 12345678901234567890 3.14159\n"
    "it's we'll they're I'd <|endoftext|> end\n   "
)


@pytest.fixture(scope="module")
def data_root() -> Path:
    """Module-scoped twin of conftest's ``data_dir`` (skips when the data files are absent)."""
    d = Path(os.environ.get("GPT2MODEL_DATA", ""))
    if not (d / "gpt2" / "vocab.bpe").is_file() or not (d / "tinyshakespeare" / "input.txt").is_file():
        pytest.skip("data files not found: set GPT2MODEL_DATA to a folder like ../shared/data")
    return d


@pytest.fixture(scope="module")
def tiktoken_gpt2(tmp_path_factory, data_root):
    """The reference: tiktoken.get_encoding("gpt2") through tiktoken's own registry, fed offline by
    placing the two files under the cache names tiktoken derives from its download URLs."""
    import tiktoken
    import tiktoken_ext.openai_public as openai_public

    source = Path(openai_public.__file__).read_text()
    urls = dict(re.findall(r'(vocab_bpe_file|encoder_json_file)="(https://[^"]+/gpt-2/[^"]+)"', source))
    cache = tmp_path_factory.mktemp("tiktoken_cache")
    for key, name in (("vocab_bpe_file", "vocab.bpe"), ("encoder_json_file", "encoder.json")):
        shutil.copy(data_root / "gpt2" / name, cache / hashlib.sha1(urls[key].encode()).hexdigest())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        enc = tiktoken.get_encoding("gpt2")
    assert enc.n_vocab == 50257
    return enc


@pytest.fixture(scope="module")
def trained_bpe(data_root) -> BPETokenizer:
    text = (data_root / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    return BPETokenizer.train([text[i:i + 100_000] for i in range(0, len(text), 100_000)], vocab_size=600)


# --- char ---------------------------------------------------------------------------------------------
def test_char_tiny_shakespeare_matches_nanogpt(shakespeare_text, tmp_path):
    tok = CharTokenizer.from_text(shakespeare_text)
    assert tok.vocab_size == 65
    assert tok.chars == "".join(sorted(set(shakespeare_text)))  # nanoGPT's shakespeare_char rule
    assert tok.chars == "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    stoi = {ch: i for i, ch in enumerate(sorted(set(shakespeare_text)))}  # nanoGPT's prepare.py
    ids = tok.encode(shakespeare_text)
    assert ids[:1000] == [stoi[c] for c in shakespeare_text[:1000]]
    assert tok.decode(ids) == shakespeare_text
    # streamed construction gives the same vocabulary
    chunks = (shakespeare_text[i:i + 4096] for i in range(0, len(shakespeare_text), 4096))
    assert CharTokenizer.from_text(chunks).chars == tok.chars
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path).encode("ROMEO:\nO") == tok.encode("ROMEO:\nO")


def test_char_unknown_characters_error_names_them():
    tok = CharTokenizer.from_text("hello world")
    with pytest.raises(ValueError, match=r"2 character\(s\) not in the 8-character vocabulary.*'X'.*'é'"):
        tok.encode("hello Xé")
    replacing = CharTokenizer.from_text("hello world", unknown=" ")
    assert replacing.decode(replacing.encode("hello Xé")) == "hello   "
    with pytest.raises(ValueError, match="not in the vocabulary"):
        CharTokenizer.from_text("abc", unknown="z")
    with pytest.raises(ValueError, match="outside the character vocabulary"):
        tok.decode([0, 99])


def test_a_saved_char_tokenizer_is_the_same_tokenizer_for_transformers(tmp_path):
    """AutoTokenizer on a char model's folder (config.json says gpt2) built an empty GPT-2 tokenizer
    that encoded every text to [] without a word; now it reads our tokenizer.json: same ids, same text."""
    transformers = pytest.importorskip("transformers")
    from gpt2model import GPT, GPTconfig

    text = "Hello, World!\r\n\n   tabs\tend e\u0301 \U0001F468\u200d\U0001F469 12345 <|endoftext|>"
    tok = CharTokenizer.from_text(text, unknown="!")
    GPT(GPTconfig(context_length=8, vocab_size=tok.vocab_size, n_layer=1, n_head=1, d_model=8)).save_pretrained(
        tmp_path, tokenizer=tok)
    assert isinstance(load_tokenizer(tmp_path), CharTokenizer)  # ours still reads its spec first
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(hf) == tok.vocab_size
    for s in (text, text[::-1], "  \n\n", "e\u0301\u0301", "qyz!"):  # q, y, z: mapped to the unknown character
        assert hf.encode(s) == tok.encode(s)
        assert hf.decode(tok.encode(s)) == tok.decode(tok.encode(s))
    CharTokenizer("a\udc80").save(tmp_path / "surrogate")  # (no HF files for it, and no crash)
    assert isinstance(load_tokenizer(tmp_path / "surrogate"), CharTokenizer)
    # Another tokenizer saved over it: transformers must not read the char tokenizer's files left there
    gpt2 = load_tokenizer("gpt2")
    GPT(GPTconfig(context_length=8, vocab_size=50257, n_layer=1, n_head=1, d_model=8)).save_pretrained(
        tmp_path, tokenizer=gpt2)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.encode(text) == gpt2.encode(text, allowed_special="all")
    CharTokenizer.from_text(text).save(tmp_path)
    bpe = BPETokenizer.train([text * 3], 300)
    bpe.save(tmp_path)
    assert not (tmp_path / "tokenizer_config.json").exists()  # it held only the char tokenizer's class
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.encode(text) == bpe.encode(text, allowed_special="all")


def test_char_mixed_script_round_trip():
    tok = CharTokenizer.from_text(MIXED)
    assert tok.decode(tok.encode(MIXED)) == MIXED
    assert [a.tolist() for a in tok.encode_batch([MIXED[:50], MIXED[50:]])] == [tok.encode(MIXED[:50]),
                                                                                tok.encode(MIXED[50:])]


# --- gpt2 ---------------------------------------------------------------------------------------------
def test_gpt2_equals_tiktoken_on_tiny_shakespeare(tiktoken_gpt2, shakespeare_text):
    tok = gpt2model.load_tokenizer("gpt2")
    ids = tok.encode(shakespeare_text)
    assert len(ids) == 338_025
    assert ids == tiktoken_gpt2.encode(shakespeare_text)
    assert tok.decode(ids) == shakespeare_text
    assert (tok.vocab_size, tok.eot) == (50257, 50256)
    assert tok.encode("Hello world") == [15496, 995]


def test_gpt2_equals_tiktoken_on_mixed_text(tiktoken_gpt2):
    tok = GPT2Tokenizer()
    for text in (MIXED, MIXED * 3, " " * 17 + "\n" * 5 + "\t \r\n" * 4, "", "\x00\x7f\ufffd\U0010ffff"):
        ids = tok.encode(text)
        assert ids == tiktoken_gpt2.encode(text, disallowed_special=())
        assert tok.decode(ids) == text
    # The literal special-token string is ordinary text: user input can't inject the eot id.
    assert tok.encode("<|endoftext|>") == tiktoken_gpt2.encode("<|endoftext|>", disallowed_special=())
    assert tok.eot not in tok.encode(MIXED)
    assert tok.decode([tok.eot]) == "<|endoftext|>"
    batch = tok.encode_batch([MIXED, "abc", ""])
    assert [a.dtype for a in batch] == [np.uint32] * 3
    assert [a.tolist() for a in batch] == [tok.encode(MIXED), tok.encode("abc"), []]


def test_token_bytes_join_to_the_texts_bytes_and_bad_ids_are_value_errors(tiktoken_gpt2, trained_bpe):
    """``token_bytes`` (the server's chat-logprob ``bytes``) gives each token's own bytes, also for
    tokens holding part of a character; the bytes of an encoding join to the text's UTF-8."""
    gpt2 = GPT2Tokenizer()
    for tok in (gpt2, trained_bpe, CharTokenizer(MIXED)):
        ids = tok.encode(MIXED)
        assert b"".join(tok.token_bytes(i) for i in ids) == MIXED.encode("utf-8")
    assert [gpt2.token_bytes(i) for i in gpt2.encode(MIXED)] == [tiktoken_gpt2.decode_single_token_bytes(i)
                                                                  for i in gpt2.encode(MIXED)]
    assert gpt2.token_bytes(gpt2.eot) == trained_bpe.token_bytes(trained_bpe.eot) == b"<|endoftext|>"
    for tok in (gpt2, trained_bpe):
        with pytest.raises(ValueError, match="outside"):
            tok.token_bytes(tok.vocab_size)
    # decode of ids outside the vocabulary: a ValueError naming them (tiktoken raised KeyError/OverflowError,
    # HF's BPE dropped them silently, the char tokenizer read -1 as its last character)
    for tok in (gpt2, trained_bpe, CharTokenizer("abc")):
        for bad in ([tok.vocab_size], [-1], [1, 10**20]):
            with pytest.raises(ValueError, match=r"are outside (the|this) .*vocabulary"):
                tok.decode(bad)


def test_lone_surrogates_encode_as_tiktoken_encodes_them(tiktoken_gpt2, trained_bpe):
    """A str with lone surrogates (a JSON "\\ud800", undecodable bytes in a command-line argument,
    which Python keeps as U+DC80-U+DCFF): tiktoken's encode reads each as U+FFFD; our BPE raised
    HF's TypeError ("TextInputSequence must be str") and GPT-2's encode_batch a UnicodeEncodeError."""
    text = "a\ud800b \udcff\ud83d\ude00 end"  # two lone surrogates, and a pair that is one emoji
    same = "a\ufffdb \ufffd\U0001f600 end"
    gpt2 = GPT2Tokenizer()
    assert gpt2.encode(text) == tiktoken_gpt2.encode(text) == gpt2.encode(same)
    assert [a.tolist() for a in gpt2.encode_batch([text, "x"])] == [gpt2.encode(same), gpt2.encode("x")]
    assert trained_bpe.encode(text) == trained_bpe.encode(same)
    assert trained_bpe.encode(text, allowed_special="all") == trained_bpe.encode(same)
    assert [a.tolist() for a in trained_bpe.encode_batch([text])] == [trained_bpe.encode(same)]


def test_allowed_special_reads_endoftext_as_tiktoken_does(tiktoken_gpt2, trained_bpe):
    """tiktoken's ``allowed_special``: "<|endoftext|>" in the text becomes the end-of-text id (the
    default stays: ordinary text). The trained BPE splits the same way (HF tokenizers with its
    special token enabled)."""
    gpt2 = GPT2Tokenizer()
    for text in ("a<|endoftext|>b", "<|endoftext|>", " x <|endoftext|><|endoftext|>\n<|endoftext", MIXED):
        for allowed in ("all", {"<|endoftext|>"}):
            assert gpt2.encode(text, allowed_special=allowed) == tiktoken_gpt2.encode(text, allowed_special=allowed)
        assert gpt2.encode(text, allowed_special=set()) == gpt2.encode(text) == tiktoken_gpt2.encode_ordinary(text)
        ids = trained_bpe.encode(text, allowed_special="all")
        assert ids.count(trained_bpe.eot) == text.count("<|endoftext|>")
        assert trained_bpe.decode(ids) == text
    with pytest.raises(ValueError, match="allowed_special must be"):
        gpt2.encode("x", allowed_special="none")
    assert CharTokenizer("ab").encode("ab", allowed_special="all") == [0, 1]


def test_gpt2_save_load_and_hf_folders(tmp_path, data_dir):
    tok = GPT2Tokenizer()
    tok.save(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "tokenizer_spec.json").read_text())["type"] == "gpt2"
    assert load_tokenizer(tmp_path / "ours").encode(MIXED) == tok.encode(MIXED)
    # A HF GPT-2 folder (vocab.json + merges.txt, no spec of ours) loads as GPT-2 BPE.
    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy(data_dir / "gpt2" / "encoder.json", hf / "vocab.json")
    shutil.copy(data_dir / "gpt2" / "vocab.bpe", hf / "merges.txt")
    loaded = load_tokenizer(hf)
    assert isinstance(loaded, GPT2Tokenizer) and loaded.encode(MIXED) == tok.encode(MIXED)
    # ... and HF transformers reads the folder we saved, giving the same ids.
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path / "ours"))
    assert hf_tok(MIXED.replace("<|endoftext|>", ""))["input_ids"] == tok.encode(MIXED.replace("<|endoftext|>", ""))


def test_a_hf_folder_with_tokens_added_to_gpt2_loads_them_and_reads_them_as_hf_does(tmp_path, data_dir):
    """A GPT-2 fine-tune with an added pad token (HF: add_special_tokens + resize_token_embeddings),
    saved by transformers 4 as the hub's GPT-2 repos are laid out: vocab.json + merges.txt with
    GPT-2's 50,257 ids and tokenizer.json with the added one too. Reading vocab.json alone gave a
    tokenizer that could not decode id 50257 of the 50,258-row model."""
    transformers = pytest.importorskip("transformers")
    GPT2Tokenizer().save(tmp_path / "ours")
    for name, added in (("tuned", True), ("plain", False)):
        hf = transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path / "ours"))
        if added:
            hf.add_special_tokens({"pad_token": "[PAD]"})
        hf.save_pretrained(str(tmp_path / name))  # transformers 5 writes tokenizer.json only
        shutil.copy(data_dir / "gpt2" / "encoder.json", tmp_path / name / "vocab.json")
        shutil.copy(data_dir / "gpt2" / "vocab.bpe", tmp_path / name / "merges.txt")
    tok = load_tokenizer(tmp_path / "tuned")
    assert tok.vocab_size == 50258 and tok.eot == 50256
    assert tok.decode([15496, 50257]) == "Hello[PAD]" and tok.encode(MIXED) == GPT2Tokenizer().encode(MIXED)
    assert isinstance(load_tokenizer(tmp_path / "plain"), GPT2Tokenizer)  # nothing added: tiktoken, as before
    # Its special tokens: text by default, tokens (as HF reads them) with allowed_special="all"
    assert tok.special_tokens == {"<|endoftext|>": 50256, "[PAD]": 50257}
    hf = transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path / "tuned"))
    for text in ("a[PAD]b<|endoftext|> [PAD][PAD]", "[PAD", " <|endoftext|>[PAD]\n"):
        assert tok.encode(text, allowed_special="all") == hf(text)["input_ids"], text
        assert tok.encode(text) == GPT2Tokenizer().encode(text)
    assert tok.encode("a[PAD]<|endoftext|>", allowed_special={"[PAD]"}) == [64, 50257] + GPT2Tokenizer().encode(
        "<|endoftext|>")
    assert tok.token_bytes(50257) == b"[PAD]"


def test_a_hf_folder_of_a_gpt2_with_its_own_bpe_loads_as_transformers_reads_it(tmp_path, data_dir):
    """A GPT-2 trained from scratch with its own byte-level BPE, its tokenizer saved as HF's
    vocab.json + merges.txt (ByteLevelBPETokenizer.save_model; transformers' GPT2TokenizerFast reads
    that folder): refused as "not a valid GPT-2 vocab.json + merges pair" (tiktoken's reader wants
    OpenAI's id layout), and so was the same folder with a tokenizer.json beside it."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import ByteLevelBPETokenizer

    from gpt2model.export import tokenizer_vocab

    text = (data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:200_000]
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator([text], vocab_size=700, special_tokens=["<|endoftext|>"])
    folder = tmp_path / "own"
    folder.mkdir()
    trainer.save_model(str(folder))
    vocab = json.loads((folder / "vocab.json").read_text())
    ref = transformers.GPT2TokenizerFast(str(folder / "vocab.json"), str(folder / "merges.txt"))
    plain = MIXED.replace("<|endoftext|>", "")
    tok = load_tokenizer(folder)
    assert tok.vocab_size == len(vocab) == len(ref) and tok.eot == vocab["<|endoftext|>"] == ref.eos_token_id
    assert tok.encode(plain) == ref.encode(plain) and tok.decode(tok.encode(MIXED)) == MIXED
    assert tok.encode(MIXED, allowed_special="all") == ref.encode(MIXED)  # reads <|endoftext|> as HF does
    assert tok.eot not in tok.encode(MIXED)  # ... and by default it is text, our rule
    tokens, _, merges = tokenizer_vocab(folder, tok, tok.vocab_size)  # GGUF export needs no tokenizer.json
    assert tokens[:3] == [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])][:3] and merges
    ref.save_pretrained(str(tmp_path / "with_json"))  # transformers 5 writes tokenizer.json
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(folder / name, tmp_path / "with_json" / name)
    assert load_tokenizer(tmp_path / "with_json").encode(plain) == ref.encode(plain)
    # A slow-tokenizer folder's added_tokens.json (a pad token added after training) is read too.
    (folder / "added_tokens.json").write_text(json.dumps({"<pad>": len(vocab)}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<pad>"}}))
    padded = load_tokenizer(folder)
    assert padded.vocab_size == len(vocab) + 1 and padded.decode([len(vocab)]) == "<pad>"
    assert padded.special_tokens == {"<|endoftext|>": tok.eot, "<pad>": len(vocab)}
    assert padded.encode("a<pad>", allowed_special="all")[-1] == len(vocab) != padded.encode("a<pad>")[-1]
    (folder / "added_tokens.json").write_text(json.dumps({"<pad>": len(vocab) + 5}))
    with pytest.raises(ValueError, match="do not continue the vocabulary"):
        load_tokenizer(folder)


def test_a_tokenizer_json_that_is_not_a_byte_level_bpe_is_refused_by_name(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    wordpiece.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="WordPiece model .* not a byte-level BPE"):
        load_tokenizer(tmp_path)  # was loaded, then token_bytes (streaming, the server) raised KeyError


def test_added_tokens_bytes_follow_hfs_byte_level_decoder(tmp_path):
    """Tokens added to GPT-2's vocabulary whose text is not in the byte alphabet (a space in
    "héllo wörld") made token_bytes raise KeyError (streaming text, the server's logprobs); a
    special token with a non-ASCII character ("<|é|>") got bytes other than those decode gives.
    Now token_bytes follows HF's ByteLevel decoder, so streamed text == decode == HF's decode."""
    transformers = pytest.importorskip("transformers")
    from gpt2model.generate import TextStream

    GPT2Tokenizer().save(tmp_path / "base")
    hf = transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path / "base"))
    hf.add_tokens(["héllo wörld", "ünï"])
    hf.add_special_tokens({"additional_special_tokens": ["<|é|>"]})
    hf.save_pretrained(str(tmp_path / "added"))
    tok = load_tokenizer(tmp_path / "added")
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids = [int(i) for i in rng.choice([*range(50256, 50260), *rng.integers(0, 50256, 6)], size=8)]
        text = b"".join(tok.token_bytes(i) for i in ids).decode("utf-8", errors="replace")
        stream = TextStream(tok)
        streamed = "".join(stream.push(i) for i in ids) + stream.flush()
        assert text == streamed == tok.decode(ids) == hf.decode(ids), ids


# --- trained BPE --------------------------------------------------------------------------------------
def test_trained_bpe_vocab_size_and_exact_round_trip(trained_bpe, tmp_path):
    tok = trained_bpe
    assert tok.vocab_size == 600
    assert tok.eot == 0 and tok.decode([tok.eot]) == "<|endoftext|>"
    for text in (MIXED, "", "   \n\n\t", "ROMEO:\nWhat, ho! apothecary!\n"):
        assert tok.decode(tok.encode(text)) == text
    assert tok.eot not in tok.encode(MIXED)  # literal "<|endoftext|>" is ordinary text
    # It learned merges: fewer tokens than bytes on in-domain text.
    sample = "KING HENRY VI:\nWhat say you, my lord, to this?\n"
    assert len(tok.encode(sample)) < len(sample.encode()) / 2
    assert [a.tolist() for a in tok.encode_batch([MIXED, sample])] == [tok.encode(MIXED), tok.encode(sample)]
    tok.save(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, BPETokenizer) and loaded.encode(MIXED) == tok.encode(MIXED)


def test_bpe_rejects_too_small_vocab():
    with pytest.raises(ValueError, match="at least"):
        BPETokenizer.train(["abc"], vocab_size=100)


# --- load_tokenizer errors ------------------------------------------------------------------------------
def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer folder"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_spec.json").write_text('{"type": "wordpiece"}')
    with pytest.raises(ValueError, match="unknown tokenizer type 'wordpiece'"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_spec.json").write_text('{"type": "char", "chars": "abc"')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_spec.json").write_text('{"type": "char", "chars": "abc", "vocab_size": 4}')
    with pytest.raises(ValueError, match="inconsistent"):
        load_tokenizer(tmp_path)
    # were AttributeError / KeyError / TypeError tracebacks
    (tmp_path / "tokenizer_spec.json").write_text('["char"]')
    with pytest.raises(ValueError, match="holds a JSON list, not a tokenizer spec object"):
        load_tokenizer(tmp_path)
    for spec in ('{"type": "char"}', '{"type": "char", "chars": 5}'):
        (tmp_path / "tokenizer_spec.json").write_text(spec)
        with pytest.raises(ValueError, match="a char tokenizer spec needs 'chars'"):
            load_tokenizer(tmp_path)
