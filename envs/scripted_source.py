"""The ``scripted`` data source (Meta-World): Meta-World's scripted policies, degraded on purpose.

Each episode draws a kind: ``noisy`` (Gaussian action noise, its std drawn per episode
from ``scripted.noise_std``), ``perturbed`` (noisy, plus stretches of uniform random
actions) or ``random`` (uniform random actions throughout), with the configured shares.
The mix holds failures, partial and full successes. An episode's randomness derives
from (seed, task, episode index) only.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from sodp3d.errors import UserError

from .settings import ObsSettings
from .tasks import suite_of
from .workers import env_for, episode_rng, run_in_order


@dataclass(frozen=True)
class ScriptedConfig:
    noise_std: tuple[float, float] = (0.0, 1.0)
    random_share: float = 0.1
    perturb_share: float = 0.2
    perturb_prob: float = 0.05
    perturb_length: tuple[int, int] = (5, 30)

    @classmethod
    def from_cfg(cls, cfg: Any, section: str = "scripted") -> "ScriptedConfig":
        """Parse and check the knobs of a config section (``scripted:``, or ``expert:``,
        whose episodes are degraded the same way); errors name ``section``."""
        c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg or {})
        out = cls(
            noise_std=tuple(float(v) for v in c.get("noise_std", cls.noise_std)),
            random_share=float(c.get("random_share", cls.random_share)),
            perturb_share=float(c.get("perturb_share", cls.perturb_share)),
            perturb_prob=float(c.get("perturb_prob", cls.perturb_prob)),
            perturb_length=tuple(int(v) for v in c.get("perturb_length", cls.perturb_length)),
        )
        lo, hi = out.noise_std
        if not 0 <= lo <= hi:
            raise UserError(f"{section}.noise_std must be [low, high] with 0 <= low <= high, got {list(out.noise_std)}")
        if min(out.random_share, out.perturb_share) < 0 or out.random_share + out.perturb_share > 1:
            raise UserError(f"{section}.random_share and {section}.perturb_share must be >= 0 and add up to at most 1")
        if not 0 <= out.perturb_prob <= 1 or not 1 <= out.perturb_length[0] <= out.perturb_length[1]:
            raise UserError(f"{section}.perturb_prob must be in [0, 1] and perturb_length [min, max] with 1 <= min <= max")
        return out


def check_scripted(tasks: list[str], cfg: DictConfig) -> None:
    """Refuse what this source cannot do, before anything is written."""
    not_mw = [t for t in tasks if suite_of(t) != "metaworld"]
    if not_mw:
        raise UserError(f"source=scripted has policies for Meta-World only; use source=sac "
                        f"(or source=expert, with DAPG's policies) for {', '.join(not_mw)}")
    ScriptedConfig.from_cfg(cfg.get("scripted"))


def scripted_policy(task: str):
    from metaworld.policies import ENV_POLICY_MAP

    return ENV_POLICY_MAP[task]()


def run_scripted_episode(settings: ObsSettings, cfg: ScriptedConfig, seed: int, index: int) -> dict[str, Any]:
    """One episode of a degraded scripted policy; arrays with a leading time axis."""
    policy = scripted_policy(settings.task)

    def act(state: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            # The policies warn on every call that their gains exceed the action
            # range; actions are clipped to [-1, 1] anyway.
            warnings.simplefilter("ignore", UserWarning)
            return policy.get_action(state)

    return run_degraded_episode(settings, cfg, act, 4, "scripted", seed, index)


def run_degraded_episode(settings: ObsSettings, cfg: ScriptedConfig, act: Callable[[np.ndarray], np.ndarray],
                         action_dim: int, source: str, seed: int, index: int) -> dict[str, Any]:
    """One episode of a policy ``act(state) -> action`` (the float64 state the simulator
    returned), degraded by the episode's kind and noise; arrays with a leading time axis.
    Every draw comes from (seed, task, index) in a fixed order."""
    env = env_for(settings)
    rng = episode_rng(seed, settings.task, index)
    reset_seed = int(rng.integers(2**31 - 1))
    u = rng.random()
    kind = "random" if u < cfg.random_share else "perturbed" if u < cfg.random_share + cfg.perturb_share else "noisy"
    noise = float(rng.uniform(*cfg.noise_std))
    padded_before = padded_stored = getattr(env, "padded", 0)  # no camera (point_cloud: false): nothing padded
    obs, _ = env.reset(seed=reset_seed)
    base = env.unwrapped
    observed = [k for k in ("point_cloud", "image", "agent_pos", "state") if k in obs]  # image: when configured
    steps: dict[str, list] = {k: [] for k in observed + ["action", "reward", "success"]}
    stretch = 0
    for _ in range(settings.episode_length):
        if kind == "random":
            action = rng.uniform(-1.0, 1.0, action_dim)
        else:
            action = act(base._last_state)
            action = action + rng.normal(0.0, noise, action_dim) if noise > 0 else action
            if kind == "perturbed":
                if stretch == 0 and rng.random() < cfg.perturb_prob:
                    stretch = int(rng.integers(cfg.perturb_length[0], cfg.perturb_length[1] + 1))
                if stretch > 0:
                    action = rng.uniform(-1.0, 1.0, action_dim)
                    stretch -= 1
        action = np.clip(action, -1.0, 1.0).astype(np.float32)
        for k in observed:
            steps[k].append(obs[k])
        steps["action"].append(action)
        padded_stored = getattr(env, "padded", 0)  # the observations stored so far (the final one is not)
        obs, reward, terminated, truncated, info = env.step(action)
        steps["reward"].append(reward)
        steps["success"].append(info["success"])
        if terminated or truncated:
            break
    episode = {k: np.asarray(v) for k, v in steps.items()}
    episode["success"] = episode["success"].astype(bool)
    meta = {
        "success": bool(episode["success"].any()),
        "return": float(episode["reward"].sum()),
        "source": source,
        "kind": kind,
        "noise_std": noise,
        "padded": padded_stored - padded_before,  # stored observations whose crop kept fewer than N points
    }
    return {"task": settings.task, "index": index, "episode": episode, "meta": meta}


def _scripted_job(args: tuple) -> dict[str, Any]:
    return run_scripted_episode(*args)


def run_scripted_jobs(
    todo: list[tuple[str, int]], settings: dict[str, ObsSettings], cfg: DictConfig, seed: int, workers: int
) -> Iterator[dict[str, Any]]:
    """Yield one episode per (task, episode index) in ``todo``, in that order."""
    scripted = ScriptedConfig.from_cfg(cfg.get("scripted"))
    jobs = [(settings[t], scripted, seed, i) for t, i in todo]
    yield from run_in_order(_scripted_job, jobs, workers)
