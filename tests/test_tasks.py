"""Zero-shot tasks: log-likelihoods against separate plain forwards, lm-eval's own window / text
functions, oracle models with known answers, the data files' errors, and (slow) lm-eval's ``hf``
model on the same saved folder and fixtures."""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gpt2model import GPT, GPTconfig
from gpt2model.evaluate import loglikelihoods, rolling_windows
from gpt2model.tasks import (
    TASKS,
    encode_pair,
    hellaswag_preprocess,
    mean_stderr,
    run_task,
    run_tasks,
    wikitext_detokenize,
    wikitext_pages,
)
from gpt2model.tokenizer import encode_as_hf

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tasks"
MC_FILE = FIXTURES / "multiple_choice.jsonl"
SMALL = GPTconfig(context_length=24, vocab_size=50, n_layer=2, n_head=2, d_model=32)


@pytest.fixture
def fixtures_data(monkeypatch) -> Path:
    monkeypatch.setenv("GPT2MODEL_DATA", str(FIXTURES))
    return FIXTURES


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    from gpt2model.tokenizer import load_tokenizer

    try:
        return load_tokenizer("gpt2")
    except FileNotFoundError as e:
        pytest.skip(f"GPT-2 BPE files not found ({e})")


@pytest.fixture(scope="module")
def tiny_gpt2() -> GPT:
    """A small random model over GPT-2's vocabulary, with a short context so that the fixtures
    exercise truncation and rolling windows."""
    torch.manual_seed(0)
    return GPT(GPTconfig(context_length=64, vocab_size=50257, n_layer=2, n_head=2, d_model=32)).eval()


def direct(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """One plain forward per continuation, as lm-eval's hf model reads it."""
    C = model.config.context_length
    inp = (ctx + cont)[-(C + 1):][:-1]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([inp]))[0].float(), -1)[len(inp) - len(cont):]
    target = torch.tensor(cont)
    return lp[torch.arange(len(cont)), target].sum().item(), bool((lp.argmax(-1) == target).all())


# --- the scoring core -----------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [1, 5])
def test_loglikelihoods_equal_separate_forwards(batch_size: int) -> None:
    """Packed contexts (shared by several continuations), truncated contexts, one-token
    continuations and rows that overflow the context all give the numbers of separate forwards."""
    torch.manual_seed(0)
    model = GPT(SMALL).eval()
    rng = random.Random(0)
    requests = []
    for _ in range(25):
        ctx = [rng.randrange(50) for _ in range(rng.randint(1, 22))]
        conts = [[rng.randrange(50) for _ in range(rng.randint(1, 9))] for _ in range(rng.randint(1, 5))]
        requests.append((ctx, conts))
    requests.append(([3] * 20, [[4], [5], [6, 7]]))  # one-token continuations have no input tokens
    requests.append(([1, 2], [[7] * 24]))            # the longest continuation the context allows
    out = loglikelihoods(model, requests, batch_size=batch_size)
    worst = 0.0
    for (ctx, conts), res in zip(requests, out, strict=True):
        assert len(res) == len(conts)
        for cont, (ll, greedy) in zip(conts, res, strict=True):
            ref_ll, ref_greedy = direct(model, ctx, cont)
            worst = max(worst, abs(ll - ref_ll))
            assert greedy == ref_greedy
    assert worst < 1e-4


def test_greedy_flag_is_true_when_argmax_reproduces_the_continuation() -> None:
    torch.manual_seed(0)
    model = GPT(SMALL).eval()
    ctx = [1, 2, 3]
    cont = []
    ids = list(ctx)
    with torch.no_grad():
        for _ in range(4):  # greedy decoding
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            cont.append(nxt)
            ids.append(nxt)
    other = cont[:-1] + [(cont[-1] + 1) % 50]
    (res,) = loglikelihoods(model, [(ctx, [cont, other])])
    assert res[0][1] is True and res[1][1] is False


def test_bad_requests() -> None:
    model = GPT(SMALL).eval()
    with pytest.raises(ValueError, match="empty context"):
        loglikelihoods(model, [([], [[1]])])
    with pytest.raises(ValueError, match="between 1 and the context length"):
        loglikelihoods(model, [([1], [[]])])
    with pytest.raises(ValueError, match="outside this model's vocabulary"):
        loglikelihoods(model, [([1], [[50]])])


@pytest.mark.parametrize("n", [1, 5, 24, 25, 47, 48, 49, 100])
def test_rolling_windows_are_lm_evals(n: int) -> None:
    lm_utils = pytest.importorskip("lm_eval.utils")
    tokens = list(range(100, 100 + n))
    ours = rolling_windows(tokens, 7, 24)
    theirs = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(tokens, 7, 24, 1)]
    assert [(list(c), list(k[0])) for c, k in ours] == [(list(a), list(b)) for a, b in theirs]
    assert [t for _, k in ours for t in k[0]] == tokens  # every token scored once, in order
    # No prefix token: the first token conditions the rest and is not scored.
    assert [t for _, k in rolling_windows(tokens + [1], None, 24) for t in k[0]] == tokens[1:] + [1]


def test_short_document_loglikelihood_is_one_forward_after_end_of_text() -> None:
    torch.manual_seed(0)
    model = GPT(SMALL).eval()
    doc = [5, 9, 13, 2, 40, 41]
    (res,) = loglikelihoods(model, rolling_windows(doc, 0, SMALL.context_length))
    assert res[0][0] == pytest.approx(direct(model, [0], doc)[0], abs=1e-5)


# --- lm-eval's text handling ------------------------------------------------------------------------
def test_text_processing_is_lm_evals() -> None:
    wt = pytest.importorskip("lm_eval.tasks.wikitext.preprocess_wikitext")
    hs = pytest.importorskip("lm_eval.tasks.hellaswag.utils")
    pages = wikitext_pages((FIXTURES / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8"))
    assert len(pages) == 3 and all(p.lstrip("\n").startswith(" = ") for p in pages)
    assert " = = History = = " in pages[0] and " = Margaret Ellison = " not in pages[0]
    for p in pages:
        assert wikitext_detokenize(p) == wt.wikitext_detokenizer({"page": p})
    assert "1,240 metres" in wikitext_detokenize(pages[0])
    for line in (FIXTURES / "hellaswag" / "hellaswag_val.jsonl").read_text().splitlines():
        doc = json.loads(line)
        for text in [doc["ctx_a"], *doc["endings"]]:
            assert hellaswag_preprocess(text) == hs.preprocess(text)
    text = "[header] How to x [title] Do y. [step] Z"
    assert hellaswag_preprocess(text) == hs.preprocess(text) == " How to x. Do y. Z"


def test_context_continuation_split(gpt2_tokenizer) -> None:
    tok = gpt2_tokenizer
    ctx, cont = encode_pair(tok, "The capital of France is", " Paris")
    assert ctx == tok.encode("The capital of France is") and cont == tok.encode(" Paris")
    # A context's trailing space moves to the continuation: " two" is one token, not " " + "two".
    ctx, cont = encode_pair(tok, "count: one, ", " two")
    assert tok.decode(ctx) == "count: one," and tok.decode(cont) == "  two"
    # An empty context is the end-of-text token.
    assert encode_pair(tok, "", " Hello")[0] == [tok.eot]


def test_special_token_text_in_a_task_is_the_token_as_lm_eval_encodes_it(gpt2_tokenizer, tmp_path) -> None:
    """lm-eval's hf model encodes with HF's tokenizer, which reads "<|endoftext|>" written in a task's
    text as the token (one id, not 7 ordinary ones: a log-likelihood tens of nats apart)."""
    transformers = pytest.importorskip("transformers")
    gpt2_tokenizer.save(tmp_path)
    hf_tok = transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path))
    context, continuation = "Special <|endoftext|> inside", " a<|endoftext|>b"
    ctx = hf_tok.encode(context)
    assert encode_pair(gpt2_tokenizer, context, continuation) == (ctx, hf_tok.encode(context + continuation)[len(ctx):])
    assert encode_pair(gpt2_tokenizer, "", "<|endoftext|>x") == ([50256], [87])  # lm-eval: the token is the context
    assert encode_as_hf(gpt2_tokenizer, "a <|endoftext|>") == hf_tok.encode("a <|endoftext|>") == [64, 220, 50256]


def test_an_error_names_the_task_it_comes_from(tmp_path) -> None:
    """`--task text8,multiple_choice` with a char model lacking a character said only "1 character(s) not
    in the 4-character vocabulary", not in which task."""
    from gpt2model.tokenizer import CharTokenizer, UnknownCharError

    tok = CharTokenizer(" abc")
    model = GPT(GPTconfig(context_length=16, vocab_size=tok.vocab_size, n_layer=1, n_head=1, d_model=8)).eval()
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"context": "ab", "choices": ["c", "a!"], "label": 0}) + "\n")
    with pytest.raises(UnknownCharError, match=r"^task multiple_choice: 1 character\(s\) not in the 4-character"):
        run_tasks(model, tok, ["multiple_choice"], mc_file=mc)


# --- the tasks on the fixtures -------------------------------------------------------------------------
def test_tasks_on_fixtures_match_separate_forwards(fixtures_data, tmp_path, tiny_gpt2, gpt2_tokenizer) -> None:
    """Each task's numbers from per-item log-likelihoods recomputed independently: HF's tokenizer
    on the raw strings and a plain forward per choice."""
    transformers = pytest.importorskip("transformers")
    gpt2_tokenizer.save(tmp_path)  # vocab.json + merges.txt, HF's file names
    hf_tok = transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path))
    model, tok = tiny_gpt2, gpt2_tokenizer
    results = {r.task: r for r in run_tasks(model, tok, list(TASKS), batch_size=4, mc_file=MC_FILE)}

    hs = results["hellaswag"]
    docs = [json.loads(x) for x in (fixtures_data / "hellaswag" / "hellaswag_val.jsonl").read_text().splitlines()]
    assert hs.num_items == len(docs) == 36
    acc = acc_norm = 0
    for doc, lls in zip(docs, hs.loglikelihoods, strict=True):
        query = hellaswag_preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
        choices = [hellaswag_preprocess(e) for e in doc["endings"]]
        ctx = hf_tok(query)["input_ids"]
        ref = [direct(model, ctx, hf_tok(query + " " + c)["input_ids"][len(ctx):])[0] for c in choices]
        assert lls == pytest.approx(ref, abs=1e-4)
        acc += max(range(4), key=lambda i: ref[i]) == doc["label"]
        acc_norm += max(range(4), key=lambda i: ref[i] / len(choices[i])) == doc["label"]
    assert hs.metrics == {"acc": acc / 36, "acc_norm": acc_norm / 36}
    assert hs.stderr["acc_norm"] == pytest.approx(math.sqrt(hs.metrics["acc_norm"] * (1 - hs.metrics["acc_norm"])
                                                            / 35))

    lam = results["lambada"]
    texts = [json.loads(x)["text"] for x in (fixtures_data / "lambada" / "lambada_test.jsonl").read_text().splitlines()]
    lls = []
    for text, (ll,) in zip(texts, lam.loglikelihoods, strict=True):
        head, word = text.rsplit(" ", 1)
        ctx = hf_tok(head)["input_ids"]
        ref = direct(model, ctx, hf_tok(head + " " + word)["input_ids"][len(ctx):])[0]
        assert ll == pytest.approx(ref, abs=1e-4)
        lls.append(ref)
    assert lam.metrics["perplexity"] == pytest.approx(math.exp(-sum(lls) / len(lls)), rel=1e-5)
    assert lam.stderr["perplexity"] == pytest.approx(lam.metrics["perplexity"] * mean_stderr(lls), rel=1e-5)

    wt = results["wikitext2"]
    pages = wikitext_pages((fixtures_data / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8"))
    total = sum(ll for (ll,) in wt.loglikelihoods)
    words = sum(len(re.split(r"\s+", p)) for p in pages)  # lm-eval's count on the original page
    nbytes = sum(len(p.encode()) for p in pages)
    assert wt.metrics["word_perplexity"] == pytest.approx(math.exp(-total / words), rel=1e-9)
    assert wt.metrics["bits_per_byte"] == pytest.approx(-total / nbytes / math.log(2), rel=1e-9)
    assert wt.metrics["byte_perplexity"] == pytest.approx(2 ** wt.metrics["bits_per_byte"], rel=1e-9)
    # Every page is longer than the 64-token context: several windows each.
    assert all(len(tok.encode(wikitext_detokenize(p))) > 64 for p in pages)

    for task, unit in (("enwik8", "bits_per_byte"), ("text8", "bits_per_char")):
        r = results[task]
        raw = (fixtures_data / task / task).read_bytes()
        test = raw[len(raw) - len(raw) // 20:].decode()
        n_units = len(test.encode()) if task == "enwik8" else len(test)
        assert r.num_items == math.ceil(len(tok.encode(test)) / 64)
        assert r.metrics[unit] == pytest.approx(-sum(ll for (ll,) in r.loglikelihoods) / n_units / math.log(2))

    mc = results["multiple_choice"]
    assert mc.num_items == 30 and set(mc.metrics) == {"acc", "acc_norm"}
    # The per-item results serialise without the per-item log-likelihoods.
    assert set(json.loads(json.dumps(mc.to_dict()))) == {"task", "num_items", "metrics", "stderr", "seconds",
                                                         "items_per_second", "source"}


def test_limit_takes_the_first_items(fixtures_data, tiny_gpt2, gpt2_tokenizer) -> None:
    full = run_task(tiny_gpt2, gpt2_tokenizer, "multiple_choice", mc_file=MC_FILE)
    part = run_task(tiny_gpt2, gpt2_tokenizer, "multiple_choice", mc_file=MC_FILE, limit=7, batch_size=1)
    assert part.num_items == 7
    flat = lambda rows: [x for row in rows for x in row]  # noqa: E731
    assert flat(part.loglikelihoods) == pytest.approx(flat(full.loglikelihoods[:7]), abs=1e-4)
    assert run_task(tiny_gpt2, gpt2_tokenizer, "text8", limit=2).num_items == 2


# --- models with known answers -----------------------------------------------------------------------
class _Oracle(nn.Module):
    """Puts all its mass on the next token of the gold sequences, reading exactly the tokens each
    position may see (so it also checks the packing masks): ``next_token[prefix]``; uniform elsewhere."""

    def __init__(self, vocab_size: int, next_token: dict[tuple[int, ...], int], context_length: int = 1024) -> None:
        super().__init__()
        self.config = GPTconfig(context_length=context_length, vocab_size=vocab_size, n_layer=1, n_head=1, d_model=8)
        self.anchor = nn.Parameter(torch.zeros(()))
        self.next_token = next_token

    device = property(lambda self: self.anchor.device)
    dtype = property(lambda self: self.anchor.dtype)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        B, T = ids.shape
        logits = torch.zeros(B, T, self.config.vocab_size)
        for b in range(B):
            for t in range(T):
                seen = range(t + 1) if mask is None else (mask[b, 0, t] == 0).nonzero().squeeze(1).tolist()
                nxt = self.next_token.get(tuple(ids[b, k].item() for k in seen))
                if nxt is not None:
                    logits[b, t, nxt] = 100.0
        return logits


@pytest.mark.parametrize("task", ["hellaswag", "multiple_choice"])
def test_a_model_that_knows_the_answers_scores_100_percent(task, fixtures_data, gpt2_tokenizer) -> None:
    tok = gpt2_tokenizer
    uniform = run_task(_Oracle(tok.vocab_size, {}), tok, task, mc_file=MC_FILE, limit=12)
    if task == "hellaswag":
        docs = [json.loads(x) for x in (fixtures_data / "hellaswag" / "hellaswag_val.jsonl").read_text().splitlines()]
        gold = [(hellaswag_preprocess(d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize()),
                 hellaswag_preprocess(d["endings"][d["label"]])) for d in docs[:12]]
    else:
        docs = [json.loads(x) for x in MC_FILE.read_text().splitlines()]
        gold = [(d["context"], d["choices"][d["label"]]) for d in docs[:12]]
    table = {}
    for context, answer in gold:
        ctx, cont = encode_pair(tok, context, " " + answer)
        seq = ctx + cont
        for j in range(len(ctx) - 1, len(seq) - 1):
            table[tuple(seq[:j + 1])] = seq[j + 1]
    r = run_task(_Oracle(tok.vocab_size, table), tok, task, mc_file=MC_FILE, limit=12, batch_size=3)
    assert r.metrics == {"acc": 1.0, "acc_norm": 1.0}
    assert r.stderr == {"acc": 0.0, "acc_norm": 0.0}
    assert all(max(lls) > -1e-6 for lls in r.loglikelihoods)  # the gold answer has probability 1
    assert uniform.metrics["acc"] < 1.0


def test_length_normalisation_prefers_the_longer_answer(tmp_path, gpt2_tokenizer) -> None:
    """A uniform model gives every token log(1/V): the summed log-likelihood (acc) prefers the
    answer with fewest tokens, the per-character one (acc_norm) the answer with most characters
    per token, here the long one, which is gold."""
    tok = gpt2_tokenizer
    items = [{"context": "Pick one:", "choices": ["x", "the quick brown fox jumps over"], "label": 1},
             {"context": "Another:", "choices": ["a very long and wordy answer indeed", "b"], "label": 0}]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    r = run_task(_Oracle(tok.vocab_size, {}), tok, "multiple_choice", mc_file=path)
    assert r.metrics == {"acc": 0.0, "acc_norm": 1.0}
    for item, lls in zip(items, r.loglikelihoods, strict=True):
        ntok = [len(encode_pair(tok, item["context"], " " + c)[1]) for c in item["choices"]]
        assert lls == pytest.approx([-n * math.log(tok.vocab_size) for n in ntok], rel=1e-6)


def test_multiple_choice_label_true_is_not_label_1(tmp_path, gpt2_tokenizer) -> None:
    """JSON true is a Python int: it was scored as label 1 instead of being refused."""
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"context": "Pick:", "choices": ["a", "b"], "label": True}) + "\n")
    with pytest.raises(ValueError, match=r"item 1: field 'label' must be a int, got True"):
        run_task(_Oracle(gpt2_tokenizer.vocab_size, {}), gpt2_tokenizer, "multiple_choice", mc_file=path)


def test_a_tokenizer_without_end_of_text(fixtures_data, tmp_path) -> None:
    """A character-level model (no end-of-text token) on text8: the first character conditions
    the rest and is not scored; multiple choice still works (its contexts are never empty)."""
    from gpt2model.tokenizer import CharTokenizer

    raw = (fixtures_data / "text8" / "text8").read_bytes()
    test = raw[len(raw) - len(raw) // 20:].decode()
    tok = CharTokenizer.from_text(test + "".join(json.loads(x)["context"] + "".join(json.loads(x)["choices"])
                                                 for x in MC_FILE.read_text().splitlines()))
    assert tok.eot is None
    torch.manual_seed(0)
    model = GPT(GPTconfig(context_length=256, vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16)).eval()
    r = run_task(model, tok, "text8")
    assert r.num_items == math.ceil((len(test) - 1) / 256)
    ids = tok.encode(test)
    lm_utils = pytest.importorskip("lm_eval.utils")
    windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(ids[1:], ids[0], 256, 1)]
    ref = [direct(model, list(c), list(p))[0] for c, p in windows]
    assert [ll for (ll,) in r.loglikelihoods] == pytest.approx(ref, abs=1e-4)
    assert r.metrics["bits_per_char"] == pytest.approx(-sum(ll for (ll,) in r.loglikelihoods)
                                                       / (len(test) - 1) / math.log(2), rel=1e-9)
    assert run_task(model, tok, "multiple_choice", mc_file=MC_FILE).num_items == 30


# --- data files and input errors -------------------------------------------------------------------
def test_missing_data_file_says_what_to_put_where(tmp_path, monkeypatch, tiny_gpt2, gpt2_tokenizer) -> None:
    monkeypatch.setenv("GPT2MODEL_DATA", str(tmp_path))
    for task, name, url in (("hellaswag", "hellaswag_val.jsonl", "rowanz/hellaswag"),
                            ("wikitext2", "wiki.test.raw", "wikitext-2-raw-v1.zip"),
                            ("enwik8", "enwik8", "enwik8.zip")):
        with pytest.raises(FileNotFoundError) as e:
            run_task(tiny_gpt2, gpt2_tokenizer, task)
        assert str(tmp_path / task / name) in str(e.value) and url in str(e.value)


@pytest.mark.parametrize(("line", "fragment"), [
    ('{"context": "a", "choices": ["b", "c"], "label": 2}', "label 2 is not an index"),
    ('{"context": "a", "choices": ["b"], "label": 0}', "at least 2 non-empty strings"),
    ('{"choices": ["b", "c"], "label": 0}', "field 'context' must be a str"),
    ('{"context": "a", "choices": ["b", "c"], "label": "0"}', "field 'label' must be a int"),
    ("{not json", "line 2: not valid JSON"),
])
def test_bad_multiple_choice_file(tmp_path, tiny_gpt2, gpt2_tokenizer, line: str, fragment: str) -> None:
    path = tmp_path / "mc.jsonl"
    path.write_text('{"context": "ok", "choices": ["x", "y"], "label": 0}\n' + line + "\n")
    with pytest.raises(ValueError, match=fragment):
        run_task(tiny_gpt2, gpt2_tokenizer, "multiple_choice", mc_file=path)


def test_hellaswag_without_labels(tmp_path, monkeypatch, tiny_gpt2, gpt2_tokenizer) -> None:
    doc = json.loads((FIXTURES / "hellaswag" / "hellaswag_val.jsonl").read_text().splitlines()[0])
    del doc["label"]  # as in HellaSwag's test split
    (tmp_path / "hellaswag").mkdir()
    (tmp_path / "hellaswag" / "hellaswag_val.jsonl").write_text(json.dumps(doc) + "\n")
    monkeypatch.setenv("GPT2MODEL_DATA", str(tmp_path))
    with pytest.raises(ValueError, match="test split has no labels"):
        run_task(tiny_gpt2, gpt2_tokenizer, "hellaswag")


def test_unknown_task_and_missing_mc_file(tiny_gpt2, gpt2_tokenizer) -> None:
    with pytest.raises(ValueError, match="unknown task"):
        run_tasks(tiny_gpt2, gpt2_tokenizer, ["hellaswag", "lambda"])
    with pytest.raises(ValueError, match="--mc-file"):
        run_task(tiny_gpt2, gpt2_tokenizer, "multiple_choice")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_task(tiny_gpt2, gpt2_tokenizer, "multiple_choice", mc_file="/nonexistent.jsonl")


# --- the peer: lm-evaluation-harness's hf model on the same saved folder and fixtures ------------------
_LM_EVAL_SCRIPT = r'''
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
model_dir, task_dir, out = sys.argv[1:4]
res = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": model_dir, "dtype": "float32", "device": "cpu"},
                              tasks=["hellaswag_fx", "lambada_fx", "wikitext_fx", "mc_fx"],
                              task_manager=TaskManager(include_path=task_dir), batch_size=8, log_samples=True,
                              bootstrap_iters=0)
json.dump({"results": res["results"],
           "samples": {t: [[s["doc_id"], s["filtered_resps"]] for s in v] for t, v in res["samples"].items()}},
          open(out, "w"))
'''


@pytest.mark.slow
def test_same_scores_as_lm_evaluation_harness(fixtures_data, tmp_path, tiny_gpt2, gpt2_tokenizer) -> None:
    """Our scores and lm-eval's (its ``hf`` model on the saved folder, offline, the fixtures as local
    JSON datasets): equal acc / acc_norm, log-likelihoods within 1e-4, equal perplexities."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    model_dir, task_dir = tmp_path / "model", tmp_path / "tasks"
    task_dir.mkdir()
    tiny_gpt2.save_pretrained(model_dir, tokenizer=gpt2_tokenizer)
    pages = wikitext_pages((fixtures_data / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8"))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from lm_eval_tasks import write_lm_eval_configs  # shared with bench/bench_tasks.py

    write_lm_eval_configs(task_dir, pages)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf_cache"), "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "lm_eval.json"
    subprocess.run([sys.executable, "-c", _LM_EVAL_SCRIPT, str(model_dir), str(task_dir), str(out)], env=env,
                   check=True, capture_output=True, timeout=1200)
    peer = json.loads(out.read_text())
    ours = {r.task: r for r in run_tasks(tiny_gpt2, gpt2_tokenizer, ["hellaswag", "lambada", "wikitext2",
                                                                     "multiple_choice"], mc_file=MC_FILE)}
    for task, fx in (("hellaswag", "hellaswag_fx"), ("lambada", "lambada_fx"), ("wikitext2", "wikitext_fx"),
                     ("multiple_choice", "mc_fx")):
        samples = sorted(peer["samples"][fx])
        assert len(samples) == ours[task].num_items
        for (_, resps), lls in zip(samples, ours[task].loglikelihoods, strict=True):
            theirs = [r[0] if isinstance(r, list) else r for r in resps]
            # lm-eval sums a document's log-probabilities in fp32: a WikiText page's total (~-2,360
            # here) is only good to its ulp, 2.4e-4, hence the relative term.
            assert lls == pytest.approx(theirs, abs=1e-4, rel=2e-7)
        if task != "wikitext2":
            for (_, resps), greedy in zip(samples, ours[task].greedy, strict=True):
                assert greedy == [bool(r[1]) for r in resps]
        theirs = peer["results"][fx]
        for key, value in ours[task].metrics.items():
            if key == "token_perplexity":
                continue  # ours only
            if key.startswith("acc"):
                assert value == theirs[f"{key},none"], (task, key)
            else:
                assert value == pytest.approx(theirs[f"{key},none"], rel=1e-5), (task, key)


# --- the command line -------------------------------------------------------------------------------
def test_eval_cli_runs_several_tasks_and_writes_json(fixtures_data, tmp_path, tiny_gpt2, gpt2_tokenizer,
                                                     capsys) -> None:
    from gpt2model.cli import main

    model_dir = tmp_path / "model"
    tiny_gpt2.save_pretrained(model_dir, tokenizer=gpt2_tokenizer)
    out = tmp_path / "r.json"
    # a task named twice runs once (lm-eval's --tasks a,a), in first-named order
    rc = main(["eval", "--model", str(model_dir), "--task", "hellaswag,lambada", "--task", "multiple_choice,lambada",
               "--mc-file", str(MC_FILE), "--limit", "5", "--batch-size", "3", "--json", str(out), "--no-progress",
               "--device", "cpu"])
    assert rc == 0
    table = capsys.readouterr().out
    for word in ("hellaswag", "lambada", "multiple_choice", "acc_norm", "perplexity", "stderr", "items/s"):
        assert word in table
    data = json.loads(out.read_text())
    assert [t["task"] for t in data["tasks"]] == ["hellaswag", "lambada", "multiple_choice"]
    assert all(t["num_items"] == 5 and set(t["metrics"]) == set(t["stderr"]) for t in data["tasks"])
    direct_run = run_task(tiny_gpt2, gpt2_tokenizer, "hellaswag", limit=5)
    assert data["tasks"][0]["metrics"] == pytest.approx(direct_run.metrics)


def test_eval_cli_errors(fixtures_data, tmp_path, tiny_gpt2, gpt2_tokenizer, capsys) -> None:
    from gpt2model.cli import main

    model_dir = tmp_path / "model"
    tiny_gpt2.save_pretrained(model_dir, tokenizer=gpt2_tokenizer)
    assert main(["eval", "--model", str(model_dir), "--task", "hellaswag,lambda", "--device", "cpu"]) == 2
    assert "unknown task(s) 'lambda'" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--task", "multiple_choice", "--device", "cpu"]) == 2
    assert "--mc-file" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --task and --text exclude each other
        main(["eval", "--model", str(model_dir), "--task", "lambada", "--text", "x.txt"])


def test_a_multiple_choice_file_with_a_byte_order_mark_is_read(tmp_path, gpt2_tokenizer) -> None:
    """A .jsonl saved by a Windows editor starts with a UTF-8 BOM: it was 'line 1: not valid JSON'."""
    item = {"context": "Pick:", "choices": ["a", "b"], "label": 0}
    plain, marked = tmp_path / "plain.jsonl", tmp_path / "bom.jsonl"
    plain.write_text(json.dumps(item) + "\n")
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    oracle = _Oracle(gpt2_tokenizer.vocab_size, {})
    assert run_task(oracle, gpt2_tokenizer, "multiple_choice", mc_file=marked).loglikelihoods == \
        run_task(oracle, gpt2_tokenizer, "multiple_choice", mc_file=plain).loglikelihoods
