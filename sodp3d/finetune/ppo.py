"""The PPO update over the denoising chain (the paper's eq. 9-12), top to bottom.

The K-step denoising process is an MDP: each chunk's DDIM chain x_S -> ... -> x_0
(eta = 1, so every step is a Gaussian) is a trajectory whose only reward is the chunk's,
the sum of the environment rewards of its Ta executed steps (discount 1). One update:

  1. the rollout holds every chunk's observations, chain, old per-step log-probs (means
     over Tp x Da, floored std, as DPPO) and reward (sodp3d.finetune.rollouts);
  2. weights A per chunk (sodp3d.finetune.advantages), by ``algo.advantage``:
       reward  the chunk reward, standardised over the collected batch by default
               (``algo.normalize_reward``): the paper's form, no critic;
       gae     GAE over the env's chunk steps with a critic V(obs) (sodp3d.finetune.critic),
               standardised likewise: DPPO's advantage, beyond the paper. The critic
               alone trains for the first ``critic.warmup_updates`` updates;
     each denoising step k of the S' trained ones (the last ``ft_denoising_steps``; the
     earlier ones run a frozen copy) weighs A by gamma_denoising ** (S' - 1 - k);
  3. gradient steps on minibatches of chunks (all S' trained steps of each), either the
     paper's p_step per collected episode or ``update_epochs`` PPO epochs over the batch
     (sodp3d.finetune.epochs), stopped early past ``target_kl``, with the clipped objective
        L_Imp = mean over (chunk, k) of -min(rho_k A_k, clip(rho_k, 1-e, 1+e) A_k),
        rho_k = p_theta(x_{k-1} | x_k, s) / p_old(x_{k-1} | x_k, s),
     plus lambda times the regulariser (sodp3d.finetune.regularisers); ``ppo_weight``
     scales L_Imp (1: the paper; 0: the regulariser alone, a control). A regulariser
     that is a denoising loss (bc, pl) shares the log-probs' encoder and U-Net pass.
     With a critic, each step also takes a value-loss step on the same chunks (with
     ``critic.features=policy`` on the features the policy step just computed, so the
     critic costs no encoder pass);
  4. diagnostics: approx KL (overall and per denoising step), clip fraction, ratio
     range, every loss term, gradient norms (each term's with ``grad_terms``), lr,
     the critic's explained variance and time, and how much of the chunk rewards'
     variance the chunk's position and observation explain.

fp32 throughout; gradient clipping; a non-finite rollout, loss or gradient raises
FloatingPointError before the weights move.

Shapes: M collected chunks, B minibatch of chunks, S DDIM steps, S' trained steps,
Tp predicted steps, Da action dim.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from sodp3d.errors import UserError
from sodp3d.policy import DiffusionPolicy
from sodp3d.runs import adam_kwargs

from .advantages import RunningReturnScale, check_advantage, explained_variance, reward_signal, rollout_gae, standardise
from .buffer import TargetBuffer
from .critic import CRITIC_FEATURES, Critic
from .epochs import check_epochs, minibatches, steps_per_update
from .regularisers import REGULARISERS
from .rollouts import Rollout

LOG_RATIO_CLAMP = 20.0  # |log rho| beyond this is numerically meaningless


def ppo_loss(new_logp: torch.Tensor, old_logp: torch.Tensor, weights: torch.Tensor, clip: float):
    """Clipped importance-ratio loss per denoising step, in the standard PPO form (so that a
    negative weight is handled correctly). Shapes: logp (B, S'), weights (B,) or (B, S')."""
    log_ratio = (new_logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()
    a = weights[:, None].expand_as(ratio) if weights.ndim == 1 else weights
    loss = -torch.min(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a).mean()
    with torch.no_grad():
        kl = (ratio - 1) - log_ratio
        stats = {
            "approx_kl": float(kl.mean()),
            "clip_fraction": float(((ratio - 1).abs() > clip).float().mean()),
            "ratio_min": float(ratio.min()),
            "ratio_max": float(ratio.max()),
            "kl_per_step": kl.mean(0).tolist(),
        }
    return loss, stats


def check_algo(a: DictConfig | dict, num_inference_steps: int | None = None) -> None:
    """One line for each bad setting of the fine-tuning algorithm, before anything is written."""
    get = a.get
    if str(get("reg")) not in REGULARISERS:
        raise UserError(f"unknown regulariser reg={get('reg')}; valid: {', '.join(REGULARISERS)}")
    check_advantage(str(get("advantage", "reward")))
    r = get("rollouts_per_update", 1)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise UserError(f"algo.rollouts_per_update must be a positive integer (episodes per environment in one "
                        f"update's batch), got {r!r}")
    check_epochs(get("update_epochs"), get("target_kl"))
    k = get("ft_denoising_steps")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1
                          or (num_inference_steps is not None and k > num_inference_steps)):
        top = num_inference_steps if num_inference_steps is not None else "S"
        raise UserError(f"algo.ft_denoising_steps must be an integer in [1, {top}] (the last DDIM steps "
                        f"fine-tuned; the others stay pre-trained) or null (all), got {k!r}")
    for key in ("gamma", "gae_lambda", "gamma_denoising"):
        v = get(key, 1.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise UserError(f"algo.{key} must be a number in [0, 1], got {v!r}")
    critic = get("critic") or {}
    if critic.get("features", "policy") not in CRITIC_FEATURES:
        raise UserError(f"unknown algo.critic.features={critic.get('features')}; valid: {', '.join(CRITIC_FEATURES)}")
    w = critic.get("warmup_updates", 0)
    if isinstance(w, bool) or not isinstance(w, int) or w < 0:
        raise UserError(f"algo.critic.warmup_updates must be a non-negative integer, got {w!r}")


class FineTuner:
    """Owns the optimisers, schedule, target buffer, critic and RNGs around a policy it wraps."""

    def __init__(self, policy: DiffusionPolicy, algo: DictConfig | dict, device: torch.device, seed: int,
                 reference: DiffusionPolicy | None = None):
        a = OmegaConf.create(algo) if isinstance(algo, dict) else algo
        S = policy.config.num_inference_steps
        check_algo(a, S)
        self.policy = policy.to(device)
        self.device = device
        self.reg_name = str(a.reg)
        # Only the last ft_denoising_steps DDIM steps are fine-tuned; the first ones run a frozen copy.
        k = a.get("ft_denoising_steps")
        frozen = 0 if k is None else S - int(k)
        if policy.config.frozen_steps != frozen:
            if policy.prefix is not None:
                raise UserError(f"the checkpoint's policy already freezes its first {policy.config.frozen_steps} "
                                f"denoising steps; fine-tune it with algo.ft_denoising_steps={S - policy.config.frozen_steps}")
            policy.freeze_prefix(frozen)
            policy.to(device)
        self.sampler = policy.ddim(float(a.eta), float(a.min_std))
        self.clip = float(a.clip)
        self.reg_weight = float(a.reg_weight)
        self.ppo_weight = float(a.get("ppo_weight", 1.0))
        self.p_step = int(a.p_step)
        self.update_epochs = a.get("update_epochs")
        self.target_kl = a.get("target_kl")
        self.batch_size = int(a.batch_size)
        self.bc_batch_size = int(a.get("bc_batch_size") or a.batch_size)
        self.normalize_reward = bool(a.normalize_reward)
        self.grad_clip = float(a.grad_clip)
        self.grad_terms = bool(a.get("grad_terms", False))
        self.reward_signal = bool(a.get("reward_signal", True))
        self.gamma_denoising = float(a.get("gamma_denoising", 1.0))
        self.optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=float(a.lr), **adam_kwargs(device))
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
        # DPPO's advantage: a critic, GAE over chunk steps, a running return scale.
        self.advantage = str(a.get("advantage", "reward"))
        self.critic: Critic | None = None
        if self.advantage == "gae":
            c = a.critic
            torch.manual_seed(seed)
            self.critic = Critic(policy, str(c.features), int(c.hidden), int(c.layers)).to(device)
            self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=float(c.lr), **adam_kwargs(device))
            self.critic_warmup = int(c.warmup_updates)
            self.gamma, self.gae_lambda = float(a.gamma), float(a.gae_lambda)
            self.return_scale = RunningReturnScale(self.gamma)
        self.updates = 0

    def weights(self, reward: torch.Tensor) -> torch.Tensor:
        return standardise(reward) if self.normalize_reward else reward

    def advantages(self, rollout: Rollout, features: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """(weights A (M,), the critic's targets (M,) or None, diagnostics)."""
        if self.critic is None:
            return self.weights(rollout.reward), None, {}
        missing = [i for i, t in enumerate(rollout.trajectories) if t.final_obs is None]
        if missing:
            raise ValueError(f"GAE needs each episode's final observation; trajectories {missing[:5]} lack it")
        self.return_scale.update(rollout)
        final = {k: torch.as_tensor(np.stack([t.final_obs[k] for t in rollout.trajectories])) for k in rollout.obs}
        self.critic.eval()
        if features is not None and self.critic.encoder is None:
            with torch.no_grad():
                values = self.critic.mlp(features.to(self.device)).squeeze(-1).cpu()
        else:
            values = self.critic.values(self.policy, rollout.obs)
        final_values = self.critic.values(self.policy, final)
        self.critic.train()
        adv, ret = rollout_gae(rollout, values, final_values, self.policy.config.n_action_steps, self.gamma,
                               self.gae_lambda, self.return_scale.scale)
        stats = {"value_explained_variance": explained_variance(ret, values), "return_scale": self.return_scale.scale,
                 "value_mean": float(values.mean()), "advantage_std": float(adv.std())}
        return (standardise(adv) if self.normalize_reward else adv), ret, stats

    def update(self, rollout: Rollout, episodes: int | None = None) -> dict[str, float]:
        """One update on this rollout (p_step steps per episode, or update_epochs epochs);
        returns diagnostics."""
        policy = self.policy
        # A poisoned rollout must not move the weights at all: check it before any step.
        for name, tensor in [("reward", rollout.reward), ("old_logp", rollout.old_logp), ("chains", rollout.chains),
                             *[(f"obs['{k}']", v) for k, v in rollout.obs.items()]]:
            if not torch.isfinite(tensor).all():
                raise FloatingPointError(f"non-finite values in the collected {name} at update {self.updates}")
        t_start = time.perf_counter()
        F = policy.config.frozen_steps
        S_trained = rollout.chains.shape[1] - 1 - F
        old_logp_all = rollout.old_logp[:, F:]
        sums: dict[str, float] = {}
        # 1-2. Advantages, and what the chunk rewards can say about the action at all.
        features = None
        if self.reward_signal or (self.critic is not None and self.critic.encoder is None):
            policy.eval()
            with torch.no_grad():
                features = torch.cat([policy.condition({k: v[i:i + 512].to(self.device) for k, v in rollout.obs.items()}).cpu()
                                      for i in range(0, rollout.size, 512)])
        if self.reward_signal and len(rollout.trajectories):
            sums.update(reward_signal(rollout.reward, rollout.positions(), features, self.rng))
        weights, returns, adv_stats = self.advantages(rollout, features)
        sums.update(adv_stats)
        weights = weights.to(self.device)
        denoise_w = self.gamma_denoising ** torch.arange(S_trained - 1, -1, -1, dtype=torch.float32, device=self.device)
        policy.train()
        warming = self.critic is not None and self.updates < self.critic_warmup
        # 3. Gradient steps on minibatches of chunks.
        chunks_per_batch = max(1, self.batch_size // S_trained)
        n_episodes = episodes if episodes is not None else max(1, len(rollout.trajectories))
        plan = {"p_steps": self.p_step * n_episodes} if self.update_epochs is None else {"epochs": int(self.update_epochs)}
        planned = steps_per_update(rollout.size, chunks_per_batch, **plan)
        taken, critic_s, kl_steps = 0, 0.0, torch.zeros(S_trained, dtype=torch.float64)
        stopped = False
        for idx in minibatches(rollout.size, chunks_per_batch, self.rng, **plan):
            obs = {k: v[idx].to(self.device) for k, v in rollout.obs.items()}
            stats: dict[str, Any] = {}
            cond = None  # the chunks' features from the policy step, which the critic reads (features=policy)
            if not warming:
                stats, cond = self._policy_step(obs, rollout, idx, old_logp_all[idx].to(self.device),
                                                weights[idx.to(self.device)][:, None] * denoise_w[None])
                kl_steps += torch.as_tensor(stats.pop("kl_per_step"), dtype=torch.float64)
            if self.critic is not None:
                t_c = time.perf_counter()
                stats["value_loss"] = self._critic_step(obs, returns[idx].to(self.device), cond)
                critic_s += time.perf_counter() - t_c
            taken += 1
            for k, v in stats.items():
                if k == "ratio_min":
                    sums[k] = min(sums.get(k, math.inf), v)
                elif k == "ratio_max":
                    sums[k] = max(sums.get(k, -math.inf), v)
                else:
                    sums[k] = sums.get(k, 0.0) + v
            if self.target_kl is not None and not warming and stats["approx_kl"] > float(self.target_kl):
                stopped = True
                break
        for k in list(sums):
            if k in ("loss", "loss_imp", f"loss_{self.reg_name}", "grad_norm", "grad_norm_imp", "grad_norm_reg",
                     "approx_kl", "clip_fraction", "value_loss"):
                sums[k] /= max(taken, 1)
        if not warming:
            for j, v in enumerate((kl_steps / max(taken, 1)).tolist()):
                sums[f"kl_step{F + j}"] = v  # the DDIM step's index in the chain (0: the noisiest)
        sums["lr"] = self.scheduler.get_last_lr()[0]  # the rate these steps used
        if not warming:
            self.scheduler.step()
        self.updates += 1
        sums.update({"gradient_steps": taken, "planned_gradient_steps": planned, "early_stop": float(stopped),
                     "critic_warmup": float(warming), "update_seconds": time.perf_counter() - t_start,
                     "critic_seconds": critic_s})
        sums.setdefault("approx_kl", 0.0)
        sums.setdefault("clip_fraction", 0.0)
        return sums

    def _policy_step(self, obs: dict[str, torch.Tensor], rollout: Rollout, idx: torch.Tensor,
                     old_logp: torch.Tensor, weights: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
        """One gradient step of L = ppo_weight * L_Imp + lambda * L_reg on these chunks;
        (diagnostics, the chunks' condition before the step, detached)."""
        policy = self.policy
        chains = rollout.chains[idx].to(self.device)
        batch = self.regulariser.denoising_batch(obs, chains, rollout)
        if batch is not None:  # bc, pl: their loss from the same encoder and U-Net pass
            new_logp, reg, cond = policy.chain_log_prob_and_loss(obs, chains, batch, self.sampler, self.torch_gen)
        else:
            cond = policy.condition(obs)
            new_logp = policy.chain_log_prob(cond, chains, self.sampler)
            reg = self.regulariser.loss(obs, chains, rollout, cond)  # kl: the same encoding
            cond = cond.detach()
        loss_imp, stats = ppo_loss(new_logp, old_logp, weights, self.clip)
        loss = self.ppo_weight * loss_imp if reg is None else self.ppo_weight * loss_imp + self.reg_weight * reg
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss at update {self.updates} (L_Imp={float(loss_imp.detach())}, "
                f"L_{self.reg_name}={float(reg.detach()) if reg is not None else 0.0})"
            )
        params = policy.trainable_parameters()
        if self.grad_terms:  # each term's own gradient norm (one more backward per term; for diagnosis)
            for name, term in (("grad_norm_imp", self.ppo_weight * loss_imp),
                               ("grad_norm_reg", None if reg is None else self.reg_weight * reg)):
                if term is None or not term.requires_grad:
                    stats[name] = 0.0
                    continue
                grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
                stats[name] = float(torch.linalg.vector_norm(torch.stack(
                    [torch.linalg.vector_norm(g) for g in grads if g is not None])))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        if not torch.isfinite(grad_norm):
            raise FloatingPointError(f"non-finite gradient at update {self.updates}")
        self.optimizer.step()
        stats.update({"loss": float(loss.detach()), "loss_imp": float(loss_imp.detach()),
                      f"loss_{self.reg_name}": float(reg.detach()) if reg is not None else 0.0,
                      "grad_norm": float(grad_norm)})
        return stats, cond

    def _critic_step(self, obs: dict[str, torch.Tensor], returns: torch.Tensor,
                     cond: torch.Tensor | None = None) -> float:
        """One value-loss step; ``cond``: the policy's features of ``obs`` when the policy
        step has just computed them (read by features=policy, saving an encoder pass)."""
        value = self.critic(self.policy, obs, cond)
        loss = 0.5 * ((value - returns) ** 2).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite value loss at update {self.updates}")
        self.critic_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.critic.parameters(), self.grad_clip)
        self.critic_optimizer.step()
        return float(loss.detach())

    def state(self) -> dict[str, Any]:
        out = {"policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(),
               "scheduler": self.scheduler.state_dict(), "buffer": self.buffer.state(), "updates": self.updates,
               "rng": self.rng.bit_generator.state, "torch_gen": self.torch_gen.get_state()}
        if self.critic is not None:
            out.update({"critic": self.critic.state_dict(), "critic_optimizer": self.critic_optimizer.state_dict(),
                        "return_scale": self.return_scale.state()})
        return out

    def load(self, payload: dict[str, Any]) -> None:
        if (self.critic is not None) != ("critic" in payload):
            made = "advantage=gae" if "critic" in payload else "advantage=reward"
            raise UserError(f"the run's checkpoint was made with algo.{made}; resume it with the same setting")
        self.policy.load_state_dict(payload["policy"], strict=True)
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.buffer.load(payload["buffer"])
        self.updates = int(payload["updates"])
        self.rng.bit_generator.state = payload["rng"]
        self.torch_gen.set_state(payload["torch_gen"].cpu())  # generator states are CPU byte tensors
        if self.critic is not None:
            self.critic.load_state_dict(payload["critic"], strict=True)
            self.critic_optimizer.load_state_dict(payload["critic_optimizer"])
            self.return_scale.load(payload["return_scale"])
