"""Collecting sub-optimal, multi-task point-cloud datasets into zarr.

Sources:
  * ``scripted`` (Meta-World): Meta-World's scripted policies, degraded on purpose.
    Each episode draws a kind: ``noisy`` (Gaussian action noise, its std drawn per
    episode from ``scripted.noise_std``), ``perturbed`` (noisy, plus stretches of
    uniform random actions) or ``random`` (uniform random actions throughout), with the
    configured shares. The mix holds failures, partial and full successes.
  * ``sac`` (any task; the only one for Adroit): see ``envs/sac_source.py``.

Order and resumption: jobs run in a fixed order (episode 0 of every task, then
episode 1, ...), every episode's randomness derives from (seed, task, episode index),
and episodes are committed in that order. A re-run with the same settings skips what
is committed and appends the rest, so a killed-and-resumed collection equals an
uninterrupted one. Every episode is bounded by the episode length.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import warnings
import zlib
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from sodp3d.data.store import EpisodeWriter, inspect_path
from sodp3d.errors import UserError

from .factory import ensure_headless_gl, make_env
from .settings import ObsSettings, task_settings
from .tasks import resolve_tasks, suite_of

SOURCES = ("scripted", "sac")


def episode_rng(seed: int, task: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(task.encode()), int(index)]))


@dataclass(frozen=True)
class ScriptedConfig:
    noise_std: tuple[float, float] = (0.0, 1.0)
    random_share: float = 0.1
    perturb_share: float = 0.2
    perturb_prob: float = 0.05
    perturb_length: tuple[int, int] = (5, 30)

    @classmethod
    def from_cfg(cls, cfg: Any) -> "ScriptedConfig":
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
            raise UserError(f"scripted.noise_std must be [low, high] with 0 <= low <= high, got {list(out.noise_std)}")
        if min(out.random_share, out.perturb_share) < 0 or out.random_share + out.perturb_share > 1:
            raise UserError("scripted.random_share and scripted.perturb_share must be >= 0 and add up to at most 1")
        if not 0 <= out.perturb_prob <= 1 or not 1 <= out.perturb_length[0] <= out.perturb_length[1]:
            raise UserError("scripted.perturb_prob must be in [0, 1] and perturb_length [min, max] with 1 <= min <= max")
        return out


# --------------------------------------------------------------------------------------
# Workers: one scripted episode per job; envs are cached per process.
_ENVS: dict[tuple, Any] = {}


def env_for(settings: ObsSettings):
    key = (settings.task, repr(settings))
    if key not in _ENVS:
        _ENVS[key] = make_env(settings.task, settings=settings)
    return _ENVS[key]


def scripted_policy(task: str):
    from metaworld.policies import ENV_POLICY_MAP

    return ENV_POLICY_MAP[task]()


def run_scripted_episode(settings: ObsSettings, cfg: ScriptedConfig, seed: int, index: int) -> dict[str, Any]:
    """One episode of a degraded scripted policy; arrays with a leading time axis."""
    env = env_for(settings)
    rng = episode_rng(seed, settings.task, index)
    reset_seed = int(rng.integers(2**31 - 1))
    u = rng.random()
    kind = "random" if u < cfg.random_share else "perturbed" if u < cfg.random_share + cfg.perturb_share else "noisy"
    noise = float(rng.uniform(*cfg.noise_std))
    policy = scripted_policy(settings.task)
    padded_before = env.padded
    obs, _ = env.reset(seed=reset_seed)
    base = env.unwrapped
    steps: dict[str, list] = {k: [] for k in ("point_cloud", "agent_pos", "state", "action", "reward", "success")}
    stretch = 0
    for _ in range(settings.episode_length):
        if kind == "random":
            action = rng.uniform(-1.0, 1.0, 4)
        else:
            with warnings.catch_warnings():
                # The policies warn on every call that their gains exceed the action
                # range; actions are clipped to [-1, 1] anyway.
                warnings.simplefilter("ignore", UserWarning)
                action = policy.get_action(base._last_state)  # the float64 state Meta-World returned
            action = action + rng.normal(0.0, noise, 4) if noise > 0 else action
            if kind == "perturbed":
                if stretch == 0 and rng.random() < cfg.perturb_prob:
                    stretch = int(rng.integers(cfg.perturb_length[0], cfg.perturb_length[1] + 1))
                if stretch > 0:
                    action = rng.uniform(-1.0, 1.0, 4)
                    stretch -= 1
        action = np.clip(action, -1.0, 1.0).astype(np.float32)
        for k in ("point_cloud", "agent_pos", "state"):
            steps[k].append(obs[k])
        steps["action"].append(action)
        padded_stored = env.padded  # the observations stored so far (the final one is not)
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
        "source": "scripted",
        "kind": kind,
        "noise_std": noise,
        "padded": padded_stored - padded_before,  # stored observations whose crop kept fewer than N points
    }
    return {"task": settings.task, "index": index, "episode": episode, "meta": meta}


def close_envs() -> None:
    """Release this process's cached environments (and their GL contexts)."""
    for env in _ENVS.values():
        env.close()
    _ENVS.clear()


def _scripted_job(args: tuple) -> dict[str, Any]:
    return run_scripted_episode(*args)


def init_worker() -> None:
    ensure_headless_gl()
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


# --------------------------------------------------------------------------------------
def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return value


def preflight(settings: ObsSettings) -> dict[str, int]:
    """Build the env and render once, so a bad camera or crop fails before anything is
    written; returns the task's per-step shapes."""
    env = env_for(settings)
    env.reset(seed=0)
    space = env.observation_space
    return {
        "agent_pos_dim": int(space["agent_pos"].shape[0]),
        "state_dim": int(space["state"].shape[0]),
        "action_dim": int(env.action_space.shape[0]),
    }


def collect(cfg: DictConfig) -> dict[str, Any]:
    """Run a collection described by the ``collect`` config; returns a summary."""
    from tqdm import tqdm

    tasks = resolve_tasks(cfg.task)
    episodes = _positive_int("episodes", cfg.episodes)
    if not cfg.get("out"):
        raise UserError("no output path; pass out=<path.zarr>")
    out = str(cfg.out)
    source = str(cfg.source)
    if source not in SOURCES:
        raise UserError(f"unknown source '{source}'; valid: {', '.join(SOURCES)}")
    if source == "scripted":
        not_mw = [t for t in tasks if suite_of(t) != "metaworld"]
        if not_mw:
            raise UserError(f"source=scripted has policies for Meta-World only; use source=sac for {', '.join(not_mw)}")
        scripted = ScriptedConfig.from_cfg(cfg.get("scripted"))
    seed = int(cfg.seed)
    workers = _positive_int("workers", int(cfg.workers) if cfg.get("workers") is not None else 1)
    settings = {t: task_settings(t, cfg.env) for t in tasks}
    if cfg.get("episode_length") is not None:
        length = _positive_int("episode_length", cfg.episode_length)
        settings = {t: replace(s, episode_length=length) for t, s in settings.items()}
    shapes = {(s.num_points, s.channels) for s in settings.values()}
    if len(shapes) > 1:
        raise UserError(f"all tasks of one dataset need the same cloud shape (num_points, channels); got {sorted(shapes)}")

    kind = inspect_path(out)
    if kind in ("dp3", "foreign"):
        raise UserError(
            f"{out} exists and is not a sodp3d dataset"
            + (" (it is a DP3-layout dataset)" if kind == "dp3" else "")
            + "; choose a new out path (or the path of a sodp3d dataset to extend it)"
        )
    # How the episodes are made; extending a dataset must not change it for a task.
    source_cfg = cfg.get(source)
    recipe = {
        "source": source,
        "seed": seed,
        source: OmegaConf.to_container(source_cfg, resolve=True) if source_cfg is not None else {},
    }
    writer = EpisodeWriter.open(out) if kind == "sodp3d" else None
    if writer is not None:
        _check_compatible(out, writer.attrs, settings, recipe)
    try:
        dims = {t: preflight(s) for t, s in settings.items()}
        if len({tuple(d.values()) for d in dims.values()}) > 1:
            listed = "; ".join(f"{t}: " + ", ".join(f"{k} {v}" for k, v in d.items()) for t, d in dims.items())
            raise UserError(f"tasks of one dataset must share per-step shapes, and these differ ({listed}); "
                            "collect them into separate datasets")
        shape = next(iter(dims.values()))
        if writer is not None:
            old = {k: writer.attrs.get(k) for k in shape}
            if all(v is not None for v in old.values()) and old != shape:
                raise UserError(f"{out} holds steps with {old}; these tasks have {shape}; choose another out path")

        task_attrs = {t: {**s.to_dict(), **recipe} for t, s in settings.items()}
        if writer is None:
            writer = EpisodeWriter.create(out, {**_dataset_attrs(task_attrs, settings, seed), **shape})
        else:
            merged = dict(writer.attrs.get("tasks", {}))
            merged.update({t: a for t, a in task_attrs.items() if t not in merged})
            writer.update_attrs(tasks=merged)
        done = {t: 0 for t in tasks}
        for t in writer.episode_tasks():
            if t in done:
                done[t] += 1
        todo = [(t, i) for i in range(episodes) for t in tasks if i >= done[t]]
        already = sum(min(done[t], episodes) for t in tasks)
        total = episodes * len(tasks)

        bar = tqdm(total=total, initial=already, desc=f"collect {source}", unit="ep", dynamic_ncols=True)
        successes, steps, t0 = 0, 0, time.perf_counter()
        try:
            for result in _run_jobs(source, todo, settings, cfg, seed, workers, scripted if source == "scripted" else None):
                writer.append_episode(result["episode"], result["task"], result["meta"])
                successes += int(result["meta"]["success"])
                steps += len(result["episode"]["action"])
                bar.update(1)
                bar.set_postfix(successes=successes, steps_per_s=f"{steps / (time.perf_counter() - t0):.0f}")
        finally:
            bar.close()
        return {"out": out, "new_episodes": len(todo), "skipped": already, "steps": steps, "seconds": time.perf_counter() - t0}
    finally:
        close_envs()


def _run_jobs(source, todo, settings, cfg, seed, workers, scripted):
    if source == "sac":
        from .sac_source import run_sac_jobs

        yield from run_sac_jobs(todo, settings, cfg, seed, workers)
        return
    jobs = [(settings[t], scripted, seed, i) for t, i in todo]
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield _scripted_job(job)
        return
    ctx = mp.get_context("spawn")
    with ctx.Pool(min(workers, len(jobs)), initializer=init_worker) as pool:
        yield from pool.imap(_scripted_job, jobs, chunksize=1)


def _dataset_attrs(task_attrs: dict, settings: dict[str, ObsSettings], seed: int) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("sodp3d", "mujoco", "metaworld", "gymnasium", "gymnasium-robotics", "open3d-cpu", "open3d", "zarr", "numpy"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    first = next(iter(settings.values()))
    return {
        "tasks": task_attrs,
        "num_points": first.num_points,
        "channels": first.channels,
        "seed": seed,
        "versions": versions,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _check_compatible(out: str, attrs: dict, settings: dict[str, ObsSettings], recipe: dict[str, Any]) -> None:
    stored = attrs.get("tasks", {})
    for task, s in settings.items():
        shape = (s.num_points, s.channels)
        if (attrs.get("num_points"), attrs.get("channels")) != shape:
            raise UserError(
                f"{out} holds clouds of {attrs.get('num_points')} points x {attrs.get('channels')} channels; "
                f"this run asks for {shape[0]} x {shape[1]}; choose another out path"
            )
        if task in stored:
            old = {k: v for k, v in stored[task].items() if k != "task"}
            new = {k: v for k, v in {**s.to_dict(), **recipe}.items() if k != "task"}
            diff = sorted(k for k in new if old.get(k) != new[k])
            if diff:
                raise UserError(
                    f"{out} was collected for {task} with other settings ({', '.join(diff)} differ{'s' if len(diff) == 1 else ''}); "
                    "use the same settings to extend it, or another out path"
                )
