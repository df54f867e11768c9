"""Evaluation: loss / perplexity / bits per byte against plain cross-entropy and against the HF
perplexity guide's strided loop written independently with the HF model."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from gpt2model import GPT, GPTconfig
from gpt2model.evaluate import evaluate, sliding_windows

CFG = GPTconfig(context_length=32, vocab_size=60, n_layer=2, n_head=2, d_model=32)


def make_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CFG).eval()


def random_ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


class ByteDecoder:
    def decode(self, ids) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_short_text_perplexity_is_exp_of_plain_cross_entropy() -> None:
    model = make_model()
    ids = random_ids(20)
    with torch.no_grad():
        logits = model(ids[None])[0]
    ce = F.cross_entropy(logits[:-1], ids[1:]).item()
    r = evaluate(model, ids.tolist())
    assert r.num_tokens == 19
    assert math.isclose(r.loss, ce, rel_tol=1e-6)
    assert math.isclose(r.perplexity, math.exp(ce), rel_tol=1e-6)
    assert r.bits_per_byte is None
    # Bits per byte: total bits over the bytes of the scored text (one byte per id here).
    r = evaluate(model, ids, tokenizer=ByteDecoder())
    assert r.num_bytes == len(bytes(ids[1:].tolist()).decode("utf-8", errors="replace").encode())
    assert math.isclose(r.bits_per_byte, ce * 19 / math.log(2) / r.num_bytes, rel_tol=1e-6)


def hf_guide_nll(hf_model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """The loop from HF's perplexity guide, with exact token counts: (total nll, tokens scored)."""
    seq_len = ids.size(0)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = ids[None, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf_model(input_ids, labels=target_ids).loss
        num_loss_tokens = int((target_ids[:, 1:] != -100).sum())  # HF shifts labels inside
        nll_sum += loss.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum, n_tokens


@pytest.mark.parametrize("n, stride", [(200, 12), (200, 32), (97, 5), (33, 16)])
def test_strided_evaluation_matches_the_hf_guide_loop(tmp_path, n: int, stride: int) -> None:
    transformers = pytest.importorskip("transformers")
    model = make_model()
    model.save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = random_ids(n)
    nll, count = hf_guide_nll(hf, ids, CFG.context_length, stride)
    for batch_size in (1, 3):
        r = evaluate(model, ids, stride=stride, batch_size=batch_size)
        # Disjoint windows (stride == context) cannot predict each window's first token.
        assert r.num_tokens == count == (n - 1 if stride < CFG.context_length else n - 1 - (n - 1) // stride)
        assert math.isclose(r.loss, nll / count, rel_tol=1e-5)
        assert math.isclose(r.perplexity, math.exp(nll / count), rel_tol=1e-5)


def test_windows_score_every_token_once() -> None:
    for n, C, stride in [(2, 4, 4), (100, 16, 16), (100, 16, 5), (100, 16, 1), (17, 16, 8)]:
        scored = []
        for begin, end, first in sliding_windows(n, C, stride):
            assert 0 <= begin < first <= end <= n and end - begin <= C
            scored += range(first, end)
        skipped = set(range(C, n, C)) if stride == C else set()  # each disjoint window's first token
        assert scored == [i for i in range(1, n) if i not in skipped]


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(ids=[3]), "at least 2 tokens"),
    (dict(stride=0), "stride must be in"),
    (dict(stride=33), "stride must be in"),
    (dict(ids=[1, 60]), "token id 60 is out of range"),
    (dict(ids=[[1, 2]]), "1-D sequence"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_input(kwargs: dict, fragment: str) -> None:
    args = dict(ids=[1, 2, 3]) | kwargs
    with pytest.raises(ValueError, match=fragment):
        evaluate(make_model(), **args)


def test_eval_cli_on_a_text_file(tmp_path, capsys) -> None:
    from gpt2model.cli import main
    from gpt2model.tokenizer import CharTokenizer

    text = "to be or not to be, that is the question\n" * 5
    tok = CharTokenizer.from_text(text)
    torch.manual_seed(0)
    model = GPT(GPTconfig(context_length=32, vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16))
    model.save_pretrained(tmp_path / "m", tokenizer=tok)
    (tmp_path / "t.txt").write_text(text)
    rc = main(["eval", "--model", str(tmp_path / "m"), "--text", str(tmp_path / "t.txt"), "--stride", "8",
               "--json", str(tmp_path / "r.json"), "--no-progress", "--device", "cpu"])
    assert rc == 0
    result = json.loads((tmp_path / "r.json").read_text())
    expected = evaluate(model.eval(), tok.encode(text), stride=8, tokenizer=tok)
    assert math.isclose(result["loss"], expected.loss, rel_tol=1e-6)
    assert result["num_bytes"] == len(text) - 1  # ASCII: one byte per scored character
    assert math.isclose(result["bits_per_byte"], expected.loss / math.log(2), rel_tol=1e-6)
    assert "perplexity" in capsys.readouterr().out
    # Errors are one line and exit code 2.
    assert main(["eval", "--model", str(tmp_path / "m"), "--text", str(tmp_path / "missing.txt"),
                 "--device", "cpu"]) == 2


def test_eval_cli_on_a_dataset_split(tmp_path, capsys) -> None:
    from gpt2model.cli import main
    from gpt2model.data import open_dataset, prepare_dataset

    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 20)
    ds_dir = prepare_dataset([tmp_path / "a.txt"], tmp_path / "ds", tokenizer="char", progress=False)
    ds = open_dataset(ds_dir)
    tok = ds.tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTconfig(context_length=16, vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16))
    model.save_pretrained(tmp_path / "m", tokenizer=tok)
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(ds_dir), "--split", "val",
                 "--json", str(tmp_path / "r.json"), "--no-progress", "--device", "cpu"]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    val = torch.as_tensor(ds.split("val").astype("int64"))
    assert math.isclose(result["loss"], evaluate(model.eval(), val).loss, rel_tol=1e-6)
    assert result["num_tokens"] == len(val) - 1
    assert "(val)" in capsys.readouterr().out


def test_bits_per_byte_counts_the_bytes_of_the_scored_tokens_only() -> None:
    """stride == context_length leaves each window's first token unscored; its bytes counted all the
    same, so bits per byte read low (here by 1/4: context 4). Multi-byte tokens count their bytes."""
    from gpt2model.tokenizer import CharTokenizer

    text = "héllo wörld, ünïcode " * 6
    tok = CharTokenizer.from_text(text)
    torch.manual_seed(0)
    model = GPT(GPTconfig(context_length=4, vocab_size=tok.vocab_size, n_layer=1, n_head=1, d_model=8)).eval()
    ids = tok.encode(text)
    for stride in (4, 2):
        r = evaluate(model, ids, stride=stride, tokenizer=tok)
        scored = {i for _, e, first in sliding_windows(len(ids), 4, stride) for i in range(first, e)}
        assert r.num_tokens == len(scored)
        assert r.num_bytes == sum(len(tok.decode([ids[i]]).encode()) for i in scored)
        assert math.isclose(r.bits_per_byte, r.loss * r.num_tokens / math.log(2) / r.num_bytes, rel_tol=1e-9)
    assert r.num_bytes == len(text[1:].encode())  # stride < context: every token after the first
