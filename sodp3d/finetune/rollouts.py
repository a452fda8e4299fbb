"""Rollouts for fine-tuning: every environment runs one episode, and each executed chunk
keeps what PPO needs, its observations, its whole DDIM chain, the chain's per-step
log-probabilities under the sampling weights, and its reward.

Shapes: M collected chunks, C chunks of one episode, T executed steps, To observed steps,
Tp predicted steps, Ta executed steps, Da action dim, S DDIM steps, E parallel envs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sodp3d.diffusion import DDIMSampler
from sodp3d.policy import DiffusionPolicy

@dataclass
class Trajectory:
    """One episode as the target buffer keeps it."""

    obs: dict[str, np.ndarray]        # per chunk: (C, To, ...) observation windows
    actions: np.ndarray               # (T, Da) executed actions, in order
    chunk_starts: np.ndarray          # (C,) index of each chunk's first executed action
    ret: float
    success: bool
    final_obs: dict[str, np.ndarray] | None = None  # (To, ...) the observation after the last chunk
    terminated: bool = False          # ended in a terminal state (not by the time limit)


@dataclass
class Rollout:
    """Chunks for PPO (torch, CPU) and the episodes they came from."""

    obs: dict[str, torch.Tensor]      # (M, To, ...)
    chains: torch.Tensor              # (M, S+1, Tp, Da), normalised action space
    old_logp: torch.Tensor            # (M, S)
    reward: torch.Tensor              # (M,)
    trajectories: list[Trajectory] = field(default_factory=list)  # in the order of their chunks
    executed: torch.Tensor | None = None  # (M,) steps each chunk executed (Ta, fewer when the episode ended inside it)
    env_steps: int = 0
    seconds: float = 0.0

    @property
    def size(self) -> int:
        return int(self.reward.shape[0])

    def episode_slices(self) -> list[slice]:
        """Each trajectory's chunks in the flat (M,) order."""
        ends = np.cumsum([len(t.chunk_starts) for t in self.trajectories])
        if not len(ends) or ends[-1] != self.size:
            raise ValueError(f"the rollout's {len(self.trajectories)} trajectories hold {ends[-1] if len(ends) else 0} "
                             f"chunks, not its {self.size}")
        return [slice(int(a), int(b)) for a, b in zip(np.concatenate([[0], ends[:-1]]), ends)]

    @staticmethod
    def concat(rollouts: list["Rollout"]) -> "Rollout":
        """Several rollouts as one batch, their chunks and episodes in order."""
        if len(rollouts) == 1:
            return rollouts[0]
        executed = [r.executed for r in rollouts]
        return Rollout(
            obs={k: torch.cat([r.obs[k] for r in rollouts]) for k in rollouts[0].obs},
            chains=torch.cat([r.chains for r in rollouts]),
            old_logp=torch.cat([r.old_logp for r in rollouts]),
            reward=torch.cat([r.reward for r in rollouts]),
            trajectories=[t for r in rollouts for t in r.trajectories],
            executed=None if any(e is None for e in executed) else torch.cat(executed),
            env_steps=sum(r.env_steps for r in rollouts),
            seconds=sum(r.seconds for r in rollouts),
        )

    def positions(self) -> torch.Tensor:
        """(M,) each chunk's index within its episode."""
        return torch.as_tensor(np.concatenate([np.arange(len(t.chunk_starts)) for t in self.trajectories]))


def collect_rollout(policy: DiffusionPolicy, vec, sampler: DDIMSampler, seeds: list[int],
            generator: torch.Generator | None = None) -> Rollout:
    """One episode in each of the E environments (lockstep), sampling chains with eta > 0."""
    E = len(seeds)
    t0 = time.perf_counter()
    obs, _ = vec.reset(seed=seeds)
    done = np.zeros(E, bool)
    per_env: list[dict[str, Any]] = [{"obs": [], "chains": [], "logp": [], "reward": [], "actions": [],
                                      "starts": [], "executed": [], "success": False, "final": None,
                                      "terminated": False} for _ in range(E)]
    steps = 0
    policy.eval()
    while not done.all():
        o = {k: obs[k] for k in policy.obs_keys}
        sampled = policy.sample_chain(o, sampler, generator, log_prob=True)
        actions = sampled.action.cpu().numpy()
        chain, logp = sampled.chain.cpu(), sampled.log_prob.cpu()  # one device transfer per chunk
        obs, reward, terminated, truncated, info = vec.step(actions)
        executed = np.asarray(info["executed"])
        success = np.asarray(info["success"], bool)
        for e in np.nonzero(~done)[0]:
            rec = per_env[e]
            rec["obs"].append({k: np.asarray(o[k][e]) for k in policy.obs_keys})
            rec["chains"].append(chain[e])
            rec["logp"].append(logp[e])
            rec["reward"].append(float(reward[e]))
            rec["starts"].append(len(rec["actions"]))
            rec["actions"].extend(actions[e, : executed[e]])
            rec["executed"].append(int(executed[e]))
            rec["success"] |= bool(success[e])
            steps += int(executed[e])
            if terminated[e] or truncated[e]:  # the vector env resets it on its next step, not before
                rec["final"] = {k: np.asarray(obs[k][e]) for k in policy.obs_keys}
                rec["terminated"] = bool(terminated[e])
        done |= terminated | truncated
    trajectories = []
    for rec in per_env:
        trajectories.append(Trajectory(
            obs={k: np.stack([c[k] for c in rec["obs"]]) for k in policy.obs_keys},
            actions=np.asarray(rec["actions"], np.float32),
            chunk_starts=np.asarray(rec["starts"], np.int64),
            ret=float(sum(rec["reward"])),
            success=bool(rec["success"]),
            final_obs=rec["final"],
            terminated=rec["terminated"],
        ))
    return Rollout(
        obs={k: torch.as_tensor(np.concatenate([t.obs[k] for t in trajectories])) for k in policy.obs_keys},
        chains=torch.cat([torch.stack(r["chains"]) for r in per_env]),
        old_logp=torch.cat([torch.stack(r["logp"]) for r in per_env]),
        reward=torch.as_tensor([x for r in per_env for x in r["reward"]], dtype=torch.float32),
        trajectories=trajectories,
        executed=torch.as_tensor([x for r in per_env for x in r["executed"]], dtype=torch.long),
        env_steps=steps,
        seconds=time.perf_counter() - t0,
    )
