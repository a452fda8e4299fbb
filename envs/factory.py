"""Building environments: one task, or many in parallel processes."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Sequence
from functools import partial

import gymnasium as gym
from omegaconf import DictConfig

from .settings import ObsSettings, task_settings
from .suites import make_suite_env
from .wrappers import ActionChunking, PointCloudObservation


def ensure_headless_gl() -> None:
    """MuJoCo renders offscreen through EGL unless the user chose another backend."""
    os.environ.setdefault("MUJOCO_GL", "egl")


# What every environment worker imports. A fork server imports them once; each worker is
# then forked from it with them loaded (8 workers on 2 cores start in 3.1 s instead of
# the 9.3 s that 8 fresh interpreters take). None of them opens a GL context or an EGL display (MuJoCo opens
# its display when the first renderer is made, in the worker), so no GL state crosses a
# fork. Modules that are not installed are skipped.
WORKER_PRELOAD = ("sodp3d.envs.factory", "sodp3d.envs.workers", "metaworld")


def worker_start_method() -> str:
    """How every environment worker process starts: "forkserver", with the environment
    modules preloaded, where the platform has one (Linux, macOS), else "spawn". Neither
    shares GL state with this process. The fork server starts with the first workers and
    keeps the environment variables of that moment (MUJOCO_GL among them) for all later
    workers of this process."""
    ensure_headless_gl()  # before the fork server starts: it and its workers inherit it
    if "forkserver" not in mp.get_all_start_methods():
        return "spawn"
    mp.get_context("forkserver").set_forkserver_preload(list(WORKER_PRELOAD))
    return "forkserver"


def make_env(
    task: str,
    env_cfg: DictConfig | dict | None = None,
    *,
    point_cloud: bool | None = None,
    n_obs_steps: int | None = None,
    n_action_steps: int | None = None,
    settings: ObsSettings | None = None,
) -> gym.Env:
    """One task: suite env -> point cloud -> action chunks (when To, Ta given). The cloud
    (a camera and its renderer) is made unless ``point_cloud=False`` or the settings say
    ``point_cloud: false``: then the observation is the state and agent_pos only."""
    ensure_headless_gl()
    settings = settings or task_settings(task, env_cfg)
    env: gym.Env = make_suite_env(task, settings.episode_length)
    if point_cloud is not False and settings.point_cloud:
        env = PointCloudObservation(env, settings)
    if n_obs_steps is not None or n_action_steps is not None:
        env = ActionChunking(env, n_obs_steps or 1, n_action_steps or 1)
    return env


def make_vector_env(
    tasks: str | Sequence[str],
    num_envs: int,
    env_cfg: DictConfig | dict | None = None,
    *,
    mode: str = "async",
    workers: int | None = None,
    autoreset_mode: gym.vector.AutoresetMode = gym.vector.AutoresetMode.NEXT_STEP,
    **kwargs,
) -> gym.vector.VectorEnv:
    """``num_envs`` copies (cycled over ``tasks``) in the layout ``mode`` says
    (sodp3d.envs.vector: sync, async, workers with ``workers`` processes, or auto).

    Seeding: ``vec.reset(seed=s)`` seeds env i with s + i (or ``seed=[...]`` one each),
    so a run is reproducible, and the same in every layout. Worker processes start as
    ``worker_start_method()`` says (a fork server with the environment modules loaded), so
    no GL context crosses a fork. Autoreset is gymnasium's default (NEXT_STEP): the step
    that ends an episode returns that episode's last observation and info.
    ``point_cloud=False`` (in ``kwargs``) builds environments without a renderer.
    """
    from .vector import WorkersVectorEnv, resolve_mode

    ensure_headless_gl()
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    settings = {t: task_settings(t, env_cfg) for t in dict.fromkeys(tasks)}  # a bad name fails here, once
    renders = kwargs.get("point_cloud") is not False and any(s.point_cloud for s in settings.values())
    mode, n_workers = resolve_mode(mode, num_envs, workers, renders)
    fns: list[Callable[[], gym.Env]] = [
        partial(make_env, tasks[i % len(tasks)], env_cfg, **kwargs) for i in range(num_envs)
    ]
    if mode == "async":
        return gym.vector.AsyncVectorEnv(fns, context=worker_start_method(), autoreset_mode=autoreset_mode)
    if mode == "workers":
        if autoreset_mode != gym.vector.AutoresetMode.NEXT_STEP:
            raise ValueError("vector_env=workers autoresets as NEXT_STEP only")
        return WorkersVectorEnv(fns, n_workers, context=worker_start_method())
    return gym.vector.SyncVectorEnv(fns, autoreset_mode=autoreset_mode)
