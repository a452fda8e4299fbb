"""How many environments share a process: the vector-env layouts, chosen by config.

    sync     every environment in this process (gymnasium's SyncVectorEnv): no process
             start, no messages; the simulation and the policy take turns on one core.
    async    one process per environment (gymnasium's AsyncVectorEnv): the layout for
             environments that render (a depth frame costs 8-10 ms, so they pay for
             their messages many times over).
    workers  ``workers`` processes holding num_envs / workers environments each: the
             simulation spread over the cores without a process and a message per
             environment (for many cheap, state-only environments).
    auto     async when the environments render; for state-only ones, ``workers`` with 2
             processes (or ``workers`` of them when given) where that divides num_envs,
             else sync: benchmarks/finetune.py --state measured workers fastest at 8-64
             environments on 2 cores (1.5-1.9x one bare env, against 1.2-1.3x async and
             0.9-1.0x sync; docs/benchmarks.md).

``workers`` is built from gymnasium's own pieces: an AsyncVectorEnv whose every
"environment" is an ``EnvGroup``, a SyncVectorEnv of its members behind one gym.Env. The
group never ends itself; its members autoreset as gymnasium's NEXT_STEP mode does, and
their rewards, ends and infos travel in the group's info, flattened back here, so a
``workers`` vector env steps, resets and reports exactly as a sync one of the same
environments and seeds.

Shapes: n environments, k workers, m = n / k environments per worker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from sodp3d.errors import UserError

MODES = ("auto", "sync", "async", "workers")


def resolve_mode(mode: str, num_envs: int, workers: int | None, renders: bool) -> tuple[str, int]:
    """(the layout, its number of worker processes) for ``num_envs`` environments; a bad
    combination is one line naming the valid values."""
    if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
        raise UserError(f"num_envs must be a positive integer, got {num_envs!r}")
    if mode not in MODES:
        raise UserError(f"unknown vector_env={mode}; valid: {', '.join(MODES)}")
    if mode == "auto":
        if renders:
            mode = "async"
        else:
            k = workers if isinstance(workers, int) and not isinstance(workers, bool) and workers > 1 else 2
            return ("workers", k) if num_envs > 1 and num_envs % k == 0 else ("sync", 1)
    if mode == "workers":
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise UserError(f"vector_env=workers needs env_workers, a positive integer, got {workers!r}")
        if num_envs % workers:
            valid = [d for d in range(1, num_envs + 1) if num_envs % d == 0]
            raise UserError(f"env_workers={workers} does not divide num_envs={num_envs}; "
                            f"valid: {', '.join(map(str, valid))}")
        return ("sync", 1) if workers == 1 else ("workers", workers)
    if mode == "async" and num_envs == 1:
        return "sync", 1
    return mode, (num_envs if mode == "async" else 1)


class EnvGroup(gym.Env):
    """m environments stepped in one process, as one environment of an AsyncVectorEnv.

    Its observation and action are the members' batched; ``step`` returns reward 0 and never
    ends, with the members' rewards, ends and infos under ``info['members']``. ``reset``
    takes the members' seeds from ``options['seeds']`` (the whole vector env's list) at
    this group's offset."""

    def __init__(self, fns: Sequence[Callable[[], gym.Env]], offset: int):
        self.members = gym.vector.SyncVectorEnv(list(fns), autoreset_mode=AutoresetMode.NEXT_STEP)
        self.offset, self.size = int(offset), len(fns)
        self.observation_space = self.members.observation_space
        self.action_space = self.members.action_space

    def reset(self, *, seed=None, options=None):
        seeds = (options or {}).get("seeds")
        mine = None if seeds is None else list(seeds[self.offset:self.offset + self.size])
        obs, info = self.members.reset(seed=mine)
        return obs, {"members": _values(info)}

    def step(self, action):
        obs, reward, terminated, truncated, info = self.members.step(action)
        return obs, 0.0, False, False, {"members": {**_values(info), "reward": reward, "terminated": terminated,
                                                    "truncated": truncated}}

    def close(self):
        self.members.close()


def _values(info: dict[str, Any]) -> dict[str, Any]:
    """A vector env's info without its "_key" masks (the outer vector env would collide with
    them when it batches the groups' infos); ``_flat`` puts them back."""
    return {key: _values(v) if isinstance(v, dict) else v for key, v in info.items() if not key.startswith("_")}


def _flat(info: dict[str, Any], n: int) -> dict[str, Any]:
    """The groups' batched member infos, (k, m, ...) -> (n, ...), with gymnasium's "_key"
    masks (every member reports every key: each step of ActionChunking does)."""
    out: dict[str, Any] = {}
    for key, v in info.items():
        if key.startswith("_"):
            continue  # the masks the batching of the groups added, (k,)
        out[key] = _flat(v, n) if isinstance(v, dict) else np.asarray(v).reshape((n,) + np.shape(v)[2:])
        out[f"_{key}"] = np.ones(n, bool)
    return out


class WorkersVectorEnv(gym.vector.VectorEnv):
    """n environments in k worker processes, m each (see the module docstring)."""

    def __init__(self, fns: Sequence[Callable[[], gym.Env]], workers: int, context: str | None = None):
        from functools import partial

        n, k = len(fns), int(workers)
        m = n // k
        groups = [partial(EnvGroup, fns[i * m:(i + 1) * m], i * m) for i in range(k)]
        self.inner = gym.vector.AsyncVectorEnv(groups, context=context, autoreset_mode=AutoresetMode.NEXT_STEP)
        member = self.inner.single_observation_space  # batched over m
        self.num_envs, self.workers = n, k
        self.single_observation_space = gym.spaces.Dict(
            {key: gym.spaces.Box(s.low[0], s.high[0], dtype=s.dtype) for key, s in member.spaces.items()})
        a = self.inner.single_action_space
        self.single_action_space = gym.spaces.Box(a.low[0], a.high[0], dtype=a.dtype)
        self.observation_space = batch_space(self.single_observation_space, n)
        self.action_space = batch_space(self.single_action_space, n)
        self.metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP}

    def _obs(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {key: v.reshape((self.num_envs,) + v.shape[2:]) for key, v in obs.items()}

    def reset(self, *, seed=None, options=None):
        if seed is None:
            seeds = None
        elif isinstance(seed, int):
            seeds = [seed + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"reset needs {self.num_envs} seeds, got {len(seeds)}")
        obs, info = self.inner.reset(options={**(options or {}), "seeds": seeds})
        return self._obs(obs), _flat(info.get("members", {}), self.num_envs)

    def step(self, actions):
        actions = np.asarray(actions)
        obs, _, _, _, info = self.inner.step(actions.reshape((self.workers, -1) + actions.shape[1:]))
        members = _flat(info["members"], self.num_envs)
        reward, terminated, truncated = (members.pop(key) for key in ("reward", "terminated", "truncated"))
        for key in ("_reward", "_terminated", "_truncated"):
            members.pop(key)
        return self._obs(obs), reward, terminated.astype(bool), truncated.astype(bool), members

    def close_extras(self, **kwargs):
        self.inner.close()
