"""Meta-World and Adroit tasks behind one small interface.

Each task is a gymnasium env with dict observations

  * ``agent_pos``: Meta-World: end-effector (hand body) xyz, then left and right
    fingertip xyz (9); Adroit: positions of the actuated arm and hand joints, the same
    size as the action (door 28, hammer 26, pen 24);
  * ``state``: the env's own low-dimensional observation (Meta-World 39, goal visible);

plus ``model`` / ``data`` for the cameras, ``info['success']`` as a bool, and
``snapshot()`` / ``restore()`` so that a stored state can be re-rendered later
(the SAC collector trains on states and renders clouds afterwards).

Meta-World goals are drawn anew on every reset (MT50-rand); ``reset(seed=s)`` makes the
draw reproducible, a reset without a seed continues the env's own random stream.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import mujoco
import numpy as np

from sodp3d.errors import UserError

from .tasks import ADROIT_TASKS, metaworld_tasks

_PHYSICS = mujoco.mjtState.mjSTATE_FULLPHYSICS
# Model fields that resets move (goal sites, doors, drawers, boards, pen targets).
_MODEL_FIELDS = ("body_pos", "body_quat", "site_pos", "site_quat")


class SuiteEnv(gym.Env):
    """Common part: dict observations, snapshots, success as a bool."""

    metadata: dict[str, Any] = {"render_modes": []}
    suite: str = ""
    model: mujoco.MjModel
    data: mujoco.MjData

    def __init__(self, task: str, episode_length: int):
        if episode_length <= 0:
            raise UserError(f"episode_length must be positive, got {episode_length}")
        self.task = task
        self.episode_length = int(episode_length)
        self._elapsed = 0
        self._last_state: np.ndarray | None = None

    # -- what every suite provides -----------------------------------------------------
    def agent_pos(self) -> np.ndarray:
        raise NotImplementedError

    def _obs(self, state: np.ndarray) -> dict[str, np.ndarray]:
        return {"agent_pos": self.agent_pos().astype(np.float32), "state": np.asarray(state, dtype=np.float32)}

    def _spaces(self, state_dim: int, action_space: gym.spaces.Box) -> None:
        pos_dim = self.agent_pos().shape[0]
        self.observation_space = gym.spaces.Dict(
            {
                "agent_pos": gym.spaces.Box(-np.inf, np.inf, (pos_dim,), np.float32),
                "state": gym.spaces.Box(-np.inf, np.inf, (state_dim,), np.float32),
            }
        )
        self.action_space = gym.spaces.Box(
            action_space.low.astype(np.float32), action_space.high.astype(np.float32), dtype=np.float32
        )

    @property
    def elapsed_steps(self) -> int:
        return self._elapsed

    # -- stepping (the suite's own env is ``self._env``) ----------------------------------
    def step(self, action):
        action = np.clip(np.asarray(action, dtype=np.float64), self.action_space.low, self.action_space.high)
        state, reward, terminated, truncated, info = self._env.step(action)
        self._elapsed += 1
        self._last_state = state
        info = dict(info)
        info["success"] = bool(info.get("success", False))
        truncated = bool(truncated) or self._elapsed >= self.episode_length
        return self._obs(state), float(reward), bool(terminated), truncated, info

    def close(self):
        self._env.close()

    # -- snapshots -------------------------------------------------------------------
    def model_snapshot(self) -> dict[str, np.ndarray]:
        """The model fields a reset may change; constant within an episode."""
        return {f: getattr(self.model, f).copy() for f in _MODEL_FIELDS}

    def physics_snapshot(self) -> np.ndarray:
        """The full physics state (time, qpos, qvel, act, mocap, ...), 1-D float64."""
        state = np.empty(mujoco.mj_stateSize(self.model, _PHYSICS))
        mujoco.mj_getState(self.model, self.data, state, _PHYSICS)
        return state

    def restore(self, model_snapshot: dict[str, np.ndarray], physics: np.ndarray) -> None:
        """Put the scene back into a stored state (for rendering it again)."""
        for f, value in model_snapshot.items():
            getattr(self.model, f)[:] = value
        mujoco.mj_setState(self.model, self.data, np.asarray(physics, dtype=np.float64), _PHYSICS)
        mujoco.mj_forward(self.model, self.data)



class MetaWorldEnv(SuiteEnv):
    suite = "metaworld"

    def __init__(self, task: str, episode_length: int = 500):
        if task not in metaworld_tasks():
            raise UserError(f"'{task}' is not a Meta-World task; valid: {', '.join(metaworld_tasks())}")
        super().__init__(task, episode_length)
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS

        env = ALL_V3_ENVIRONMENTS[task]()
        # Goal visible in the state, a fresh seeded goal on every reset (MT50-rand).
        env._partially_observable = False
        env.__dict__.pop("sawyer_observation_space", None)  # cached for the hidden-goal variant
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        env._set_task_called = True
        env.max_path_length = self.episode_length
        self._env = env
        self.model, self.data = env.model, env.data
        self._spaces(39, env.action_space)

    @property
    def raw(self):
        """The Meta-World env itself (scripted policies read its state)."""
        return self._env

    def agent_pos(self) -> np.ndarray:
        d = self.data
        return np.concatenate(
            [d.body("hand").xpos, d.site("leftEndEffector").xpos, d.site("rightEndEffector").xpos]
        )

    def end_effector(self) -> np.ndarray:
        """(3,) world xyz of the hand."""
        return self.data.body("hand").xpos.copy()

    def predicted_path(self, actions: np.ndarray) -> np.ndarray | None:
        """(T+1, 3): where the hand goes under ``actions`` (T, 4) from now, ignoring contacts.

        Meta-World moves the mocap target by action[:3] * action_scale per step, inside
        the mocap box; the hand follows it."""
        raw = self._env
        pos = [self.end_effector()]
        for a in np.asarray(actions, dtype=np.float64):
            pos.append(np.clip(pos[-1] + np.clip(a[:3], -1, 1) * raw.action_scale, raw.mocap_low, raw.mocap_high))
        return np.stack(pos)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._env.seed(int(seed))
        state, info = self._env.reset()
        self._elapsed = 0
        self._last_state = state
        return self._obs(state), dict(info)



class AdroitEnv(SuiteEnv):
    suite = "adroit"

    def __init__(self, task: str, episode_length: int = 200):
        if task not in ADROIT_TASKS:
            raise UserError(f"'{task}' is not an Adroit task; valid: {', '.join(ADROIT_TASKS)}")
        super().__init__(task, episode_length)
        import contextlib
        import io

        # Its import prints a note on reward versions to stderr on every run; the
        # version in use is recorded in each dataset's attributes instead.
        with contextlib.redirect_stderr(io.StringIO()):
            import gymnasium_robotics

        gym.register_envs(gymnasium_robotics)
        gym_id, action_dim = ADROIT_TASKS[task]
        self._env = gym.make(gym_id).unwrapped  # our own time limit; no checker wrappers
        self.model, self.data = self._env.model, self._env.data
        m = self.model
        self._qpos_index = np.array([m.jnt_qposadr[m.actuator_trnid[i, 0]] for i in range(m.nu)])
        assert m.nu == action_dim, f"{gym_id} has {m.nu} actuators, expected {action_dim}"
        self._spaces(self._env.observation_space.shape[0], self._env.action_space)

    @property
    def raw(self):
        return self._env

    def agent_pos(self) -> np.ndarray:
        return self.data.qpos[self._qpos_index].copy()

    def end_effector(self) -> np.ndarray:
        """(3,) world xyz of the palm."""
        return self.data.body("palm").xpos.copy()

    def predicted_path(self, actions: np.ndarray) -> None:
        """Adroit actions are joint targets: no cheap end-effector prediction."""
        return None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        state, info = self._env.reset(seed=None if seed is None else int(seed))
        self._elapsed = 0
        self._last_state = state
        return self._obs(state), dict(info)



def make_suite_env(task: str, episode_length: int | None = None) -> SuiteEnv:
    from .tasks import suite_of

    suite = suite_of(task)
    cls = MetaWorldEnv if suite == "metaworld" else AdroitEnv
    return cls(task) if episode_length is None else cls(task, episode_length)
