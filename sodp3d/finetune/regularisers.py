"""The regularisers added to the PPO loss, chosen by ``reg=`` (a registry, one class each).

    bc    the pre-training denoising loss (eq. 7) on action sequences of the target
          buffer: successful trajectories, or the top-n by return (the paper's);
    none  nothing (DDPO / DPPO style);
    kl    KL to the frozen pre-trained model at every denoising step (DPOK);
    pl    the pre-training loss on the model's own recent samples (DLPO).

Each gets the fine-tuner that owns it (policy, sampler, target buffer, reference model,
RNGs) and returns a scalar loss for one minibatch, or None. Those that are a denoising
loss on some batch (bc, pl) also say which batch (``denoising_batch``): the update then
computes it in the same encoder and U-Net pass as the PPO term's log-probabilities.

Shapes: B minibatch of chunks, S DDIM steps, Tp predicted steps, Da action dim.
"""

from __future__ import annotations

from typing import Any

import torch

from .rollouts import Rollout


def gaussian_kl_same_std(mean_p: torch.Tensor, mean_q: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mp, s^2) || N(mq, s^2)) averaged over the non-batch dims: (B,)."""
    return ((mean_p - mean_q) ** 2 / (2 * std ** 2)).flatten(1).mean(1)


class Regulariser:
    """A regulariser's loss for one minibatch; registry below, chosen by ``reg=``."""

    name = ""

    def __init__(self, finetuner: Any):
        self.ft = finetuner  # the FineTuner (sodp3d.finetune.ppo) that owns this regulariser

    def loss(self, obs: dict[str, torch.Tensor], chains: torch.Tensor, rollout: Rollout,
             cond: torch.Tensor) -> torch.Tensor | None:
        """``cond``: the chunks' condition (B, G) from the policy step's own encoder pass,
        with its gradient (a regulariser on the chunks reads it instead of encoding again)."""
        batch = self.denoising_batch(obs, chains, rollout)
        return None if batch is None else self.ft.policy.compute_loss(batch, generator=self.ft.torch_gen)

    def denoising_batch(self, obs: dict[str, torch.Tensor], chains: torch.Tensor,
                        rollout: Rollout) -> dict[str, Any] | None:
        """The batch {'obs', 'action'} whose pre-training loss this regulariser is, or None
        (no such batch this step, or a regulariser of another kind)."""
        return None


class NoRegulariser(Regulariser):
    name = "none"


class BCRegulariser(Regulariser):
    """Pre-training loss on proficient trajectories' action sequences (the paper's)."""

    name = "bc"

    def denoising_batch(self, obs, chains, rollout):
        ft = self.ft
        if len(ft.buffer.trajectories) == 0:
            return None
        c = ft.policy.config
        return ft.buffer.sample(ft.bc_batch_size, c.horizon, c.n_obs_steps, ft.rng)


class KLRegulariser(Regulariser):
    """KL to the frozen pre-trained model at every denoising step of the stored chains (DPOK)."""

    name = "kl"

    def loss(self, obs, chains, rollout, cond):
        ft = self.ft
        sampler = ft.sampler
        # The S' trained steps of every chain as one batch of B * S', for both models.
        F = ft.policy.config.frozen_steps
        B, S = chains.shape[0], chains.shape[1] - 1 - F
        x_t = chains[:, F:-1].reshape(B * S, *chains.shape[2:])
        t = torch.as_tensor(sampler.timesteps[F:], device=chains.device).repeat(B)
        t_prev = torch.as_tensor(sampler.prev_timesteps[F:], device=chains.device).repeat(B)
        mean, std = sampler.step_distribution(ft.policy.denoiser(cond.repeat_interleave(S, dim=0)), x_t, t, t_prev)
        with torch.no_grad():
            ref_cond = ft.reference.condition(obs).repeat_interleave(S, dim=0)
            ref_mean, _ = sampler.step_distribution(ft.reference.denoiser(ref_cond), x_t, t, t_prev)
        return gaussian_kl_same_std(mean, ref_mean, std).mean()


class PLRegulariser(Regulariser):
    """The pre-training loss on the model's own recent samples (DLPO)."""

    name = "pl"

    def denoising_batch(self, obs, chains, rollout):
        return {"obs": obs, "action": self.ft.policy.normalizer.unnormalize("action", chains[:, -1])}


REGULARISERS: dict[str, type[Regulariser]] = {
    "bc": BCRegulariser,
    "none": NoRegulariser,
    "kl": KLRegulariser,
    "pl": PLRegulariser,
}
