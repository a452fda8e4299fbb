"""Environments: MuJoCo scenes rendered to world-frame point clouds, and data collection.

    from sodp3d.envs import make_env, make_vector_env, resolve_tasks
    env = make_env("reach-v3")                     # dict obs: point_cloud, agent_pos, state
    env = make_env("adroit-door", n_obs_steps=2, n_action_steps=3)   # action chunks
"""

from .factory import ensure_headless_gl, make_env, make_vector_env
from .settings import ObsSettings, default_env_config, task_settings
from .tasks import ADROIT_TASKS, all_tasks, metaworld_tasks, resolve_tasks, suite_of, task_sets

__all__ = [
    "ADROIT_TASKS",
    "ObsSettings",
    "all_tasks",
    "default_env_config",
    "ensure_headless_gl",
    "make_env",
    "make_vector_env",
    "metaworld_tasks",
    "resolve_tasks",
    "suite_of",
    "task_sets",
    "task_settings",
]
