"""Task names and task sets, and turning a user's ``task=`` value into a list of tasks.

``task`` may be one task (``reach-v3``), a set (``mt10``, ``mt50``, ``adroit``) or a list
of either (Hydra: ``task=[reach-v3,push-v3]``). Order is kept and duplicates dropped.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from functools import lru_cache

from sodp3d.errors import UserError

# Our name -> gymnasium-robotics id, action dim.
ADROIT_TASKS: dict[str, tuple[str, int]] = {
    "adroit-door": ("AdroitHandDoor-v1", 28),
    "adroit-hammer": ("AdroitHandHammer-v1", 26),
    "adroit-pen": ("AdroitHandPen-v1", 24),
}


@lru_cache(maxsize=1)
def metaworld_tasks() -> tuple[str, ...]:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    return tuple(ALL_V3_ENVIRONMENTS)


@lru_cache(maxsize=1)
def task_sets() -> dict[str, tuple[str, ...]]:
    from metaworld.env_dict import MT10_V3, MT50_V3

    return {"mt10": tuple(MT10_V3), "mt50": tuple(MT50_V3), "adroit": tuple(ADROIT_TASKS)}


def all_tasks() -> tuple[str, ...]:
    return metaworld_tasks() + tuple(ADROIT_TASKS)


def suite_of(task: str) -> str:
    """'metaworld' or 'adroit'."""
    if task in ADROIT_TASKS:
        return "adroit"
    if task in metaworld_tasks():
        return "metaworld"
    raise UserError(_unknown(task))


def _unknown(name: str) -> str:
    close = difflib.get_close_matches(name, list(all_tasks()) + list(task_sets()), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return (
        f"unknown task or set '{name}'{hint}; valid sets: {', '.join(task_sets())}; "
        f"valid tasks: {', '.join(all_tasks())}"
    )


def resolve_tasks(spec: str | Sequence[str] | None) -> list[str]:
    """Expand a task spec into an ordered list of distinct task names."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        raise UserError("no task given; pass task=<task|set|[list]>, for example task=reach-v3 or task=mt10")
    items: Iterable[str] = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise UserError(f"task entries must be names, got {item!r}")
        name = item.strip()
        names = task_sets().get(name.lower())
        if names is None:
            if name not in all_tasks():
                raise UserError(_unknown(name))
            names = (name,)
        out.extend(n for n in names if n not in out)
    if not out:
        raise UserError("the task list is empty; pass task=<task|set|[list]>")
    return out
