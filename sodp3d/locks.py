"""One writer per place: an exclusive lock held by each command for as long as it writes.

``finetune`` and ``pretrain`` lock their run directory, ``collect`` its store, ``sweep`` its
root and ``demo`` its directory. A second writer of the same place is refused at once, in
one line naming the place and the holder's pid, before it writes anything. Readers
(``eval``, ``report``, ``viz``) take no lock.

The lock is the operating system's (``fcntl.flock``) on a hidden file beside the place,
``<parent>/.<name>.lock``, which holds the holder's pid and command for the message. The
kernel releases it when the holder exits in any way, ``kill -9`` included, so a lock left
by a dead process never blocks the next run. The file is removed when the lock is
released; a file left by a killed holder is simply locked again by the next writer.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sodp3d.errors import UserError


def lock_path(place: str | Path) -> Path:
    """The lock file of a place: a hidden sibling, so the place itself holds only its data."""
    place = Path(place).expanduser().absolute()
    return place.parent / f".{place.name}.lock"


def holder(place: str | Path) -> str | None:
    """What the lock file of ``place`` says of its holder ("pid 123, sodp3d finetune"), or None."""
    try:
        text = lock_path(place).read_text().strip()
    except OSError:
        return None
    return text or None


class WriterBusy(UserError):
    """Another process holds the place's writer lock."""


def _acquire(path: Path) -> int:
    """An open descriptor of ``path`` holding its exclusive lock, or WriterBusy. Retries
    when the file was replaced between opening and locking (a holder releasing removes it)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WriterBusy("") from None
            raise
        try:  # the file we locked must still be the one at the path
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextmanager
def writer_lock(place: str | Path, what: str) -> Iterator[Path]:
    """Holds the exclusive writer lock of ``place`` (a run directory, a store, a sweep root)
    for the block. ``what`` names the command in the holder record, e.g. "sodp3d finetune".
    A place held by another process is a UserError naming it and the holder's pid."""
    path = lock_path(place)
    made = []  # parent directories this lock created, removed again if left empty
    for parent in reversed(path.parents):
        if not parent.exists():
            made.append(parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = _acquire(path)
    except WriterBusy:
        who = holder(place) or "another process"
        raise WriterBusy(f"{Path(place)} is being written by {who}; wait for it to finish, or choose another "
                         "place to write") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, {what}\n".encode())
        yield Path(place)
    finally:
        try:
            path.unlink(missing_ok=True)  # before the release: a waiting writer then retries on a new file
        finally:
            os.close(fd)
        for parent in reversed(made):  # deepest first
            try:
                parent.rmdir()
            except OSError:
                break  # not empty: something was written there
