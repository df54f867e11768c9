"""Atomic files and folders: what lets a process be killed at any instant without leaving a
half-written file behind.

- :func:`atomic_path` / :func:`atomic_write_bytes` / :func:`atomic_write_json`: write a temp file
  next to the target, fsync it, rename it over the target (POSIX rename is atomic), fsync the folder.
- :func:`replace_dir` / :func:`recover_dir`: replace a whole folder with a finished one; a kill
  between its two renames is undone by :func:`recover_dir`.
- Temp names carry the writer's PID (``.<name>.tmp-<pid>-<random>``), so two processes never
  collide on one, and :func:`remove_stale_temporaries` can tell a dead writer's leftovers from a
  live writer's work in progress.

This module imports nothing else from the package, so every module that writes files can import it
at the top.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# ".<name>.tmp-<pid>" or ".<name>.tmp-<pid>-<random>"
_TEMP_RE = re.compile(r"^\..+\.tmp-(\d+)(?:-[0-9a-z]+)?$")


def temp_sibling(path: str | Path) -> Path:
    """A fresh, unused name next to ``path`` for writing it aside: ``.<name>.tmp-<pid>-<random>``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it over ``path``.
    On an exception the temp file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def fsync_dir(directory: str | Path) -> None:
    """Make a rename durable (POSIX only; a no-op elsewhere)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_tree(path: str | Path) -> None:
    """Remove a file, a symlink (not what it points to) or a folder tree; missing is fine."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def replace_dir(src: str | Path, dst: str | Path) -> None:
    """Move the finished folder ``src`` to ``dst``, replacing ``dst`` as a whole.

    Two renames: ``dst`` -> ``.<name>.old``, then ``src`` -> ``dst``. A kill between them leaves no
    ``dst`` but its old copy, which :func:`recover_dir` puts back, so after recovery there is always
    a complete old or complete new folder."""
    src, dst = Path(src), Path(dst)
    old = dst.with_name(f".{dst.name}.old")
    remove_tree(old)
    if dst.exists() or dst.is_symlink():
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    remove_tree(old)


def recover_dir(dst: str | Path) -> None:
    """Undo a :func:`replace_dir` that was killed between its two renames."""
    dst = Path(dst)
    old = dst.with_name(f".{dst.name}.old")
    if (old.exists() or old.is_symlink()) and not (dst.exists() or dst.is_symlink()):
        os.replace(old, dst)
    else:
        remove_tree(old)


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists but belongs to someone else
        return True
    return True


def remove_stale_temporaries(directory: str | Path, *, name: str | None = None,
                             only_dead: bool = True) -> list[Path]:
    """Delete the temp files and folders (``.<name>.tmp-<pid>...``, only those of ``name`` if
    given) in ``directory`` whose writer is gone (``only_dead``), or all of them (when the caller
    holds the folder's lock, no one else can be writing there). Returns what was removed."""
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for path in directory.iterdir():
        m = _TEMP_RE.match(path.name)
        if name is not None and not path.name.startswith(f".{name}.tmp-"):
            continue
        if m and (not only_dead or not pid_alive(int(m.group(1)))):
            remove_tree(path)
            removed.append(path)
    return removed
