"""The critic V(obs) behind ``algo.advantage=gae`` (DPPO's advantage, beyond the paper).

An MLP (3 x 256, Mish, as DPPO's) on observation features, chosen by
``algo.critic.features``:

    policy   the policy's own encoder features (its conditioning vector), with a
             stop-gradient: the value loss never moves the policy, and the critic costs
             one MLP over features the update computes anyway;
    own      a copy of the pre-trained encoder that the value loss trains, so the critic
             can read what the policy's features leave out (one more encoder pass per
             critic step).

It predicts returns of rewards divided by the running return scale (advantages.py), so its
targets stay O(1). Trained with its own Adam (``algo.critic.lr``) on the squared error to
the GAE returns.

Shapes: B batch, To observed steps, G = To x encoder features.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from sodp3d.errors import UserError
from sodp3d.policy import DiffusionPolicy

CRITIC_FEATURES = ("policy", "own")


class Critic(nn.Module):
    def __init__(self, policy: DiffusionPolicy, features: str = "policy", hidden: int = 256, layers: int = 3):
        super().__init__()
        if features not in CRITIC_FEATURES:
            raise UserError(f"unknown algo.critic.features={features}; valid: {', '.join(CRITIC_FEATURES)}")
        if hidden < 1 or layers < 1:
            raise UserError(f"algo.critic needs hidden >= 1 and layers >= 1, got hidden={hidden}, layers={layers}")
        self.features = features
        self.encoder = copy.deepcopy(policy.encoder).requires_grad_(True) if features == "own" else None
        dims = [policy.cond_dim] + [hidden] * layers
        mlp: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            mlp += [nn.Linear(a, b), nn.Mish()]
        out = nn.Linear(dims[-1], 1)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.mlp = nn.Sequential(*mlp, out)

    def forward(self, policy: DiffusionPolicy, obs: dict[str, Any], cond: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) values of observations {k: (B, To, ...)}; ``cond``: the policy's features of
        them when already computed (used by ``features=policy``, detached here)."""
        if self.encoder is not None:
            feats = policy.condition(obs, encoder=self.encoder)
        else:
            if cond is None:
                with torch.no_grad():
                    cond = policy.condition(obs)
            feats = cond.detach()
        return self.mlp(feats).squeeze(-1)

    @torch.no_grad()
    def values(self, policy: DiffusionPolicy, obs: dict[str, torch.Tensor], batch: int = 512) -> torch.Tensor:
        """(M,) values of many observations, in batches, without gradients (on the CPU)."""
        n = next(iter(obs.values())).shape[0]
        device = next(self.parameters()).device
        out = [self(policy, {k: v[i:i + batch].to(device) for k, v in obs.items()}).cpu() for i in range(0, n, batch)]
        return torch.cat(out) if out else torch.zeros(0)
