"""Writing result files so that a reader never sees half of one."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sodp3d.errors import UserError

# Operating-system errors that mean "this write cannot be done here": each becomes one line.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM})


def is_write_failure(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in WRITE_ERRNOS


def reraise_write_failure(e: OSError, place: str | Path, intact: str):
    """Raise ``e`` again; a write failure as ``write_failed``'s one line instead: the file (or
    ``place``), the cause, and ``intact`` (what is intact)."""
    if is_write_failure(e):
        raise write_failed(e.filename or place, e, intact) from None
    raise e


def last_good(saved: str | None, ckpt: str | Path) -> str:
    """What a run's checkpoint leaves intact: "the last good checkpoint, <saved>, is <ckpt>"."""
    return f"the last good checkpoint, {saved}, is {ckpt}" if saved else "no checkpoint was written"


def write_failed(path: str | Path, error: OSError, intact: str) -> UserError:
    """The one line for a failed write: the path, the cause as the system says it ("no space
    left on device"), and what is intact."""
    cause = os.strerror(error.errno).lower() if error.errno else (str(error) or type(error).__name__)
    return UserError(f"could not write {path}: {cause}; {intact}")


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yields a hidden sibling of ``path`` to write (it keeps the suffix, so libraries that
    choose a format by it still do); renamed over ``path`` when the block succeeds,
    removed when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """``text`` into ``path`` atomically; a failed write (a full disk, ...) leaves the previous
    file, or none, and is one line (``write_failed``)."""
    existed = Path(path).exists()
    try:
        with atomic_write(path) as tmp:
            tmp.write_text(text)
    except OSError as e:
        raise write_failed(path, e, "its previous version is intact" if existed else "nothing was written there") from None
    return Path(path)
