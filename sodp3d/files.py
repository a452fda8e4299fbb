"""Writing result files so that a reader never sees half of one."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return Path(path)
