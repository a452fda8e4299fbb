"""Writing result files so that a reader never sees half of one."""

from __future__ import annotations

from pathlib import Path


def temp_path(path: str | Path) -> Path:
    """A hidden sibling to write first and then rename over ``path`` (keeps the suffix,
    so libraries that choose a format by it still do)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp{path.suffix}")


def write_text_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    tmp.write_text(text)
    tmp.replace(path)
    return path
