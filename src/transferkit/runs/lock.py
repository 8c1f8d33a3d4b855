"""One writer per run folder: an exclusive lock beside it, held from the start of a fit to the end of its save.

Two fits into one ``--out`` would each report success while the second replaced the first. The lock is
``fcntl.flock`` on ``.OUT.lock`` in OUT's parent folder (beside OUT, not in it: the save swaps OUT whole), so the
kernel releases it when its process ends however it ends (kill -9 included), and no stale lock needs breaking.
The file holds the writer's pid, for the message of the process that is refused.

A process re-enters a lock it holds (the CLI's fit holds it, and the save it calls takes it again). Where
``fcntl`` does not exist (Windows) there is no lock, as before.

Example:
    >>> with run_folder_lock(Path("runs/plants")):  # doctest: +SKIP
    ...     clf.fit("data/plants").save("runs/plants")
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from transferkit.errors import RunError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)
_HELD: dict[Path, int] = {}  # this process's locks: lock file -> times entered


def lock_file(out: Path) -> Path:
    """Where the lock of run folder `out` lives: ``.NAME.lock`` beside it."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}.lock"


class FolderBusyError(RunError):
    """Another process is writing the run folder."""


@contextlib.contextmanager
def run_folder_lock(out: Path, what: str = "fit") -> Iterator[None]:
    """Hold the run folder `out` for this process; refuse at once if another process holds it.

    Raises:
        FolderBusyError: another transferkit process (its pid named) is writing `out`.
    """
    path = lock_file(out)
    if path in _HELD or fcntl is None:
        _HELD[path] = _HELD.get(path, 0) + 1
        try:
            yield
        finally:
            _release_count(path)
        return
    created = _missing_folders(path.parent)
    fd = _acquire(path, Path(out), what)
    _HELD[path] = 1
    try:
        yield
    finally:
        del _HELD[path]
        with contextlib.suppress(OSError):
            path.unlink()  # before the unlock: a process that opened this file meanwhile sees it gone and retries
        os.close(fd)
        for folder in created:  # a fit that failed leaves no empty runs/ behind; rmdir refuses a folder with a run in it
            try:
                folder.rmdir()
            except OSError:
                break


def _missing_folders(folder: Path) -> list[Path]:
    """The folders the lock file's creation makes, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _release_count(path: Path) -> None:
    _HELD[path] -= 1
    if _HELD[path] == 0:
        del _HELD[path]


def _acquire(path: Path, out: Path, what: str) -> int:
    """The locked file's descriptor, with this pid written in it."""
    assert fcntl is not None
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunError(f"Cannot write beside {out} ({path}: {e.strerror}). Choose a folder you can write to with --out.") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderBusyError(_busy_message(path, out, what)) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # its holder removed it as it finished: lock the new one
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _busy_message(path: Path, out: Path, what: str) -> str:
    try:
        pid = path.read_text().strip() or "?"
    except OSError:
        pid = "?"
    return (
        f"{out} is being written by another transferkit process (pid {pid}); a second {what} into it would replace "
        f"that one's results. Wait for it to finish, or give this {what} another folder with --out."
    )
