"""Zero-shot task speed: items/s of ``gpt2 eval --task`` (gpt2model.tasks) against lm-evaluation-harness's
``hf`` model, on the committed fixtures (tests/fixtures/tasks), the same saved model folder and the
same batch size.

Both sides are timed from documents to metrics (request building, tokenisation, scoring, metrics);
lm-eval's task loading (``datasets``) happens once before timing. Each side runs in its own forked
process, ``--rounds`` times interleaved, and every figure is the median over rounds (min and max
beside it). The model is random-init (no weights can be downloaded here) with the GPT-2 (124M)
shape: the work per item is that of the real model. ``python bench/bench_tasks.py`` prints a
table and writes JSON to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, machine_info, run_isolated, summarize, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "tasks"
SHAPES = {
    "gpt2": dict(context_length=1024, vocab_size=50257, n_layer=12, n_head=12, d_model=768),
    "tiny": dict(context_length=64, vocab_size=50257, n_layer=2, n_head=2, d_model=32),
}
TASKS = ("hellaswag", "lambada", "wikitext2")
COLUMNS = [("task", "task"), ("items", "items"), ("batch", "batch"), ("ours", "ours items/s"), ("ours_min", "min"),
           ("ours_max", "max"), ("lm_eval", "lm-eval items/s"), ("peer_min", "min"), ("peer_max", "max"),
           ("ratio", "ours / lm-eval")]


def _save_model(shape: str, directory: Path) -> None:
    import torch

    from gpt2model import GPT, GPTconfig, load_tokenizer

    torch.manual_seed(0)
    GPT(GPTconfig(**SHAPES[shape])).save_pretrained(directory, tokenizer=load_tokenizer("gpt2"))


def _ours(model_dir: str, tasks: tuple[str, ...], batch_size: int, threads: int | None) -> dict[str, Any]:
    """Child process: load the model once, then time each task from documents to metrics."""
    import torch

    from gpt2model import GPT, load_tokenizer
    from gpt2model.tasks import run_task

    if threads:
        torch.set_num_threads(threads)
    os.environ["GPT2MODEL_DATA"] = str(FIXTURES)
    model, tok = GPT.from_pretrained(model_dir).eval(), load_tokenizer(model_dir)
    run_task(model, tok, "lambada", limit=2, batch_size=batch_size)  # warm-up
    out = {}
    for task in tasks:
        t0 = time.perf_counter()
        r = run_task(model, tok, task, batch_size=batch_size)
        out[task] = {"items": r.num_items, "seconds": time.perf_counter() - t0}
    return out


def _peer(model_dir: str, tasks: tuple[str, ...], batch_size: int, threads: int | None) -> dict[str, Any]:
    """Child process: lm-eval's hf model on the same folder; tasks loaded before timing."""
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                      TOKENIZERS_PARALLELISM="false")
    import torch
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict
    from lm_eval_tasks import write_lm_eval_configs

    from gpt2model.tasks import wikitext_pages

    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as d:
        os.environ["HF_DATASETS_CACHE"] = str(Path(d) / "cache")
        pages = wikitext_pages((FIXTURES / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8"))
        names = write_lm_eval_configs(Path(d), pages)
        lm = HFLM(pretrained=model_dir, dtype="float32", device="cpu", batch_size=batch_size)
        manager = TaskManager(include_path=d)
        out = {}
        for task in tasks:
            task_dict = get_task_dict([names[task]], manager)
            t0 = time.perf_counter()
            res = evaluate(lm, task_dict, bootstrap_iters=0, verbosity="ERROR")
            out[task] = {"items": res["n-samples"][names[task]]["effective"], "seconds": time.perf_counter() - t0}
    return out


def run(shape: str = "gpt2", batch_size: int = 8, rounds: int = 2, tasks: tuple[str, ...] = TASKS,
        threads: int | None = None) -> list[dict[str, Any]]:
    """One row per task: items/s of ours and of lm-eval (median over ``rounds`` interleaved runs)."""
    with tempfile.TemporaryDirectory() as d:
        model_dir = str(Path(d) / "model")
        run_isolated(_save_model, shape, Path(model_dir))
        ours: dict[str, list[float]] = {t: [] for t in tasks}
        peer: dict[str, list[float]] = {t: [] for t in tasks}
        items: dict[str, int] = {}
        for _ in range(rounds):
            for fn, into in ((_ours, ours), (_peer, peer)):
                res, _ = run_isolated(fn, model_dir, tasks, batch_size, threads)
                for t, v in res.items():
                    into[t].append(v["items"] / v["seconds"])
                    items.setdefault(t, v["items"])
                    if items[t] != v["items"]:
                        raise RuntimeError(f"{t}: ours and lm-eval scored different item counts")
    rows = []
    for t in tasks:
        a, b = summarize(ours[t]), summarize(peer[t])
        rows.append({"task": t, "items": items[t], "batch": batch_size, "shape": shape, "ours": a["median"],
                     "ours_min": a["min"], "ours_max": a["max"], "lm_eval": b["median"], "peer_min": b["min"],
                     "peer_max": b["max"], "ratio": a["median"] / b["median"]})
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="gpt2", help="model shape (default: gpt2, 124M)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size of both sides (default: 8)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default: 2)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="JSON output (default: bench/results/tasks-<time>.json)")
    args = p.parse_args(argv)
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    rows = run(args.shape, args.batch_size, args.rounds, tasks, args.threads)
    print(f"zero-shot tasks on the fixtures, {args.shape} shape (random init), batch {args.batch_size}:")
    print(format_table(rows, COLUMNS))
    path = write_json({"machine": machine_info(), "tasks": rows}, args.out)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
