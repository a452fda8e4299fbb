"""What a collection worker process needs: per-episode seeding, a per-process env cache,
and the pool initialiser.

Every data source (``scripted_source``, ``sac_source``) runs its jobs through these, in
the main process or in spawned pool workers; ``collect`` empties the cache when a
collection ends.
"""

from __future__ import annotations

import multiprocessing as mp
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .factory import ensure_headless_gl, make_env, worker_start_method
from .settings import ObsSettings


def episode_rng(seed: int, task: str, index: int) -> np.random.Generator:
    """The random stream of one episode, fixed by (seed, task, episode index)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(task.encode()), int(index)]))


# Envs are cached per process: one per (task, settings).
_ENVS: dict[tuple, Any] = {}


def env_for(settings: ObsSettings):
    key = (settings.task, repr(settings))
    if key not in _ENVS:
        _ENVS[key] = make_env(settings.task, settings=settings)
    return _ENVS[key]


def close_envs() -> None:
    """Release this process's cached environments (and their GL contexts)."""
    for env in _ENVS.values():
        env.close()
    _ENVS.clear()


def init_worker() -> None:
    ensure_headless_gl()
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def run_in_order(job: Callable[[tuple], dict[str, Any]], jobs: list[tuple], workers: int) -> Iterator[dict[str, Any]]:
    """``job(args)`` for every args of ``jobs``, yielded in order: in this process with one
    worker (or one job), else in a pool of ``workers`` processes (``job`` must be a
    module-level function)."""
    if workers <= 1 or len(jobs) <= 1:
        for args in jobs:
            yield job(args)
        return
    ctx = mp.get_context(worker_start_method())
    with ctx.Pool(min(workers, len(jobs)), initializer=init_worker) as pool:
        yield from pool.imap(job, jobs, chunksize=1)
