"""Zero-shot tasks of the GPT-2 paper (and HellaSwag), scored as lm-evaluation-harness scores them.

=================  ===============================================================================
task               what is scored (lm-eval's task in brackets)
=================  ===============================================================================
hellaswag          4-way sentence completion; ``acc`` / ``acc_norm`` (``hellaswag``)
lambada            OpenAI's LAMBADA: greedy accuracy and perplexity of the last word (``lambada_openai``)
wikitext2          WikiText-2 test pages, detokenised; word/byte perplexity, bits per byte (``wikitext``)
enwik8, text8      the last 5M characters (the standard 90/5/5 split); bits per byte / character
multiple_choice    a user's JSONL of ``{"context", "choices", "label"}``; ``acc`` / ``acc_norm``
=================  ===============================================================================

How lm-eval scores, and so how we do (its ``api/task.py``, ``api/model.py``, ``models/huggingface.py``):

- Multiple choice: each choice is the continuation ``" " + choice`` (the default ``target_delimiter``)
  of the context. Trailing spaces of the context move to the continuation; the context is encoded
  alone and the continuation is what the tokens of ``context + continuation`` add after it.
  ``acc``: the choice with the highest summed log-probability is the gold one; ``acc_norm``: the same
  after dividing by ``len(choice)`` in characters (the choice string, without the delimiter).
- LAMBADA: context = the text up to its last space, continuation = ``" " + last word``; ``acc`` is
  whether greedy decoding reproduces all of the word's tokens, ``perplexity`` is
  ``exp(-mean(log p(word)))`` over the items.
- Perplexity tasks: each document's log-likelihood from rolling windows (see
  :func:`gpt2model.evaluate.rolling_windows`), summed over documents and divided by words / bytes
  of the original text: ``word_perplexity = exp(-sum ll / words)``, ``byte_perplexity = exp(-sum ll /
  bytes)``, ``bits_per_byte = -sum ll / bytes / ln 2``. We also report ``token_perplexity`` (per
  token of this model's tokenizer).
- Standard errors: for means (``acc``, ``acc_norm``) lm-eval's ``sample_stddev / sqrt(n)``. lm-eval
  bootstraps LAMBADA's perplexity and gives none for the ratio metrics; we give delta-method
  estimates there (perplexity: ``ppl * se(mean ll)``; ratios: the ratio estimator's standard error
  over items), which the bootstrap approximates.

Data files live under ``$GPT2MODEL_DATA/<task>/`` in their official formats (:data:`DATA_FILES`).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .assets import ASSETS, asset_path, data_dir
from .evaluate import Request, loglikelihoods, rolling_windows
from .tokenizer import encode_as_hf

if TYPE_CHECKING:
    from .model import GPT

TASKS = ("hellaswag", "lambada", "wikitext2", "enwik8", "text8", "multiple_choice")


@dataclass(frozen=True)
class DataFile:
    """Where a task's official file goes (relative to ``GPT2MODEL_DATA``) and where it comes from."""

    path: str
    url: str
    how: str  # what to do with the download


DATA_FILES: dict[str, DataFile] = {
    "hellaswag": DataFile("hellaswag/hellaswag_val.jsonl",
                          "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
                          "save it as is (the validation split, 10,042 items)"),
    "lambada": DataFile("lambada/lambada_test.jsonl",
                        "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl",
                        "save it as is (OpenAI's LAMBADA test set, 5,153 items)"),
    "wikitext2": DataFile("wikitext2/wiki.test.raw", "https://wikitext.smerity.com/wikitext-2-raw-v1.zip",
                          "unzip it and keep wikitext-2-raw/wiki.test.raw"),
    "enwik8": DataFile("enwik8/enwik8", "http://mattmahoney.net/dc/enwik8.zip", "unzip it (100,000,000 bytes)"),
    "text8": DataFile("text8/text8", "http://mattmahoney.net/dc/text8.zip", "unzip it (100,000,000 characters)"),
}


def task_file(task: str) -> Path:
    """The official data file of ``task``: from ``GPT2MODEL_DATA``, downloaded with a sha256 check
    where we know the file's hash and a network exists; else ``FileNotFoundError`` saying which
    file to put where."""
    spec = DATA_FILES[task]
    path = data_dir() / spec.path
    if path.is_file():
        return path
    if spec.path in ASSETS:
        try:
            return asset_path(spec.path)
        except FileNotFoundError:
            pass
    raise FileNotFoundError(
        f"task {task} needs {path}, which is missing: download {spec.url}, {spec.how}, and put it at "
        f"{path} (or set GPT2MODEL_DATA to a folder that holds {spec.path})")


# --- documents: the official files, parsed as lm-eval's datasets parse them ------------------------
def _read_jsonl(path: Path, limit: int | None) -> list[dict[str, Any]]:
    docs = []
    with open(path, encoding="utf-8-sig") as f:  # (-sig: a byte-order mark is dropped)
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and len(docs) >= limit:
                break
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not valid JSON ({e})") from None
            if not isinstance(doc, dict):
                raise ValueError(f"{path}, line {n}: expected a JSON object, got {type(doc).__name__}")
            docs.append(doc)
    if not docs:
        raise ValueError(f"{path} holds no items")
    return docs


def _need(doc: dict[str, Any], keys: dict[str, type], where: str) -> None:
    for key, kind in keys.items():
        value = doc.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):  # true is no label
            raise ValueError(f"{where}: field {key!r} must be a {kind.__name__}, got {value!r}")


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's ``tasks/hellaswag/utils.py::preprocess``: drop WikiHow's ``[...]`` artifacts."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def wikitext_pages(raw: str) -> list[str]:
    """Split a WikiText raw file into articles as ``EleutherAI/wikitext_document_level`` (lm-eval's
    dataset) does: a new page starts at each level-1 heading line (`` = Title = ``)."""
    pages, lines = [], []
    for line in raw.split("\n"):
        stripped = line.replace("= = =", "===").replace("= =", "==").strip()
        if stripped.startswith("= ") and stripped.endswith(" ="):
            page = "\n".join(lines)
            if page.strip():
                pages.append(page)
            lines = []
        lines.append(line)
    page = "\n".join(lines)
    if page.strip():
        pages.append(page)
    return pages


def wikitext_detokenize(text: str) -> str:
    """lm-eval's ``tasks/wikitext/preprocess_wikitext.py::wikitext_detokenizer`` (Megatron-LM's,
    after the GPT-2 paper's invertible detokenisers): undo WikiText's tokenisation."""
    s = text.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    for p in (":", ";", ".", "!", "?", ","):
        s = s.replace(f" {p} ", f"{p} ")
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    s = s.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    s = s.replace(" " + chr(176) + " ", chr(176))
    s = s.replace(" \n", "\n").replace("\n ", "\n")
    s = s.replace(" N ", " 1 ").replace(" 's", "'s")
    return s


def multiple_choice_docs(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Items ``{"context": str, "choices": [str, ...], "label": int}`` of a JSONL file (checked)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"multiple-choice file {path} does not exist: give a JSONL file with one "
                                '{"context": ..., "choices": [...], "label": N} object per line')
    docs = _read_jsonl(path, limit)
    for n, doc in enumerate(docs, 1):
        where = f"{path}, item {n}"
        _need(doc, {"context": str, "choices": list, "label": int}, where)
        if len(doc["choices"]) < 2 or not all(isinstance(c, str) and c for c in doc["choices"]):
            raise ValueError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
        if not 0 <= doc["label"] < len(doc["choices"]):
            raise ValueError(f"{where}: label {doc['label']} is not an index into its {len(doc['choices'])} choices")
    return docs


# --- requests -----------------------------------------------------------------------------------
def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's context/continuation split (``api/model.py``: ``loglikelihood`` + ``_encode_pair``):
    trailing spaces of the context join the continuation; the continuation's tokens are those that
    ``context + continuation`` has after the context's own tokens. An empty context becomes the
    end-of-text token (or, without one, the continuation's first token, which is then not scored)."""
    if context == "":
        cont = encode_as_hf(tokenizer, continuation)
        eot = getattr(tokenizer, "eot", None)
        if eot is None or (cont and cont[0] == eot):
            return cont[:1], cont[1:]
        return [eot], cont
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode_as_hf(tokenizer, context + continuation)
    ctx = encode_as_hf(tokenizer, context)
    return ctx, whole[len(ctx):]


def _choice_requests(tokenizer: Any, items: Sequence[tuple[str, Sequence[str]]],
                     delimiter: str = " ") -> list[Request]:
    requests = []
    for context, choices in items:
        pairs = [encode_pair(tokenizer, context, delimiter + c) for c in choices]
        # lm-eval encodes the context once per choice; it comes out the same every time.
        requests.append((pairs[0][0], [cont for _, cont in pairs]))
    return requests


# --- statistics ---------------------------------------------------------------------------------
def mean_stderr(xs: Sequence[float]) -> float | None:
    """lm-eval's ``mean_stderr``: sample standard deviation over sqrt(n) (None for n < 2)."""
    n = len(xs)
    if n < 2:
        return None
    mu = sum(xs) / n
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)


def ratio_stderr(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Standard error of ``sum(a) / sum(b)`` over items (the ratio estimator's delta method)."""
    n = len(a)
    if n < 2 or sum(b) == 0:
        return None
    r = sum(a) / sum(b)
    return math.sqrt(n / (n - 1) * sum((x - r * y) ** 2 for x, y in zip(a, b, strict=True))) / sum(b)


@dataclass
class TaskResult:
    """One task's scores. ``metrics`` and ``stderr`` share keys; ``loglikelihoods`` holds per item
    the log-likelihood of each choice (multiple choice), of the word (LAMBADA) or of the document /
    window (perplexity tasks), for inspection and tests (not written to JSON)."""

    task: str
    num_items: int
    metrics: dict[str, float]
    stderr: dict[str, float | None]
    seconds: float
    source: str
    loglikelihoods: list[list[float]] = field(default_factory=list, repr=False)
    greedy: list[list[bool]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "num_items": self.num_items, "metrics": self.metrics, "stderr": self.stderr,
                "seconds": round(self.seconds, 3), "items_per_second": round(self.num_items / self.seconds, 3)
                if self.seconds > 0 else None, "source": self.source}


def _choice_metrics(results: list[list[tuple[float, bool]]], choices: Sequence[Sequence[str]],
                    gold: Sequence[int]) -> tuple[dict[str, float], dict[str, float | None]]:
    acc, acc_norm = [], []
    for res, ch, g in zip(results, choices, gold, strict=True):
        lls = [ll for ll, _ in res]
        # First index of the maximum, as numpy's argmax (lm-eval) picks it.
        pred = max(range(len(lls)), key=lambda i: (lls[i], -i))
        normed = [ll / len(c) for ll, c in zip(lls, ch, strict=True)]
        pred_norm = max(range(len(normed)), key=lambda i: (normed[i], -i))
        acc.append(float(pred == g))
        acc_norm.append(float(pred_norm == g))
    return ({"acc": sum(acc) / len(acc), "acc_norm": sum(acc_norm) / len(acc_norm)},
            {"acc": mean_stderr(acc), "acc_norm": mean_stderr(acc_norm)})


def _rolling(model: GPT, tokenizer: Any, texts: Sequence[str], batch_size: int, progress: bool,
             desc: str) -> tuple[list[float], list[int], list[list[tuple[float, bool]]]]:
    """Per text: its log-likelihood and its number of scored tokens; and the per-window results."""
    eot = getattr(tokenizer, "eot", None)
    windows: list[Request] = []
    owner: list[int] = []
    for i, text in enumerate(texts):
        w = rolling_windows(encode_as_hf(tokenizer, text), eot, model.config.context_length)
        windows += w
        owner += [i] * len(w)
    res = loglikelihoods(model, windows, batch_size=batch_size, progress=progress, desc=desc)
    ll = [0.0] * len(texts)
    ntok = [0] * len(texts)
    for (_, conts), r, i in zip(windows, res, owner, strict=True):
        ll[i] += r[0][0]
        ntok[i] += len(conts[0])
    return ll, ntok, res


# --- the tasks ----------------------------------------------------------------------------------
def run_task(model: GPT, tokenizer: Any, task: str, *, limit: int | None = None, batch_size: int = 8,
             progress: bool = False, mc_file: str | Path | None = None) -> TaskResult:
    """Score ``model`` on one task (see the module docstring); ``limit`` keeps the first N items
    (for enwik8/text8: the first N windows of ``context_length`` tokens)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    t0 = time.perf_counter()
    if task == "multiple_choice":
        if mc_file is None:
            raise ValueError("the multiple_choice task needs a JSONL file of "
                             '{"context", "choices", "label"} items (--mc-file FILE)')
        source = str(mc_file)
        docs = multiple_choice_docs(mc_file, limit)
        items = [(d["context"], d["choices"]) for d in docs]
        gold = [d["label"] for d in docs]
    elif task == "hellaswag":
        path = task_file(task)
        source = str(path)
        docs = _read_jsonl(path, limit)
        items, gold = [], []
        for n, d in enumerate(docs, 1):
            _need(d, {"activity_label": str, "ctx_a": str, "ctx_b": str, "endings": list}, f"{path}, item {n}")
            if str(d.get("label", "")) not in [str(i) for i in range(len(d["endings"]))]:
                raise ValueError(f"{path}, item {n}: 'label' must index its endings, got {d.get('label')!r} "
                                 "(HellaSwag's test split has no labels: use hellaswag_val.jsonl)")
            ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
            items.append((hellaswag_preprocess(d["activity_label"] + ": " + ctx),
                          [hellaswag_preprocess(e) for e in d["endings"]]))
            gold.append(int(d["label"]))
    if task in ("multiple_choice", "hellaswag"):
        results = loglikelihoods(model, _choice_requests(tokenizer, items), batch_size=batch_size,
                                 progress=progress, desc=task)
        metrics, stderr = _choice_metrics(results, [c for _, c in items], gold)
        return TaskResult(task, len(items), metrics, stderr, time.perf_counter() - t0, source,
                          [[ll for ll, _ in r] for r in results], [[g for _, g in r] for r in results])

    if task == "lambada":
        path = task_file(task)
        docs = _read_jsonl(path, limit)
        requests = []
        for n, d in enumerate(docs, 1):
            _need(d, {"text": str}, f"{path}, item {n}")
            words = d["text"].split(" ")
            ctx, cont = encode_pair(tokenizer, " ".join(words[:-1]), " " + words[-1])
            requests.append((ctx, [cont]))
        results = loglikelihoods(model, requests, batch_size=batch_size, progress=progress, desc=task)
        lls = [r[0][0] for r in results]
        hits = [float(r[0][1]) for r in results]
        mean_ll = sum(lls) / len(lls)
        se_ll = mean_stderr(lls)
        ppl = math.exp(-mean_ll)
        metrics = {"acc": sum(hits) / len(hits), "perplexity": ppl}
        stderr = {"acc": mean_stderr(hits), "perplexity": None if se_ll is None else ppl * se_ll}
        return TaskResult(task, len(docs), metrics, stderr, time.perf_counter() - t0, str(path),
                          [[x] for x in lls], [[r[0][1]] for r in results])

    if task == "wikitext2":
        path = task_file(task)
        pages = wikitext_pages(path.read_text(encoding="utf-8-sig"))
        if limit is not None:
            pages = pages[:limit]
        ll, ntok, _ = _rolling(model, tokenizer, [wikitext_detokenize(p) for p in pages], batch_size,
                               progress, task)
        # As lm-eval: words and bytes of the original page (before detokenisation).
        words = [len(re.split(r"\s+", p)) for p in pages]
        nbytes = [len(p.encode("utf-8")) for p in pages]
        return TaskResult(task, len(pages), *_ratio_metrics(ll, {"word_perplexity": words,
                                                                 "byte_perplexity": nbytes,
                                                                 "bits_per_byte": nbytes,
                                                                 "token_perplexity": ntok}),
                          time.perf_counter() - t0, str(path), [[x] for x in ll])

    # enwik8 / text8: the last 5% of the file (its last 5M characters), one rolling document.
    path = task_file(task)
    raw = path.read_bytes()
    test = raw[len(raw) - len(raw) // 20:].decode("utf-8", errors="replace")
    tokens = encode_as_hf(tokenizer, test)
    eot = getattr(tokenizer, "eot", None)
    windows = rolling_windows(tokens, eot, model.config.context_length)
    if limit is not None:
        windows = windows[:limit]
    results = loglikelihoods(model, windows, batch_size=batch_size, progress=progress, desc=task)
    ll = [r[0][0] for r in results]
    ntok = [len(conts[0]) for _, conts in windows]
    # Characters (text8) / bytes (enwik8) of the scored text: the metric divides by the exact
    # total; each window's own count (a UTF-8 character may straddle two) weighs its standard error.
    first = 0 if eot is not None else 1
    bounds = list(itertools.accumulate(ntok, initial=first))
    count = (lambda t: len(t.encode("utf-8"))) if task == "enwik8" else len
    units = [count(tokenizer.decode(tokens[s:e])) for s, e in itertools.pairwise(bounds)]
    unit_key = "bits_per_byte" if task == "enwik8" else "bits_per_char"
    metrics, stderr = _ratio_metrics(ll, {unit_key: units, "token_perplexity": ntok},
                                     totals={unit_key: count(tokenizer.decode(tokens[first:bounds[-1]]))})
    return TaskResult(task, len(windows), metrics, stderr, time.perf_counter() - t0, str(path),
                      [[x] for x in ll])


def _ratio_metrics(ll: Sequence[float], denominators: dict[str, Sequence[int]],
                   totals: dict[str, int] | None = None) -> tuple[dict[str, float], dict[str, float | None]]:
    """Perplexities ``exp(-sum ll / sum d)`` and bits ``-sum ll / sum d / ln 2`` with standard errors
    (``totals`` overrides ``sum d`` where the per-item counts are only approximate)."""
    metrics: dict[str, float] = {}
    stderr: dict[str, float | None] = {}
    for key, d in denominators.items():
        r = sum(ll) / (totals or {}).get(key, sum(d))
        se = ratio_stderr(ll, d)
        if key.startswith("bits_per"):
            metrics[key] = -r / math.log(2)
            stderr[key] = None if se is None else se / math.log(2)
        else:
            metrics[key] = math.exp(-r)
            stderr[key] = None if se is None else math.exp(-r) * se
    return metrics, stderr


def run_tasks(model: GPT, tokenizer: Any, tasks: Sequence[str], **kwargs: Any) -> list[TaskResult]:
    """:func:`run_task` for each of ``tasks`` (checked up front, so a typo fails before any work); a
    task named twice runs once (as lm-evaluation-harness's ``--tasks a,a``), in first-named order."""
    tasks = list(dict.fromkeys(tasks))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(map(repr, unknown))}; known: {', '.join(TASKS)}")
    results = []
    for t in tasks:
        try:
            results.append(run_task(model, tokenizer, t, **kwargs))
        except ValueError as e:  # which task (of several) the text, an item or a length problem is in
            raise type(e)(f"task {t}: {e}") from None
    return results


def format_table(results: Sequence[TaskResult]) -> str:
    """A plain-text summary: one line per task and metric."""
    rows = [("task", "metric", "value", "stderr", "items", "items/s")]
    for r in results:
        for i, (key, value) in enumerate(r.metrics.items()):
            se = r.stderr.get(key)
            rows.append((r.task if i == 0 else "", key, f"{value:.4f}", "-" if se is None else f"{se:.4f}",
                         f"{r.num_items:,}" if i == 0 else "",
                         f"{r.num_items / r.seconds:.1f}" if i == 0 and r.seconds > 0 else ""))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if c < 2 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths,
                                                                                             strict=True)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
