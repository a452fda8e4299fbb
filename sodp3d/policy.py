"""The diffusion policy: normaliser + observation encoder + conditional 1-D U-Net + noise
schedule. It knows nothing about environments.

Shapes: B batch, To observed steps, Tp predicted steps (horizon), Ta executed steps,
Da action dim, G = To x (encoder features per step) conditioning dim, S sampling steps,
S' = S - frozen_steps trained steps (S' = S unless fine-tuning froze the first steps).

  compute_loss(batch)        denoising loss (eq. 7) on {'obs': {k: (B, To, ...)}, 'action': (B, Tp, Da)}
  predict_action(obs)        {'action': (B, Ta, Da), 'action_pred': (B, Tp, Da)}, unnormalised
  sample_chain(obs, ...)     ChainSample: actions, the whole DDIM chain (B, S+1, Tp, Da), the condition (B, G)
                             and optionally the per-step log-probabilities (B, S)
  chain_log_prob(cond, chain)  per-step Gaussian log-probabilities (B, S') of the trained steps
  freeze_prefix(F)           the first F DDIM steps run a frozen copy (encoder + U-Net), saved with the policy
  chain_log_prob_and_loss(obs, chain, batch)  both of the above and compute_loss(batch) in one pass
                             (and the condition, detached)

Observations are min-max normalised per key, except ``image`` (uint8): the image encoder
scales it itself. An encoder that augments in training (the image encoder's random crops)
gets its draws in ``compute_loss`` while the policy is in training mode, from the loss's
generator, for the whole batch; acting and fine-tuning's log-probabilities never augment.

The executed actions are steps To-1 .. To-2+Ta of the predicted Tp (the step of the
last observation onwards), as in Diffusion Policy and DP3; hence Ta <= Tp - To + 1.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from sodp3d.diffusion import DDIMSampler, NoiseSchedule
from sodp3d.encoders import build_encoder
from sodp3d.errors import UserError
from sodp3d.normalizer import MinMaxNormalizer
from sodp3d.unet import build_unet

UNNORMALISED = ("image",)  # observation keys the encoder scales itself (uint8 images)


@dataclass
class ChainSample:
    """What ``sample_chain`` returns."""

    action: torch.Tensor                # (B, Ta, Da) executed actions, unnormalised
    action_pred: torch.Tensor           # (B, Tp, Da) the whole predicted sequence, unnormalised
    chain: torch.Tensor                 # (B, S+1, Tp, Da) x_S .. x_0, normalised action space
    cond: torch.Tensor                  # (B, G)
    log_prob: torch.Tensor | None       # (B, S) per-step log-probabilities, when asked for


@dataclass
class PolicyConfig:
    """Everything needed to rebuild the policy (saved in every checkpoint)."""

    shape_meta: dict[str, list[int]]          # obs key -> per-step shape, plus 'action': [Da]
    horizon: int = 12                         # Tp
    n_obs_steps: int = 2                      # To
    n_action_steps: int = 8                   # Ta
    encoder: str = "dp3"
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    unet: str = "paper"
    unet_kwargs: dict[str, Any] = field(default_factory=dict)
    num_train_steps: int = 100                # K
    beta_schedule: str = "cosine"
    prediction_type: str = "epsilon"          # epsilon (the paper's eq. 7) | sample (DP3)
    num_inference_steps: int = 10             # S
    eta: float = 0.0                          # DDIM eta for acting (0: deterministic)
    frozen_steps: int = 0                     # the first F of the S DDIM steps use a frozen copy (fine-tuning's
                                              # ft_denoising_steps = S - F); 0: one network for every step

    def validate(self) -> None:
        To, Tp, Ta = self.n_obs_steps, self.horizon, self.n_action_steps
        if min(To, Tp, Ta) < 1:
            raise UserError(f"horizons must be >= 1, got Tp={Tp}, To={To}, Ta={Ta}")
        if Ta > Tp - To + 1:
            raise UserError(f"n_action_steps Ta={Ta} must be <= horizon - n_obs_steps + 1 = {Tp - To + 1} (Tp={Tp}, To={To})")
        if "action" not in self.shape_meta:
            raise UserError("shape_meta lacks 'action'")
        if not 1 <= self.num_inference_steps <= self.num_train_steps:
            raise UserError(f"num_inference_steps must be in [1, {self.num_train_steps}], got {self.num_inference_steps}")
        if not 0 <= self.frozen_steps < self.num_inference_steps:
            raise UserError(f"frozen_steps must be in [0, {self.num_inference_steps - 1}] (at least the last of the "
                            f"S={self.num_inference_steps} DDIM steps is trained), got {self.frozen_steps}")

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(asdict(self))


class DiffusionPolicy(nn.Module):
    def __init__(self, config: PolicyConfig, normalizer: MinMaxNormalizer | None = None):
        super().__init__()
        config.validate()
        self.config = config
        meta = {k: tuple(v) for k, v in config.shape_meta.items()}
        self.action_dim = int(meta["action"][0])
        obs_meta = {k: v for k, v in meta.items() if k != "action"}
        self.encoder = build_encoder(config.encoder, obs_meta, **config.encoder_kwargs)
        self.obs_keys = tuple(self.encoder.keys)
        # Whether acting needs a camera: a policy that reads neither a cloud nor an image acts
        # in environments without a renderer (make_env(point_cloud=False)).
        self.reads_camera = any(k in ("point_cloud", "image") for k in self.obs_keys)
        self.cond_dim = config.n_obs_steps * self.encoder.out_dim
        self.model = build_unet(config.unet, self.action_dim, self.cond_dim, **config.unet_kwargs)
        self.model.check_horizon(config.horizon)  # fail at build time, not at the first forward
        self.schedule = NoiseSchedule(config.num_train_steps, config.beta_schedule, config.prediction_type)
        self.sampler = self.ddim(config.eta)
        dims = {"action": self.action_dim}
        for k in self.obs_keys:  # point_cloud: xyz, or xyz + rgb when the encoder reads colour
            if k not in UNNORMALISED:
                dims[k] = self.point_channels if k == "point_cloud" else int(meta[k][-1])
        self.normalizer = normalizer if normalizer is not None else MinMaxNormalizer(dims)
        if self.normalizer.dims != dims:
            raise UserError(f"normaliser dims {dict(sorted(self.normalizer.dims.items()))} do not match the "
                            f"policy's {dict(sorted(dims.items()))}")
        # The frozen copy that runs the first frozen_steps DDIM steps (fine-tuning only the last ones,
        # as DPPO's ft_denoising_steps): its own encoder and U-Net, no gradients, saved with the policy.
        self.prefix: nn.ModuleDict | None = None
        if config.frozen_steps:
            self.prefix = nn.ModuleDict({"encoder": copy.deepcopy(self.encoder), "model": copy.deepcopy(self.model)})
            self.prefix.requires_grad_(False)

    def freeze_prefix(self, steps: int) -> None:
        """Run the first ``steps`` DDIM steps with a frozen copy of today's encoder and U-Net
        from now on; the remaining S - steps stay trainable. 0 keeps one network."""
        if self.prefix is not None:
            raise UserError("the policy already has frozen denoising steps")
        self.config.frozen_steps = int(steps)
        self.config.validate()
        if steps:
            self.prefix = nn.ModuleDict({"encoder": copy.deepcopy(self.encoder), "model": copy.deepcopy(self.model)})
            self.prefix.requires_grad_(False)
            self.prefix.eval()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # -- helpers -----------------------------------------------------------------------
    @property
    def point_channels(self) -> int:
        """The point-cloud channels the encoder reads and the normaliser scales (3 or 6)."""
        return int(getattr(self.encoder, "in_channels", 3))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _tensor(self, x: Any) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x, dtype=torch.float32, device=self.device)

    def _obs_tensor(self, key: str, x: Any) -> torch.Tensor:
        """An observation as a tensor on the policy's device: float32, or as stored for the
        keys the encoder scales itself."""
        if key in UNNORMALISED:
            return (x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))).to(self.device)
        return self._tensor(x)

    def _check_obs(self, obs: dict[str, Any]) -> None:
        To = self.config.n_obs_steps
        for k in self.obs_keys:
            if k not in obs:
                raise UserError(f"the policy reads '{k}', which the observation lacks (it has: {', '.join(obs)})")
            want = (To,) + tuple(self.config.shape_meta[k])
            got = tuple(obs[k].shape[1:])
            if got != want:
                raise UserError(f"observation '{k}' has per-sample shape {got}, the policy expects {want}")

    def condition(self, obs: dict[str, Any], augmentation: torch.Tensor | None = None,
                  encoder: nn.Module | None = None) -> torch.Tensor:
        """Normalised, encoded observations: (B, To, ...) per key -> (B, G). ``augmentation``:
        the encoder's draws for the B * To observations (``draw_augmentation``), or none.
        ``encoder``: another encoder of the same shape (the frozen prefix's, a critic's)."""
        encoder = self.encoder if encoder is None else encoder
        self._check_obs(obs)
        first = obs[self.obs_keys[0]]
        B, To = first.shape[0], first.shape[1]
        flat = {}
        for k in self.obs_keys:
            x = self._obs_tensor(k, obs[k])  # images as stored (uint8): the encoder scales them
            if k not in UNNORMALISED:
                x = self.normalizer.normalize(k, x)
            flat[k] = x.reshape(B * To, *x.shape[2:])
        features = encoder(flat) if augmentation is None else encoder(flat, augmentation)
        return features.reshape(B, To * encoder.out_dim)

    def denoiser(self, cond: torch.Tensor):
        """model_fn(x_k (B, Tp, Da), k (B,)) for the sampler, conditioned on cond (B, G)."""
        return lambda x, k: self.model(x, k, cond)

    def acting_denoiser(self, obs: dict[str, Any], cond: torch.Tensor, sampler: DDIMSampler):
        """The model_fn that samples a whole chain: the frozen prefix at the first
        ``frozen_steps`` steps of ``sampler`` (timesteps at or above the last of them),
        the trained network after; just ``denoiser(cond)`` without a prefix."""
        if self.prefix is None:
            return self.denoiser(cond)
        F = self.config.frozen_steps
        if F >= len(sampler.timesteps):
            raise UserError(f"{F} frozen denoising steps need a sampler with more than {F} steps, "
                            f"this one has {len(sampler.timesteps)}")
        boundary = sampler.timesteps[F - 1]
        prefix_cond = self.condition(obs, encoder=self.prefix["encoder"])

        def model_fn(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            early = k >= boundary
            if bool(early.all()):
                return self.prefix["model"](x, k, prefix_cond)
            if not bool(early.any()):
                return self.model(x, k, cond)
            return torch.where(early[:, None, None], self.prefix["model"](x, k, prefix_cond), self.model(x, k, cond))

        return model_fn

    def ddim(self, eta: float, min_std: float = 0.0) -> DDIMSampler:
        """A DDIM sampler over this policy's schedule and S steps, with another eta (1 for
        fine-tuning: every step a Gaussian, its std floored at ``min_std``)."""
        return DDIMSampler(self.schedule, num_steps=self.config.num_inference_steps, eta=eta, min_std=min_std)

    def executed(self, action_pred: torch.Tensor) -> torch.Tensor:
        """The Ta executed steps of a predicted (B, Tp, Da) sequence."""
        start = self.config.n_obs_steps - 1
        return action_pred[:, start : start + self.config.n_action_steps]

    # -- training ------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None,
                     rows: slice | None = None) -> torch.Tensor:
        """Denoising loss of eq. 7 (noise prediction) or DP3's sample prediction.

        ``rows``: the loss of these rows only (their mean), with the noise and diffusion
        steps drawn for the whole batch: a distributed rank's share of a global batch. In
        training mode an augmenting encoder's draws come first, also for the whole batch."""
        augmentation = self._augmentation(batch["obs"], generator, rows) if self.training else None
        obs = batch["obs"] if rows is None else {key: v[rows] for key, v in batch["obs"].items()}
        cond = self.condition(obs, augmentation)
        x0, noise, k = self._noised(batch["action"], generator)
        if rows is not None:
            x0, noise, k = x0[rows], noise[rows], k[rows]
        x_k = self.schedule.add_noise(x0, noise, k)
        return self.schedule.loss(self.model(x_k, k, cond), x0, noise)

    def _augmentation(self, obs: dict[str, Any], generator: torch.Generator | None,
                      rows: slice | None) -> torch.Tensor | None:
        """The encoder's augmentation draws for every observation of the batch (B * To),
        those of ``rows`` kept; None for an encoder that does not augment."""
        first = obs[self.obs_keys[0]]
        B, To = first.shape[0], first.shape[1]
        draw = getattr(self.encoder, "draw_augmentation", None)  # encoders that augment in training have it
        draws = None if draw is None else draw(B * To, generator, device=self.device)
        if draws is None or rows is None:
            return draws
        return draws.reshape(B, To, *draws.shape[1:])[rows].reshape(-1, *draws.shape[1:])

    def _noised(self, action: Any, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised action windows (B, Tp, Da), their noise and diffusion steps (B,),
        drawn in this order from ``generator``."""
        x0 = self.normalizer.normalize("action", self._tensor(action))
        if x0.shape[1:] != (self.config.horizon, self.action_dim):
            raise UserError(f"action windows have shape {tuple(x0.shape[1:])}, the policy expects {(self.config.horizon, self.action_dim)}")
        noise = torch.randn(x0.shape, generator=generator, device=x0.device) if generator is not None else torch.randn_like(x0)
        k = torch.randint(0, self.schedule.num_train_steps, (x0.shape[0],), device=x0.device, generator=generator)
        return x0, noise, k

    def chain_log_prob_and_loss(self, obs: dict[str, Any], chain: torch.Tensor, batch: dict[str, Any],
                                sampler: DDIMSampler | None = None,
                                generator: torch.Generator | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``chain_log_prob(condition(obs), chain)`` and ``compute_loss(batch)`` together, from
        one encoder pass over both sets of observations and one U-Net pass over the B * S
        chain steps and the batch's noised windows (what fine-tuning with the BC term
        computes every gradient step). Equal to the two calls, with the same draws from
        ``generator``, to float rounding; fewer, larger operations. Returns (log-probs
        (B, S'), the loss, the chunks' condition (B, G) detached: a critic reads it)."""
        sampler = sampler or self.sampler
        x_t, x_next, steps = self._chain_steps(chain, sampler)
        B, S = chain.shape[0], chain.shape[1] - 1 - self.config.frozen_steps
        if batch["obs"] is obs:  # the loss on the chunks' own observations (pl): one encoding serves both
            cond = self.condition(obs)
            cond_loss = cond
        else:
            self._check_obs(obs)
            self._check_obs(batch["obs"])
            both = self.condition({k: torch.cat([self._obs_tensor(k, obs[k]), self._obs_tensor(k, batch["obs"][k])])
                                   for k in self.obs_keys})
            cond, cond_loss = both[:B], both[B:]
        x0, noise, k = self._noised(batch["action"], generator)
        t_chain = torch.as_tensor(sampler.timesteps, device=chain.device, dtype=torch.long)[steps]
        out = self.model(torch.cat([x_t, self.schedule.add_noise(x0, noise, k)]), torch.cat([t_chain, k]),
                         torch.cat([cond.repeat_interleave(S, dim=0), cond_loss]))
        chain_out, loss_out = out[: B * S], out[B * S:]
        log_prob = sampler.log_prob_of_step(lambda x, t: chain_out, x_t, x_next, steps).reshape(B, S)
        loss = self.schedule.loss(loss_out, x0, noise)
        return log_prob, loss, cond.detach()

    # -- acting -------------------------------------------------------------------------
    @torch.no_grad()
    def predict_action(self, obs: dict[str, Any], generator: torch.Generator | None = None,
                       sampler: DDIMSampler | None = None, x_init: torch.Tensor | None = None,
                       cond: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """{'action': (B, Ta, Da) to execute, 'action_pred': (B, Tp, Da)}; ``sampler``
        replaces the policy's own (DDIM with its eta) for this call; ``x_init`` (B, Tp, Da)
        is the initial noise instead of a draw from N(0, I) (a noise policy's choice);
        ``cond``: the observation's features when the caller has them already."""
        cond = self.condition(obs) if cond is None else cond
        shape = (cond.shape[0], self.config.horizon, self.action_dim)
        sampler = sampler or self.sampler
        x0 = sampler.sample(self.acting_denoiser(obs, cond, sampler), shape, generator=generator, device=cond.device,
                            x_init=x_init)
        action_pred = self.normalizer.unnormalize("action", x0)
        return {"action": self.executed(action_pred), "action_pred": action_pred}

    def sample_chain(self, obs: dict[str, Any], sampler: DDIMSampler | None = None,
                     generator: torch.Generator | None = None, log_prob: bool = False) -> ChainSample:
        """For fine-tuning: actions plus the whole denoising chain, and with ``log_prob`` the
        per-step log-probabilities of the sampled steps (needs a stochastic sampler)."""
        sampler = sampler or self.sampler
        with torch.no_grad():
            cond = self.condition(obs)
            shape = (cond.shape[0], self.config.horizon, self.action_dim)
            out = sampler.sample(self.acting_denoiser(obs, cond, sampler), shape, generator=generator, return_chain=True,
                                 return_log_prob=log_prob, device=cond.device)
        x0, chain = out[0], out[1]
        action_pred = self.normalizer.unnormalize("action", x0)
        return ChainSample(self.executed(action_pred), action_pred, chain, cond, out[2] if log_prob else None)

    def chain_log_prob(self, cond: torch.Tensor, chain: torch.Tensor, sampler: DDIMSampler | None = None) -> torch.Tensor:
        """(B, S') log-probabilities of a stored chain's trained steps (the last S' = S -
        frozen_steps; all S without a frozen prefix) under the current weights.

        All S steps go through the U-Net as one batch of B * S (GroupNorm and the encoder
        work per sample, so this equals scoring the steps one after another)."""
        sampler = sampler or self.sampler
        x_t, x_next, steps = self._chain_steps(chain, sampler)
        B, S = chain.shape[0], chain.shape[1] - 1 - self.config.frozen_steps
        model_fn = self.denoiser(cond.repeat_interleave(S, dim=0))
        return sampler.log_prob_of_step(model_fn, x_t, x_next, steps).reshape(B, S)

    def _chain_steps(self, chain: torch.Tensor, sampler: DDIMSampler) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A stored chain (B, S+1, Tp, Da) as its B * S' trained transitions (S' = S - frozen_steps,
        the last S' steps): x_t, x_next (B * S', Tp, Da) and each one's step index (B * S',),
        chain by chain."""
        B, S = chain.shape[0], chain.shape[1] - 1
        if chain.ndim != 4 or S != len(sampler.timesteps):
            raise UserError(f"denoising chain has shape {tuple(chain.shape)}; expected (B, {len(sampler.timesteps) + 1}, Tp, Da)")
        F = self.config.frozen_steps
        x_t = chain[:, F:-1].reshape(B * (S - F), *chain.shape[2:])
        x_next = chain[:, F + 1:].reshape(B * (S - F), *chain.shape[2:])
        return x_t, x_next, torch.arange(F, S, device=chain.device).repeat(B)
