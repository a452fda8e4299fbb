"""Shared pieces of the fine-tuning unit tests: a tiny state-only policy, the fine-tuner's
settings, hand-built rollouts (sample chains for a batch of observations, chunk reward
defined by the test) and trajectories. Not a test file."""

from __future__ import annotations

import numpy as np
import torch

from sodp3d.finetune.ppo import FineTuner
from sodp3d.finetune.rollouts import Rollout, Trajectory
from sodp3d.normalizer import MinMaxNormalizer
from sodp3d.policy import DiffusionPolicy, PolicyConfig

Tp, To, Ta, Da, Ds = 4, 2, 3, 2, 3
S = 10  # DDIM steps (PolicyConfig default)
CPU = torch.device("cpu")
OBS = torch.tensor([0.1, -0.2, 0.3])  # the bandit's constant observation
MODE = 0.5  # the two modes: every action +MODE or every action -MODE


def make_policy(seed: int = 0) -> DiffusionPolicy:
    torch.manual_seed(seed)
    config = PolicyConfig(shape_meta={"state": [Ds], "action": [Da]}, horizon=Tp, n_obs_steps=To, n_action_steps=Ta,
                          encoder="state", encoder_kwargs={"hidden": 32, "out_channels": 16}, unet="tiny")
    rng = np.random.default_rng(seed)
    # Actions span [-1, 1] so that the modes +-0.5 sit inside the sampler's x0 clip.
    norm = MinMaxNormalizer.fit({"state": rng.uniform(-1, 1, (16, Ds)).astype(np.float32),
                                 "action": np.array([[-1.0] * Da, [1.0] * Da], np.float32)})
    return DiffusionPolicy(config, norm)


def algo(**overrides) -> dict:
    a = dict(reg="none", reg_weight=1.0, p_step=1, batch_size=64 * S, bc_batch_size=32, lr=1e-3, lr_decay=1.0,
             clip=0.2, normalize_reward=True, eta=1.0, min_std=0.1, grad_clip=1.0, n_init=0, buffer_capacity=10,
             top_n=3)
    a.update(overrides)
    return a


def const_obs(n: int) -> dict[str, torch.Tensor]:
    return {"state": OBS.expand(n, To, Ds).clone()}


def random_obs(n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"state": torch.rand(n, To, Ds, generator=gen) * 2 - 1}


def sample_rollout(ft: FineTuner, obs: dict[str, torch.Tensor], gen: torch.Generator, reward_fn=None):
    """(Rollout, unnormalised x0 (M, Tp, Da)) as collect_rollout() would record them; reward_fn(x0) -> (M,)."""
    policy = ft.policy
    policy.eval()
    with torch.no_grad():
        cond = policy.condition(obs)
        n = cond.shape[0]
        _, chain, logp = ft.sampler.sample(policy.denoiser(cond), (n, Tp, Da), generator=gen, return_chain=True,
                                           return_log_prob=True, device=cond.device)
    x0 = policy.normalizer.unnormalize("action", chain[:, -1])
    reward = reward_fn(x0) if reward_fn is not None else torch.randn(n, generator=gen)
    return Rollout(obs=obs, chains=chain, old_logp=logp, reward=reward.float()), x0


def mode_reward(sign: int):
    """+1 when the chunk's mean action has the favoured sign, else -1."""
    return lambda x0: torch.where(sign * x0.mean(dim=(1, 2)) > 0, 1.0, -1.0)


def params(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}


def assert_same_params(before: dict, policy: torch.nn.Module) -> None:
    after = policy.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"parameters changed: {changed[:5]}"


def trajectory(actions: np.ndarray, starts, ret: float = 0.0, success: bool = False, obs_value=None):
    """A Trajectory with distinct per-chunk observations (chunk i sees state i / 10)."""
    C = len(starts)
    if obs_value is None:
        obs = np.arange(C, dtype=np.float32)[:, None, None] / 10 + np.zeros((C, To, Ds), np.float32)
    else:
        obs = np.full((C, To, Ds), obs_value, np.float32)
    return Trajectory(obs={"state": obs}, actions=np.asarray(actions, np.float32),
                      chunk_starts=np.asarray(starts, np.int64),
                      ret=float(ret), success=bool(success))


def chunk_log_probs(policy, sampler, obs: dict[str, torch.Tensor], chains: torch.Tensor) -> torch.Tensor:
    """(B, S') log-probabilities of stored chains' trained steps under the current weights (encoder included)."""
    return policy.chain_log_prob(policy.condition(obs), chains, sampler)
