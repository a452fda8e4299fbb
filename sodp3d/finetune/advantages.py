"""The weights the PPO term multiplies its importance ratios by, chosen by ``algo.advantage``.

    reward   the chunk's own reward, standardised over the collected batch by default
             (``normalize_reward``): the paper's eq. 12, no critic;
    gae      DPPO's: generalised advantage estimation over the env's chunk steps with a
             learned V(obs) (sodp3d.finetune.critic), standardised over the batch.

GAE runs over each episode's chunks (the outer MDP: one step = one executed chunk):

    delta_c = r_c + g_c * V(s_{c+1}) - V(s_c),     A_c = delta_c + g_c * lambda * A_{c+1},

with g_c = gamma ** (executed_c / Ta) (gamma per full chunk; a chunk cut short by the
episode's end discounts only for the steps it ran). The last chunk bootstraps from
V(final observation) when the episode ended at its time limit: a time limit is not a
terminal state (Meta-World and Adroit episodes always end so). Only a real terminal
state bootstraps with 0. Returns (the critic's targets) are A + V.

Rewards reach the critic scaled by a running estimate of the std of the discounted
return (``RunningReturnScale``, as DPPO and gymnasium's NormalizeReward), so that its
targets stay O(1) whatever the suite's reward scale.

Shapes: M collected chunks, C chunks of one episode.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sodp3d.errors import UserError

ADVANTAGES = ("reward", "gae")


def check_advantage(name: str) -> str:
    if name not in ADVANTAGES:
        raise UserError(f"unknown advantage algo.advantage={name}; valid: {', '.join(ADVANTAGES)}")
    return name


def standardise(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the batch; zeros for a batch of one."""
    return (x - x.mean()) / (x.std() + 1e-8) if x.numel() > 1 else x * 0


def chunk_discounts(executed: torch.Tensor, n_action_steps: int, gamma: float) -> torch.Tensor:
    """(C,) per-chunk discount gamma ** (executed / Ta)."""
    return gamma ** (executed.double() / float(n_action_steps))


def gae(rewards: torch.Tensor, values: torch.Tensor, bootstrap: float, discounts: torch.Tensor,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One episode's advantages and returns, both (C,).

    rewards, values, discounts: (C,); ``bootstrap``: V of the state after the last chunk
    (0 for a terminal state)."""
    C = rewards.shape[0]
    next_values = torch.cat([values[1:].double(), torch.tensor([float(bootstrap)], dtype=torch.float64)])
    deltas = rewards.double() + discounts * next_values - values.double()
    adv = torch.zeros(C, dtype=torch.float64)
    running = 0.0
    for c in range(C - 1, -1, -1):
        running = float(deltas[c]) + float(discounts[c]) * lam * running
        adv[c] = running
    return adv.float(), (adv + values.double()).float()


def rollout_gae(rollout: Any, values: torch.Tensor, final_values: torch.Tensor, n_action_steps: int,
                gamma: float, lam: float, reward_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both (M,), over every episode of ``rollout``; ``values`` (M,)
    are V of each chunk's observation, ``final_values`` (E,) V of each episode's final one."""
    if rollout.executed is None:
        raise ValueError("GAE needs each chunk's executed steps (a rollout from collect_rollout)")
    adv = torch.zeros(rollout.size)
    ret = torch.zeros(rollout.size)
    rewards = rollout.reward.double() / reward_scale
    for e, (sl, traj) in enumerate(zip(rollout.episode_slices(), rollout.trajectories)):
        bootstrap = 0.0 if traj.terminated else float(final_values[e])
        disc = chunk_discounts(rollout.executed[sl], n_action_steps, gamma)
        adv[sl], ret[sl] = gae(rewards[sl], values[sl], bootstrap, disc, lam)
    return adv, ret


class RunningReturnScale:
    """A running std of the discounted return per chunk step (Welford over every chunk
    seen); ``scale`` divides rewards before they reach the critic."""

    def __init__(self, gamma: float):
        self.gamma = float(gamma)
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, rollout: Any) -> None:
        for sl in rollout.episode_slices():
            running = 0.0
            for r in rollout.reward[sl].tolist():  # forward in time, as a running env wrapper sees them
                running = running * self.gamma + r
                self.count += 1
                d = running - self.mean
                self.mean += d / self.count
                self.m2 += d * (running - self.mean)

    @property
    def scale(self) -> float:
        return float(np.sqrt(self.m2 / self.count) + 1e-8) if self.count > 1 else 1.0

    def state(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def explained_variance(target: torch.Tensor, prediction: torch.Tensor) -> float:
    """1 - Var(target - prediction) / Var(target): 1 perfect, 0 no better than the mean."""
    var = float(target.var())
    return float("nan") if var == 0 else 1.0 - float((target - prediction).var()) / var


def reward_signal(reward: torch.Tensor, positions: torch.Tensor, features: torch.Tensor,
                  generator: np.random.Generator, folds: int = 5, ridge: float = 10.0) -> dict[str, float]:
    """How much of the chunk rewards' variance the chunk's position in its episode alone,
    and the observation (with the position) alone, explain: cross-validated R^2 (``folds``
    folds) of (a) the mean reward per position and (b) a ridge regression on the
    observation's standardised features plus a position one-hot. What is left is all a
    chunk-reward weight can say about the action itself."""
    M = reward.shape[0]
    if M < 4 * folds:
        return {}
    y = reward.double().numpy()
    var = y.var()
    if var == 0:
        return {}
    pos = positions.numpy()
    onehot = np.eye(int(pos.max()) + 1)[pos]
    feats = features.double().numpy()
    feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-8)
    X = np.concatenate([feats, onehot], 1)
    pred_pos, pred_obs = np.zeros(M), np.zeros(M)
    for score in np.array_split(generator.permutation(M), folds):
        fit = np.setdiff1d(np.arange(M), score)
        mean = y[fit].mean()
        by_pos = {p: y[fit][pos[fit] == p].mean() for p in np.unique(pos[fit])}
        pred_pos[score] = [by_pos.get(p, mean) for p in pos[score]]
        A = X[fit] - X[fit].mean(0)
        w = np.linalg.solve(A.T @ A + ridge * np.eye(A.shape[1]), A.T @ (y[fit] - mean))
        pred_obs[score] = (X[score] - X[fit].mean(0)) @ w + mean
    return {"reward_r2_position": float(1 - ((y - pred_pos) ** 2).mean() / var),
            "reward_r2_obs": float(1 - ((y - pred_obs) ** 2).mean() / var)}
