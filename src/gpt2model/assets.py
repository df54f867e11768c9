"""Where the data files live: ``$GPT2MODEL_DATA`` (a folder laid out like ``shared/data``) or a
per-user cache folder, with a sha256-checked download where a network exists."""

from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path

# relative path -> (url, sha256)
ASSETS: dict[str, tuple[str, str]] = {
    "tinyshakespeare/input.txt": (
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    ),
    "gpt2/encoder.json": (
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    ),
    # OpenAI's LAMBADA test set (the GPT-2 paper's; lm-eval's lambada_openai), for `gpt2 eval --task lambada`.
    "lambada/lambada_test.jsonl": (
        "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl",
        "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226",
    ),
    "gpt2/vocab.bpe": (
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    ),
}


def data_dir() -> Path:
    """``$GPT2MODEL_DATA`` if set, else ``$XDG_CACHE_HOME/gpt2model`` (``~/.cache/gpt2model``)."""
    env = os.environ.get("GPT2MODEL_DATA")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "gpt2model"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def asset_path(name: str) -> Path:
    """Path of a known data file (e.g. ``"gpt2/vocab.bpe"``), downloading it if it is missing.

    Raises ``FileNotFoundError`` naming ``GPT2MODEL_DATA`` when the file is absent and cannot be
    downloaded, and ``ValueError`` when a downloaded file's sha256 is wrong.
    """
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known: {sorted(ASSETS)}")
    path = data_dir() / name
    if path.is_file():
        return path
    url, sha = ASSETS[name]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise FileNotFoundError(
            f"{path} is missing and could not be downloaded from {url} ({type(e).__name__}: {e}). "
            f"Set GPT2MODEL_DATA to a folder that holds {name} (e.g. the project's ../shared/data)"
        ) from None
    got = sha256_file(tmp)
    if got != sha:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"download of {url} has sha256 {got}, expected {sha}; not using it")
    os.replace(tmp, path)
    return path
