"""The ``sac`` data source: a state-based SAC agent's early experience, rendered afterwards.

As in the paper (the first 50% of a SAC replay buffer for Meta-World, 30% for Adroit),
the data is the *beginning* of a SAC run: ``episodes`` kept episodes per task are the
first ``sac.keep`` share of a run of ``episodes / sac.keep`` episodes. Experience after
the kept share is never stored, so training stops once the kept episodes are in.

Two phases, so that training runs on cheap state observations:
  1. stable-baselines3 SAC trains on the low-dim ``state``; a recorder keeps, per
     episode, the model fields a reset changes and, per step, the full MuJoCo physics
     state, the observations, action, reward and success.
  2. Each kept episode is put back into the simulator step by step and its point
     clouds are rendered with the same pipeline as live observations.

Resumption: episodes are committed one by one in phase 2. A kill during training
repeats that task's SAC run on the next invocation (same seed, same run); committed
episodes are skipped.
"""

from __future__ import annotations

import math
import multiprocessing as mp
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from omegaconf import DictConfig, OmegaConf

from sodp3d.errors import UserError

from .factory import worker_start_method
from .settings import ObsSettings
from .suites import make_suite_env
from .workers import env_for, episode_rng, init_worker


class EpisodeRecorder(gym.Wrapper):
    """Presents the suite env to SAC as a plain state env and records every episode."""

    def __init__(self, env):
        super().__init__(env)
        self.observation_space = env.observation_space["state"]
        self.episodes: list[dict[str, Any]] = []
        self._current: dict[str, Any] | None = None

    def _observe(self, obs):
        base = self.env.unwrapped
        self._current["physics"].append(base.physics_snapshot())
        self._current["state"].append(obs["state"])
        self._current["agent_pos"].append(obs["agent_pos"])

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)
        self._current = {"model": self.env.unwrapped.model_snapshot(), "physics": [], "state": [], "agent_pos": [],
                         "action": [], "reward": [], "success": []}
        self._observe(obs)
        return obs["state"], info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        cur = self._current
        cur["action"].append(np.asarray(action, dtype=np.float32))
        cur["reward"].append(float(reward))
        cur["success"].append(bool(info["success"]))
        if terminated or truncated:
            self.episodes.append(
                {k: (v if k == "model" else np.asarray(v)) for k, v in cur.items()}
            )
        else:
            self._observe(obs)
        return obs["state"], reward, terminated, truncated, info


def _sac_options(cfg: Any) -> dict[str, Any]:
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg or {})
    keep = float(c.get("keep", 0.5))
    if not 0 < keep <= 1:
        raise UserError(f"sac.keep must be in (0, 1], got {keep}")
    return {
        "keep": keep,
        "learning_starts": int(c.get("learning_starts", 1000)),
        "batch_size": int(c.get("batch_size", 256)),
        "learning_rate": float(c.get("learning_rate", 3e-4)),
        "buffer_size": int(c.get("buffer_size", 1_000_000)),
        "train_freq": int(c.get("train_freq", 1)),
        "gradient_steps": int(c.get("gradient_steps", 1)),
        "net_arch": list(c.get("net_arch", [256, 256])),
    }


def train_and_record(settings: ObsSettings, options: dict[str, Any], seed: int, n_episodes: int,
                     log_dir: str | None = None) -> list[dict[str, Any]]:
    """Run SAC on the task's state until ``n_episodes`` episodes are recorded. SB3's logger
    writes ``progress.csv`` to ``log_dir`` (not to a directory of its own in the system's
    temp dir)."""
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.logger import configure

    env = EpisodeRecorder(make_suite_env(settings.task, settings.episode_length))
    run_seed = int(episode_rng(seed, settings.task, 2**32 - 1).integers(2**31 - 1))  # a stream no episode index uses

    class _StopWhenKept(BaseCallback):
        def _on_step(self) -> bool:
            return len(env.episodes) < n_episodes

    full_run = math.ceil(n_episodes / options["keep"]) * settings.episode_length
    model = SAC(
        "MlpPolicy",
        env,
        learning_rate=options["learning_rate"],
        buffer_size=min(options["buffer_size"], full_run),
        learning_starts=options["learning_starts"],
        batch_size=options["batch_size"],
        train_freq=options["train_freq"],
        gradient_steps=options["gradient_steps"],
        policy_kwargs={"net_arch": options["net_arch"]},
        seed=run_seed,
        device="auto",
        verbose=0,
    )
    if log_dir is not None:
        model.set_logger(configure(log_dir, ["csv"]))
    model.learn(total_timesteps=full_run, callback=_StopWhenKept(), progress_bar=False, log_interval=1)
    model.logger.close()  # one row per episode in progress.csv, flushed
    env.close()
    return env.episodes[:n_episodes]


def render_episode(settings: ObsSettings, record: dict[str, Any]) -> tuple[np.ndarray, int]:
    """Point clouds (T, N, C) of a recorded episode, rendered from its stored states,
    and how many of them were padded."""
    frames, padded = render_frames(settings, record)
    return frames["point_cloud"], padded


def render_frames(settings: ObsSettings, record: dict[str, Any]) -> tuple[dict[str, np.ndarray], int]:
    """``render_episode``'s clouds as {'point_cloud': (T, N, C)}, with 'image' (T, H, W, 3|4)
    from the same renders when the settings ask for images; nothing when they ask for no
    camera (``point_cloud: false``)."""
    if not settings.point_cloud:
        return {}, 0
    env = env_for(settings)  # PointCloudObservation over the suite env
    base = env.unwrapped
    padded_before = env.padded
    frames = []
    for physics in record["physics"]:
        base.restore(record["model"], physics)
        frames.append(env.rendered())
    return {k: np.stack([f[k] for f in frames]) for k in frames[0]}, env.padded - padded_before


def _train_job(args: tuple) -> tuple[str, list[dict[str, Any]]]:
    settings, options, seed, n_episodes, log_dir = args
    return settings.task, train_and_record(settings, options, seed, n_episodes, log_dir)


def sac_log_dir(out: str | Path, task: str) -> Path:
    """Where SAC's training log of ``task`` goes for the store ``out``: beside it,
    ``<store>-sac/<task>/`` (as ``sodp3d viz`` writes ``<store>-viz/``)."""
    out = Path(out)
    return out.with_name(f"{out.stem}-sac") / task


def _render_job(args: tuple) -> dict[str, Any]:
    settings, index, record = args
    rendered, padded = render_frames(settings, record)
    episode = {
        **rendered,
        "agent_pos": record["agent_pos"].astype(np.float32),
        "state": record["state"].astype(np.float32),
        "action": record["action"],
        "reward": record["reward"].astype(np.float32),
        "success": record["success"].astype(bool),
    }
    meta = {
        "success": bool(record["success"].any()),
        "return": float(record["reward"].sum()),
        "source": "sac",
        "kind": "sac",
        "noise_std": float("nan"),
        "padded": padded,
    }
    return {"task": settings.task, "index": index, "episode": episode, "meta": meta}


def check_sac(tasks: list[str], cfg: DictConfig) -> None:
    """SAC learns any task; its options are read when its jobs run."""


def run_sac_jobs(
    todo: list[tuple[str, int]], settings: dict[str, ObsSettings], cfg: DictConfig, seed: int, workers: int
) -> Iterator[dict[str, Any]]:
    """Yield rendered episodes for ``todo`` ((task, episode index) pairs), task by task."""
    options = _sac_options(cfg.get("sac"))
    wanted: OrderedDict[str, list[int]] = OrderedDict()
    for task, index in todo:
        wanted.setdefault(task, []).append(index)
    if not wanted:
        return
    out = cfg.get("out")
    train = [(settings[t], options, seed, max(idx) + 1, str(sac_log_dir(out, t)) if out else None)
             for t, idx in wanted.items()]
    ctx = mp.get_context(worker_start_method())
    n_proc = max(1, min(workers, len(train)))
    records: dict[str, list[dict[str, Any]]] = {}
    if n_proc == 1:
        records = dict(_train_job(job) for job in train)
    else:
        with ctx.Pool(n_proc, initializer=init_worker) as pool:
            records = dict(pool.imap(_train_job, train, chunksize=1))
    jobs = [(settings[t], i, records[t][i]) for t, idx in wanted.items() for i in idx]
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield _render_job(job)
        return
    with ctx.Pool(min(workers, len(jobs)), initializer=init_worker) as pool:
        yield from pool.imap(_render_job, jobs, chunksize=1)
