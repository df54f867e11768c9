"""Atomic files and folders: what lets a process be killed at any instant without leaving a
half-written file behind.

- :func:`atomic_path` / :func:`atomic_write_bytes` / :func:`atomic_write_json`: write a temp file
  next to the target, fsync it, rename it over the target (POSIX rename is atomic), fsync the folder.
- :func:`replace_dir` / :func:`recover_dir`: replace a whole folder with a finished one. On Linux
  one ``renameat2(RENAME_EXCHANGE)`` swaps the two folders, so a reader never finds the folder
  missing; elsewhere two renames, and a kill between them is undone by :func:`recover_dir`.
- :class:`FolderLock`: an exclusive ``fcntl.flock`` on a lock file, held for a whole ``train`` or
  ``prepare``. The OS drops it when the process dies, so a SIGKILLed run never leaves a stale lock.
- :class:`DiskFullError`: ``ENOSPC`` while writing, naming the file and the filesystem; atomic
  writes leave the previous version of the file untouched.
- Temp names carry the writer's PID (``.<name>.tmp-<pid>-<random>``), so two processes never
  collide on one, and :func:`remove_stale_temporaries` can tell a dead writer's leftovers from a
  live writer's work in progress.

This module imports nothing else from the package, so every module that writes files can import it
at the top.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no flock; FolderLock then only records the PID
    fcntl = None  # type: ignore[assignment]

BOM = "\ufeff"  # U+FEFF at the start of a text file: a byte-order mark, no part of the text
# ".<name>.tmp-<pid>" or ".<name>.tmp-<pid>-<random>"
_TEMP_RE = re.compile(r"^\..+\.tmp-(\d+)(?:-[0-9a-z]+)?$")


def temp_sibling(path: str | Path) -> Path:
    """A fresh, unused name next to ``path`` for writing it aside: ``.<name>.tmp-<pid>-<random>``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


class DiskFullError(OSError):
    """No space left on the filesystem while writing ``filename``."""

    def __init__(self, filename: str | Path) -> None:
        path = Path(filename)
        super().__init__(errno.ENOSPC, f"no space left on {mount_point(path)} while writing {path}", str(path))


def mount_point(path: str | Path) -> Path:
    """The mount point of the filesystem holding ``path`` (the device a user has to free)."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


@contextlib.contextmanager
def disk_full_names(path: str | Path) -> Iterator[None]:
    """Turn ``ENOSPC`` raised inside the block into a :class:`DiskFullError` naming ``path``; any
    other error about ``path``'s temp sibling (:func:`temp_sibling`, e.g. a read-only file system)
    names ``path``, the file the user asked for, instead."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DiskFullError(path) from e
        if e.filename is not None and Path(os.fsdecode(e.filename)).name.startswith(f".{Path(path).name}.tmp-"):
            e.filename = str(path)
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it over ``path``.
    On an exception (a full disk included: :class:`DiskFullError`) the temp file is removed and
    ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        with disk_full_names(path):
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        # (a read-only file system refuses even unlinking a missing file, EROFS: that must not
        # replace the error being raised)
        with contextlib.suppress(OSError):
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


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # old kernel or a filesystem without it
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def replace_dir(src: str | Path, dst: str | Path) -> None:
    """Move the finished folder ``src`` to ``dst``, replacing ``dst`` as a whole.

    Where the OS can (Linux), one atomic exchange of the two folders: a reader of ``dst`` finds the
    complete old or the complete new folder at every instant, then the old one is deleted.
    Elsewhere two renames, ``dst`` -> ``.<name>.old`` and ``src`` -> ``dst``; a kill between them
    leaves no ``dst`` but its old copy, which :func:`recover_dir` puts back."""
    src, dst = Path(src), Path(dst)
    if dst.is_dir() and not dst.is_symlink() and _exchange(src, dst):
        fsync_dir(dst.parent)
        remove_tree(src)  # now the old folder
        return
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


class FolderBusyError(RuntimeError):
    """Another process holds the lock of a run folder or dataset."""


class FolderLock:
    """An exclusive lock on ``lock_file`` (``fcntl.flock``), held from :meth:`acquire` (or ``with``)
    until :meth:`release` or the process's death. The holder's PID is written into the file so a
    second process can name it; ``what`` says what is locked in that message.

    ``remove=True`` deletes the lock file at :meth:`release` (a dataset's ``.<name>.lock`` beside the
    folder should not outlive ``gpt2 prepare``). That is race-free because the file is unlinked while
    still locked, and :meth:`acquire` checks after locking that the path still names the file it
    locked (else it locked a file just unlinked by its holder, and tries again on the new one)."""

    def __init__(self, lock_file: str | Path, what: str, *, remove: bool = False) -> None:
        self.path = Path(lock_file)
        self.what = what
        self.remove = remove
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is None:
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                pid = f"PID {holder}" if holder.isdigit() else "another process"
                raise FolderBusyError(f"{self.what} is in use by {pid} (lock file {self.path}); wait for it to "
                                      f"finish or stop it, or use another folder") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its holder removed it between our open and our lock: lock the file there now
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            if self.remove:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()  # while still locked: see the class docstring
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_text_file(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file's contents; a missing file or non-UTF-8 bytes are errors naming the file
    (and the byte offset). A byte-order mark at the start (Windows editors write one) is dropped:
    it marks the encoding and is no part of the text (``"utf-8-sig"``)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a text file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    try:
        return data.decode("utf-8").removeprefix(BOM)
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text: byte offset {e.start} ({e.reason}); is it a binary "
                         f"file? Convert it to UTF-8") from None
