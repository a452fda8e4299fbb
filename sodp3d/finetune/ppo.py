"""The PPO update over the denoising chain (the paper's eq. 9-12), top to bottom.

The K-step denoising process is an MDP: each chunk's DDIM chain x_S -> ... -> x_0
(eta = 1, so every step is a Gaussian) is a trajectory whose only reward is the chunk's,
the sum of the environment rewards of its Ta executed steps (discount 1). One update:

  1. the rollout holds every chunk's observations, chain, old per-step log-probs (means
     over Tp x Da, floored std, as DPPO) and reward (sodp3d.finetune.rollouts);
  2. weights A = chunk rewards, normalised over the collected batch by default
     (``algo.normalize_reward``; raw rewards otherwise). No critic, no advantage
     estimator, as the paper;
  3. p_step gradient steps per collected episode on minibatches of chunks (all S
     denoising steps of each), with the clipped objective
        L_Imp = mean over (chunk, k) of -min(rho_k A, clip(rho_k, 1-e, 1+e) A),
        rho_k = p_theta(x_{k-1} | x_k, s) / p_old(x_{k-1} | x_k, s),
     plus lambda times the regulariser (sodp3d.finetune.regularisers); ``ppo_weight``
     scales L_Imp (1: the paper; 0: the regulariser alone, a control). A regulariser
     that is a denoising loss (bc, pl) shares the log-probs' encoder and U-Net pass;
  4. diagnostics: approx KL, clip fraction, ratio range, every loss term, gradient norm, lr.

fp32 throughout; gradient clipping; a non-finite rollout, loss or gradient raises
FloatingPointError before the weights move.

Shapes: M collected chunks, B minibatch of chunks, S DDIM steps, Tp predicted steps, Da action dim.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from sodp3d.diffusion import DDIMSampler
from sodp3d.errors import UserError
from sodp3d.policy import DiffusionPolicy
from sodp3d.runs import adam_kwargs

from .buffer import TargetBuffer
from .regularisers import REGULARISERS
from .rollouts import Rollout

LOG_RATIO_CLAMP = 20.0  # |log rho| beyond this is numerically meaningless


def chunk_log_probs(policy: DiffusionPolicy, sampler: DDIMSampler, obs: dict[str, torch.Tensor],
                    chains: torch.Tensor) -> torch.Tensor:
    """(B, S) log-probabilities of stored chains under the current weights (encoder included)."""
    return policy.chain_log_prob(policy.condition(obs), chains, sampler)


def ppo_loss(new_logp: torch.Tensor, old_logp: torch.Tensor, weights: torch.Tensor, clip: float):
    """Clipped importance-ratio loss per denoising step, in the standard PPO form (so that a
    negative weight is handled correctly). Shapes: logp (B, S), weights (B,)."""
    log_ratio = (new_logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()
    a = weights[:, None].expand_as(ratio)
    loss = -torch.min(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a).mean()
    with torch.no_grad():
        stats = {
            "approx_kl": float(((ratio - 1) - log_ratio).mean()),
            "clip_fraction": float(((ratio - 1).abs() > clip).float().mean()),
            "ratio_min": float(ratio.min()),
            "ratio_max": float(ratio.max()),
        }
    return loss, stats



class FineTuner:
    """Owns the optimiser, schedule, target buffer and RNGs around a policy it wraps."""

    def __init__(self, policy: DiffusionPolicy, algo: DictConfig | dict, device: torch.device, seed: int,
                 reference: DiffusionPolicy | None = None):
        a = OmegaConf.create(algo) if isinstance(algo, dict) else algo
        self.policy = policy.to(device)
        self.device = device
        self.reg_name = str(a.reg)
        if self.reg_name not in REGULARISERS:
            raise UserError(f"unknown regulariser reg={self.reg_name}; valid: {', '.join(REGULARISERS)}")
        self.sampler = policy.ddim(float(a.eta), float(a.min_std))
        self.clip = float(a.clip)
        self.reg_weight = float(a.reg_weight)
        self.ppo_weight = float(a.get("ppo_weight", 1.0))
        self.p_step = int(a.p_step)
        self.batch_size = int(a.batch_size)
        self.bc_batch_size = int(a.get("bc_batch_size") or a.batch_size)
        self.normalize_reward = bool(a.normalize_reward)
        self.grad_clip = float(a.grad_clip)
        self.optimizer = torch.optim.Adam(policy.parameters(), lr=float(a.lr), **adam_kwargs(device))
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=float(a.lr_decay))
        self.buffer = TargetBuffer(int(a.buffer_capacity), int(a.top_n))
        self.rng = np.random.default_rng(seed)
        self.torch_gen = torch.Generator(device=device).manual_seed(seed)
        self.reference = None
        if self.reg_name == "kl":
            self.reference = (reference or copy.deepcopy(policy)).to(device).eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)
        self.regulariser = REGULARISERS[self.reg_name](self)
        self.updates = 0

    def weights(self, reward: torch.Tensor) -> torch.Tensor:
        if not self.normalize_reward:
            return reward
        return (reward - reward.mean()) / (reward.std() + 1e-8) if reward.numel() > 1 else reward * 0

    def update(self, rollout: Rollout, episodes: int | None = None) -> dict[str, float]:
        """p_step gradient steps per collected episode on this rollout; returns diagnostics."""
        policy = self.policy
        # A poisoned rollout must not move the weights at all: check it before any step.
        for name, tensor in [("reward", rollout.reward), ("old_logp", rollout.old_logp), ("chains", rollout.chains),
                             *[(f"obs['{k}']", v) for k, v in rollout.obs.items()]]:
            if not torch.isfinite(tensor).all():
                raise FloatingPointError(f"non-finite values in the collected {name} at update {self.updates}")
        policy.train()
        n_steps = self.p_step * (episodes if episodes is not None else max(1, len(rollout.trajectories)))
        S = rollout.chains.shape[1] - 1
        chunks_per_batch = max(1, self.batch_size // S)
        weights = self.weights(rollout.reward).to(self.device)
        sums: dict[str, float] = {}
        for _ in range(n_steps):
            idx = torch.as_tensor(self.rng.choice(rollout.size, size=min(chunks_per_batch, rollout.size), replace=False))
            obs = {k: v[idx].to(self.device) for k, v in rollout.obs.items()}
            chains = rollout.chains[idx].to(self.device)
            batch = self.regulariser.denoising_batch(obs, chains, rollout)
            if batch is not None:  # bc, pl: their loss from the same encoder and U-Net pass
                new_logp, reg = policy.chain_log_prob_and_loss(obs, chains, batch, self.sampler, self.torch_gen)
            else:
                new_logp = chunk_log_probs(policy, self.sampler, obs, chains)
                reg = self.regulariser.loss(obs, chains, rollout)
            loss_imp, stats = ppo_loss(new_logp, rollout.old_logp[idx].to(self.device), weights[idx.to(self.device)], self.clip)
            loss = self.ppo_weight * loss_imp if reg is None else self.ppo_weight * loss_imp + self.reg_weight * reg
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite loss at update {self.updates} (L_Imp={float(loss_imp.detach())}, "
                    f"L_{self.reg_name}={float(reg.detach()) if reg is not None else 0.0})"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), self.grad_clip)
            if not torch.isfinite(grad_norm):
                raise FloatingPointError(f"non-finite gradient at update {self.updates}")
            self.optimizer.step()
            stats.update({"loss": float(loss.detach()), "loss_imp": float(loss_imp.detach()),
                          f"loss_{self.reg_name}": float(reg.detach()) if reg is not None else 0.0,
                          "grad_norm": float(grad_norm)})
            for k, v in stats.items():
                if k == "ratio_min":
                    sums[k] = min(sums.get(k, math.inf), v)
                elif k == "ratio_max":
                    sums[k] = max(sums.get(k, -math.inf), v)
                else:
                    sums[k] = sums.get(k, 0.0) + v / n_steps
        sums["lr"] = self.scheduler.get_last_lr()[0]  # the rate these steps used
        self.scheduler.step()
        self.updates += 1
        sums["gradient_steps"] = n_steps
        return sums

    def state(self) -> dict[str, Any]:
        return {"policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "buffer": self.buffer.state(), "updates": self.updates,
                "rng": self.rng.bit_generator.state, "torch_gen": self.torch_gen.get_state()}

    def load(self, payload: dict[str, Any]) -> None:
        self.policy.load_state_dict(payload["policy"], strict=True)
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.buffer.load(payload["buffer"])
        self.updates = int(payload["updates"])
        self.rng.bit_generator.state = payload["rng"]
        self.torch_gen.set_state(payload["torch_gen"].cpu())  # generator states are CPU byte tensors
