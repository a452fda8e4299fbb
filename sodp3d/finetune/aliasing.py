"""Noise aliasing for ``method=noise-sac`` (``noise_sac.aliasing=true``; DSRL's NA form:
Wagenmaker et al. 2025, arXiv 2506.15799, from the paper's description).

Many noises map to one executed chunk (the planner is a many-to-one map; the bound clips
more). Plain noise-SAC learns Q(s, x_S) and must find that out noise by noise. Here:

    Q_A(s, a)     a critic on the *executed* chunk a (Ta x Da, the env's actions), fitted by
                  TD on the replay buffer: a = planner(s, x_S) of the stored noise, the
                  target's next chunk a' = planner(s', x_S') with x_S' from the actor
    Q_W(s, x_S)   SAC's own critic, no longer fitted by TD: distilled from Q_A, regressed on
                  Q_A(s, planner(s, x_S)), half of the rows at x_S ~ N(0, I) clipped to the
                  bound (the noises the planner itself draws), half at the actor's samples
    the actor     SAC's, maximising Q_W with SAC's entropy term, as in plain SAC

The three planner calls of a gradient step (the buffer's noise at s, the actor's at s',
the distillation's at s) go through the frozen planner as one batch of 3 x batch_size, from SAC's
observation (the encoder's features) alone, so the planner must have no frozen prefix
(which reads the raw observation). On a CPU that batch costs far more than SAC's own
networks (docs/benchmarks.md); on a GPU it is one call.

Shapes: B the batch, G SAC's observation width, A = Tp x Da SAC's action (the noise,
scaled to [-1, 1] as SB3 stores it), C = Ta x Da the executed chunk.
"""

from __future__ import annotations

from typing import Callable

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F

# (features (B, G), noise (B, A) in the noise's own units) -> executed chunk (B, C)
Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def aliased_sac(base: type) -> type:
    """``base`` (an SB3 SAC subclass) trained with noise aliasing. Set ``denoise`` after
    construction or ``load``: it is the frozen planner, not saved with the model."""
    from stable_baselines3.common.policies import ContinuousCritic
    from stable_baselines3.common.torch_layers import FlattenExtractor
    from stable_baselines3.common.utils import polyak_update

    class AliasedNoiseSAC(base):
        denoise: Denoise | None = None

        def __init__(self, *args, chunk_dim: int = 0, **kwargs):
            self.chunk_dim = int(chunk_dim)  # C; saved with the model, so load rebuilds Q_A
            super().__init__(*args, **kwargs)

        def _setup_model(self) -> None:
            super()._setup_model()
            obs = self.observation_space
            chunk = gym.spaces.Box(-np.inf, np.inf, (self.chunk_dim,), np.float32)

            def critic() -> ContinuousCritic:
                kw = {**self.policy.critic_kwargs, "action_space": chunk,
                      "features_extractor": FlattenExtractor(obs), "features_dim": int(np.prod(obs.shape))}
                return type(self.policy.critic)(**kw).to(self.device)  # SB3's, or with LayerNorm

            self.action_critic, self.action_critic_target = critic(), critic()
            self.action_critic_target.load_state_dict(self.action_critic.state_dict())
            self.action_critic_target.set_training_mode(False)
            self.action_critic.optimizer = self.policy.optimizer_class(
                self.action_critic.parameters(), lr=self.lr_schedule(1), **self.policy.optimizer_kwargs)

        def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
            dicts, tensors = super()._get_torch_save_params()
            return dicts + ["action_critic", "action_critic_target", "action_critic.optimizer"], tensors

        def _excluded_save_params(self) -> list[str]:
            return super()._excluded_save_params() + ["action_critic", "action_critic_target", "denoise"]

        def train(self, gradient_steps: int, batch_size: int = 64) -> None:
            if self.denoise is None:
                raise RuntimeError("AliasedNoiseSAC.denoise is not set (the frozen planner's map)")
            self.policy.set_training_mode(True)
            self.action_critic.set_training_mode(True)
            optimizers = [self.actor.optimizer, self.critic.optimizer, self.action_critic.optimizer]
            if self.ent_coef_optimizer is not None:
                optimizers.append(self.ent_coef_optimizer)
            self._update_learning_rate(optimizers)
            bound = float(self.action_space.high[0])
            logs: dict[str, list[float]] = {k: [] for k in ("ent_coef", "ent_coef_loss", "actor_loss",
                                                            "critic_loss", "action_critic_loss")}
            for _ in range(gradient_steps):
                d = self.replay_buffer.sample(batch_size, env=self._vec_normalize_env)
                s, s2, B = d.observations, d.next_observations, d.observations.shape[0]
                w_pi, log_prob = self.actor.action_log_prob(s)
                log_prob = log_prob.reshape(-1, 1)
                if self.ent_coef_optimizer is not None:
                    ent_coef = torch.exp(self.log_ent_coef.detach())
                    ent_loss = -(self.log_ent_coef * (log_prob + self.target_entropy).detach()).mean()
                    self.ent_coef_optimizer.zero_grad()
                    ent_loss.backward()
                    self.ent_coef_optimizer.step()
                    logs["ent_coef_loss"].append(ent_loss.item())
                else:
                    ent_coef = self.ent_coef_tensor
                logs["ent_coef"].append(ent_coef.item())

                with torch.no_grad():
                    w2, log_prob2 = self.actor.action_log_prob(s2)
                    # Q_W is distilled where the planner draws its noise and where the actor acts:
                    # each row x_S ~ N(0, I) clipped to the bound, or the actor's sample, half and half.
                    prior = torch.randn_like(d.actions).clamp(-bound, bound) / bound
                    w_d = torch.where(torch.rand((B, 1), device=s.device) < 0.5, prior, w_pi.detach())
                    a, a2, a_d = self.denoise(torch.cat([s, s2, s]), torch.cat([d.actions, w2, w_d]) * bound).split(B)
                    q2 = torch.min(torch.cat(self.action_critic_target(s2, a2), dim=1), dim=1, keepdim=True)[0]
                    y = d.rewards + (1 - d.dones) * self.gamma * (q2 - ent_coef * log_prob2.reshape(-1, 1))
                qa_loss = 0.5 * sum(F.mse_loss(q, y) for q in self.action_critic(s, a))
                self.action_critic.optimizer.zero_grad()
                qa_loss.backward()
                self.action_critic.optimizer.step()

                with torch.no_grad():  # Q_W learns Q_A's value of the chunk each noise executes
                    target = torch.min(torch.cat(self.action_critic(s, a_d), dim=1), dim=1, keepdim=True)[0]
                qw_loss = 0.5 * sum(F.mse_loss(q, target) for q in self.critic(s, w_d))
                self.critic.optimizer.zero_grad()
                qw_loss.backward()
                self.critic.optimizer.step()

                q_pi = torch.min(torch.cat(self.critic(s, w_pi), dim=1), dim=1, keepdim=True)[0]
                actor_loss = (ent_coef * log_prob - q_pi).mean()
                self.actor.optimizer.zero_grad()
                actor_loss.backward()
                self.actor.optimizer.step()
                polyak_update(self.action_critic.parameters(), self.action_critic_target.parameters(), self.tau)
                logs["action_critic_loss"].append(qa_loss.item())
                logs["critic_loss"].append(qw_loss.item())
                logs["actor_loss"].append(actor_loss.item())
            self._n_updates += gradient_steps
            self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
            for k, v in logs.items():
                if v:
                    self.logger.record(f"train/{k}", float(np.mean(v)))

    return AliasedNoiseSAC
