"""``gpt2 prepare`` throughput and memory on a large synthetic corpus (GPT-2 BPE).

Generates a corpus of ``--mb`` MB (default 220) in a temporary folder: copies of Tiny Shakespeare
whose lines are shuffled per file (so no two files are alike) with a few mixed-script lines, one
~1.1 MB file per document. Then runs, each as a separate child process:

- ``ours``: ``python -m gpt2model prepare <folder> --tokenizer gpt2`` on the whole corpus;
- ``ours (slice)`` and ``nanoGPT-style`` on the same ``--peer-mb`` MB slice: the peer reads the
  whole file, calls tiktoken's single-threaded ``encode_ordinary`` and writes ``np.array(ids)``, as
  nanoGPT's ``prepare.py`` does (it cannot stream, so the whole corpus would need ~36 bytes of
  Python int per token of RAM; the slice keeps it affordable).

Reports wall time, MB/s, tokens/s and each child's peak RSS (``resource.getrusage(RUSAGE_CHILDREN)``
``.ru_maxrss`` measured in the parent of that child alone), the ratio against the peer and whether
both wrote identical tokens. Usage: ``python bench/bench_prepare.py [--mb 220] [--peer-mb 20]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import format_table, write_json  # noqa: E402

from gpt2model.assets import asset_path  # noqa: E402

EXTRA_LINES = ["Café, naïve, déjà vu — «quoted» text.", "日本語の文章と中文句子。", "emoji 🎉👍🏽 and code: "
               "def f(x):\treturn x ** 2", "    indented    runs   of spaces  ", "Ελληνικά και русский текст."]

PEER = r"""
import sys, numpy as np
from gpt2model.tokenizer import GPT2Tokenizer
enc = GPT2Tokenizer()._enc
text = open(sys.argv[1], encoding="utf-8").read()
ids = enc.encode_ordinary(text)
np.array(ids, dtype=np.uint16).tofile(sys.argv[2])
print(len(ids))
"""


def make_corpus(folder: Path, megabytes: int, seed: int = 0) -> int:
    """Write ~``megabytes`` MB of text files into ``folder``; return the total bytes."""
    lines = asset_path("tinyshakespeare/input.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    total, i = 0, 0
    while total < megabytes * 1_000_000:
        order = rng.permutation(len(lines))
        extra = [EXTRA_LINES[j % len(EXTRA_LINES)] + "\n" for j in rng.integers(0, 1000, size=200)]
        body = [lines[k] for k in order] + extra
        rng.shuffle(body)
        data = "".join(body).encode()
        (folder / f"doc{i:04d}.txt").write_bytes(data)
        total += len(data)
        i += 1
    return total


def run_child(cmd: list[str]) -> tuple[float, str]:
    """Run ``cmd`` to completion; return (wall seconds, its stdout)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=220, help="corpus size in MB (default 220)")
    parser.add_argument("--peer-mb", type=int, default=20, help="slice for the nanoGPT-style peer (default 20)")
    args = parser.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        total = make_corpus(tmp / "corpus", args.mb)
        print(f"corpus: {total / 1e6:.0f} MB in {len(list((tmp / 'corpus').iterdir()))} files "
              f"({time.perf_counter() - t0:.0f} s to write)", flush=True)
        rows = []

        def record(name: str, wall: float, rss: float, nbytes: int, tokens: int) -> None:
            rows.append({"case": name, "wall_s": wall, "MB_per_s": nbytes / 1e6 / wall,
                         "tokens_per_s": tokens / wall, "tokens": tokens, "peak_rss_mib": rss})
            print(format_table(rows[-1:], COLUMNS), flush=True)

        # 1. ours, whole corpus. First child: its peak is exactly RUSAGE_CHILDREN's ru_maxrss.
        wall, _ = run_child([py, "-m", "gpt2model", "prepare", str(tmp / "corpus"), "--tokenizer", "gpt2",
                             "--out", str(tmp / "out"), "--quiet"])
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        meta = json.loads((tmp / "out" / "meta.json").read_text())
        record("ours (whole corpus)", wall, rss, total, sum(meta["tokens"].values()))

        # 2. the same slice for ours and the peer. RUSAGE_CHILDREN's ru_maxrss is a maximum over all
        # children so far, so each runs under a fresh python that reports its own child's peak.
        slice_path = tmp / "slice.txt"
        with open(slice_path, "wb") as f:
            for p in sorted((tmp / "corpus").iterdir()):
                if f.tell() >= args.peer_mb * 1_000_000:
                    break
                f.write(p.read_bytes())
        nbytes = slice_path.stat().st_size
        wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
                   "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); sys.exit(r.returncode)")
        results = {}
        for name, cmd in (("ours (slice)", [py, "-m", "gpt2model", "prepare", str(slice_path), "--tokenizer",
                                             "gpt2", "--out", str(tmp / "out_slice"), "--val-fraction", "0",
                                             "--quiet"]),
                          ("nanoGPT-style (slice)", [py, "-c", PEER, str(slice_path), str(tmp / "peer.bin")])):
            wall, out = run_child([py, "-c", wrapper, *cmd])
            rss = float(out.strip().splitlines()[-1])
            tokens = (tmp / ("out_slice/train.bin" if "ours" in name else "peer.bin")).stat().st_size // 2
            record(name, wall, rss, nbytes, tokens)
            results[name] = rows[-1]
        same = np.array_equal(np.fromfile(tmp / "out_slice" / "train.bin", np.uint16),
                              np.fromfile(tmp / "peer.bin", np.uint16))
        print()
        print(format_table(rows, COLUMNS))
        ratio = results["ours (slice)"]["MB_per_s"] / results["nanoGPT-style (slice)"]["MB_per_s"]
        print(f"\nours / nanoGPT-style throughput on the slice: {ratio:.2f}x; token files identical: {same}"
              f"; cores: {len(os.sched_getaffinity(0))}")
        path = write_json({"bench": "prepare", "corpus_bytes": total, "rows": rows, "ratio_vs_peer": ratio,
                           "identical_to_peer": same, "cores": len(os.sched_getaffinity(0))})
        print(f"results: {path}")


COLUMNS = [("case", "case"), ("wall_s", "wall s"), ("MB_per_s", "MB/s"), ("tokens_per_s", "tokens/s"),
           ("tokens", "tokens"), ("peak_rss_mib", "peak RSS MiB")]

if __name__ == "__main__":
    main()
