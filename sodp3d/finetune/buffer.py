"""The target buffer (the paper's eq. 13-15): the proficient behaviour that the BC
regulariser pulls the policy towards.

Shapes: C chunks of one trajectory, B windows, To observed steps, Tp predicted steps, Da action dim.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
import torch

from .rollouts import Trajectory

def action_windows(traj: Trajectory, horizon: int, n_obs_steps: int, chunks: np.ndarray | None = None) -> np.ndarray:
    """(C, Tp, Da): for each chunk (or the chosen ``chunks``), the executed actions from its
    first observed step on, edge-padded at the episode's ends, aligned as the pre-training
    windows are."""
    T = len(traj.actions)
    starts = traj.chunk_starts if chunks is None else traj.chunk_starts[np.asarray(chunks)]
    idx = starts[:, None] - (n_obs_steps - 1) + np.arange(horizon)[None]
    return traj.actions[np.clip(idx, 0, T - 1)]


class TargetBuffer:
    """Trajectory-level buffer of proficient behaviour (the paper's eq. 13-14).

    Keeps the ``capacity`` most recent trajectories; ``proficient()`` are the successful
    ones among them, or, when none succeeded, the ``top_n`` by return.
    """

    def __init__(self, capacity: int = 50, top_n: int = 10):
        self.capacity, self.top_n = int(capacity), int(top_n)
        self.trajectories: deque[Trajectory] = deque(maxlen=self.capacity)

    def add(self, trajectories: list[Trajectory]) -> None:
        self.trajectories.extend(trajectories)

    def proficient(self) -> list[Trajectory]:
        wins = [t for t in self.trajectories if t.success]
        if wins:
            return wins
        return sorted(self.trajectories, key=lambda t: t.ret, reverse=True)[: self.top_n]

    def __len__(self) -> int:
        return len(self.proficient())

    def sample(self, batch_size: int, horizon: int, n_obs_steps: int, rng: np.random.Generator) -> dict[str, Any]:
        """Windows {'obs': {k: (B, To, ...)}, 'action': (B, Tp, Da)} from proficient trajectories."""
        pool = self.proficient()
        if not pool:
            raise RuntimeError("the target buffer is empty")
        counts = np.array([len(t.chunk_starts) for t in pool])
        flat = rng.integers(0, counts.sum(), size=batch_size)
        owner = np.searchsorted(np.cumsum(counts), flat, side="right")
        local = flat - np.concatenate([[0], np.cumsum(counts)[:-1]])[owner]
        obs = {k: np.stack([pool[o].obs[k][i] for o, i in zip(owner, local)]) for k in pool[0].obs}
        acts = np.stack([action_windows(pool[o], horizon, n_obs_steps, [i])[0] for o, i in zip(owner, local)])
        return {"obs": obs, "action": acts.astype(np.float32)}

    def state(self) -> list[dict[str, Any]]:
        return [{"obs": {k: torch.as_tensor(v) for k, v in t.obs.items()}, "actions": torch.as_tensor(t.actions),
                 "chunk_starts": torch.as_tensor(t.chunk_starts),
                 "ret": t.ret, "success": t.success} for t in self.trajectories]

    def load(self, state: list[dict[str, Any]]) -> None:
        self.trajectories.clear()
        for s in state:
            self.trajectories.append(Trajectory(
                obs={k: v.numpy() for k, v in s["obs"].items()}, actions=s["actions"].numpy(),
                chunk_starts=s["chunk_starts"].numpy(),
                ret=float(s["ret"]), success=bool(s["success"])))
