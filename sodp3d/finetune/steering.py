"""The planner steered by a noise policy: how a ``method=noise-sac`` checkpoint acts.

A frozen planner's deterministic sampler (DDIM, eta = 0) maps an initial noise x_S
(Tp x Da) to an action chunk; a noise policy (SAC's actor) chooses x_S from the frozen
encoder's features. ``sodp3d eval``, ``viz`` and fine-tuning's evaluations act through
``SteeredPlanner`` as through the planner itself. Training lives in noise_sac.py; this
module reads no run and imports nothing of the commands, so loading a checkpoint
(checkpoint.py) needs only this.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch

from sodp3d.policy import DiffusionPolicy


class SteeredPlanner:
    """A frozen planner acting from the noise a noise policy gives: ``predict_action`` as
    DiffusionPolicy's, so ``sodp3d eval``, ``viz`` and the evaluations use it unchanged.
    ``noise_fn(features (B, G)) -> x_S (B, Tp, Da)``; every other attribute is the planner's."""

    def __init__(self, planner: DiffusionPolicy, noise_fn):
        self.planner = planner
        self.noise_fn = noise_fn

    def __getattr__(self, name: str) -> Any:
        return getattr(self.planner, name)

    def eval(self) -> "SteeredPlanner":
        self.planner.eval()
        return self

    @torch.no_grad()
    def predict_action(self, obs: dict[str, Any], generator: torch.Generator | None = None,
                       sampler=None) -> dict[str, torch.Tensor]:
        cond = self.planner.condition(obs)
        return self.planner.predict_action(obs, generator, sampler=sampler, x_init=self.noise_fn(cond), cond=cond)


def actor_noise_fn(actor, bound: float, horizon: int, action_dim: int):
    """SAC's deterministic noise: its actor's tanh-squashed mean, scaled to the bound."""
    def noise(features: torch.Tensor) -> torch.Tensor:
        scaled = actor(features.to(next(actor.parameters()).device), deterministic=True)
        return (scaled * bound).reshape(-1, horizon, action_dim).to(features.device, torch.float32)

    return noise


def make_sac_policy(obs_dim: int, horizon: int, action_dim: int, bound: float, net_arch: list[int]):
    """SB3's SAC policy network for these shapes (SAC's actor and critics, no training state)."""
    from stable_baselines3.sac.policies import SACPolicy

    return SACPolicy(obs_space(obs_dim), action_space(horizon, action_dim, bound), lambda _: 3e-4,
                     net_arch=list(net_arch))


def steered_from_payload(planner: DiffusionPolicy, payload: dict[str, Any]) -> SteeredPlanner:
    """The acting policy of a noise-sac checkpoint: its planner, steered by its actor."""
    n = payload["noise_policy"]
    policy = make_sac_policy(int(n["obs_dim"]), int(n["horizon"]), int(n["action_dim"]), float(n["bound"]),
                             list(n["net_arch"]))
    policy.actor.load_state_dict(n["actor"], strict=True)
    policy.actor.to(planner.device).eval()
    return SteeredPlanner(planner, actor_noise_fn(policy.actor, float(n["bound"]), int(n["horizon"]),
                                                  int(n["action_dim"])))


def obs_space(obs_dim: int) -> gym.spaces.Box:
    return gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)


def action_space(horizon: int, action_dim: int, bound: float) -> gym.spaces.Box:
    return gym.spaces.Box(-bound, bound, (horizon * action_dim,), np.float32)
