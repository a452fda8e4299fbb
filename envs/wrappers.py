"""Gymnasium wrappers, one transform each.

Shapes: N points, C channels (3, or 6 with RGB), To observed steps, Ta executed steps,
Da action dim.

* ``PointCloudObservation``: adds ``point_cloud`` (N, C) float32 in world coordinates
  (render depth on the configured cameras -> back-project -> fuse -> crop -> sample),
  and, when the settings ask for it (``image: rgb | rgbd``), ``image`` (H, W, 3|4) uint8:
  the same render's colour (and depth), so image and cloud show the same state.
* ``ActionChunking``: one step executes a chunk of Ta actions and returns the last To
  observations stacked. Only the steps whose observation is returned are rendered:
  with To = 2 and Ta = 8, two renders per eight simulator steps.
"""

from __future__ import annotations

import contextlib
from collections import deque

import gymnasium as gym
import numpy as np

from sodp3d.errors import UserError

from .camera import DepthCamera, fused_observation
from .pointcloud import crop, sample
from .settings import ObsSettings


class PointCloudObservation(gym.ObservationWrapper):
    """World-frame point cloud from one or more depth cameras.

    Counts ``observations`` and ``padded`` (observations where fewer than N points
    survived the crop and the survivors were repeated to fill N).
    """

    def __init__(self, env: gym.Env, settings: ObsSettings):
        super().__init__(env)
        base = env.unwrapped
        self.settings = settings
        self.cameras = [
            DepthCamera(base.model, name, settings.height, settings.width, rgb=settings.rgb, image=settings.image)
            for name in settings.cameras
        ]
        self._data = base.data
        self._rng = np.random.default_rng(0)
        self._suppressed = False
        self.observations = 0
        self.padded = 0
        spaces = dict(env.observation_space.spaces)
        spaces["point_cloud"] = gym.spaces.Box(-np.inf, np.inf, (settings.num_points, settings.channels), np.float32)
        self._blank = {"point_cloud": np.zeros((settings.num_points, settings.channels), np.float32)}
        if settings.image is not None:
            spaces["image"] = gym.spaces.Box(0, 255, settings.image_shape, np.uint8)
            self._blank["image"] = np.zeros(settings.image_shape, np.uint8)
        self.observation_space = gym.spaces.Dict(spaces)
        for blank in self._blank.values():
            blank.flags.writeable = False  # shared by every suppressed observation

    def reset(self, *, seed=None, options=None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        return super().reset(seed=seed, options=options)

    def point_cloud(self) -> np.ndarray:
        """Render the current state: (N, C) float32."""
        return self.rendered()["point_cloud"]

    def rendered(self) -> dict[str, np.ndarray]:
        """Render the current state once: {'point_cloud': (N, C) float32} and, with images,
        'image': (H, W, 3|4) uint8 of the same render."""
        s = self.settings
        cloud, image = fused_observation(self.cameras, self._data)
        points = crop(cloud, s.crop)
        if points.shape[0] == 0:
            raise UserError(
                f"the crop box {s.crop.as_list() if s.crop else None} leaves no points for task {s.task} "
                f"(cameras {', '.join(s.cameras)}); widen env.{s.suite}.crop or env.{s.suite}.tasks.{s.task}.crop"
            )
        points, padded = sample(points, s.num_points, s.sampling, self._rng)
        self.observations += 1
        self.padded += int(padded)
        out = {"point_cloud": np.ascontiguousarray(points, dtype=np.float32)}
        if image is not None:
            out["image"] = image
        return out

    def observation(self, observation):
        obs = dict(observation)
        obs.update(self._blank if self._suppressed else self.rendered())
        return obs

    @contextlib.contextmanager
    def rendering_suppressed(self):
        """Within this block observations carry a zero cloud (and image) and cost no render."""
        previous, self._suppressed = self._suppressed, True
        try:
            yield
        finally:
            self._suppressed = previous

    def close(self):
        for cam in self.cameras:
            cam.close()
        super().close()


def find_wrapper(env: gym.Env, cls: type) -> gym.Wrapper | None:
    while isinstance(env, gym.Wrapper):
        if isinstance(env, cls):
            return env
        env = env.env
    return None


class ActionChunking(gym.Wrapper):
    """Execute Ta actions per step; observe the last To observations.

    Reward is the sum over the executed steps (discount 1); ``info['success']`` is true
    if any executed step succeeded; ``info['executed']`` counts executed steps (fewer
    than Ta when the episode ends inside the chunk). At reset the first observation is
    repeated To times. If the episode terminates inside the chunk on a step that was not
    rendered, the final observation is rendered and repeated to fill the window.
    """

    def __init__(self, env: gym.Env, n_obs_steps: int, n_action_steps: int):
        super().__init__(env)
        if n_obs_steps < 1 or n_action_steps < 1:
            raise UserError(f"To and Ta must be >= 1, got To={n_obs_steps}, Ta={n_action_steps}")
        self.n_obs_steps, self.n_action_steps = int(n_obs_steps), int(n_action_steps)
        self._pc = find_wrapper(env, PointCloudObservation)
        self._history: deque = deque(maxlen=self.n_obs_steps)
        To, Ta = self.n_obs_steps, self.n_action_steps
        self.observation_space = gym.spaces.Dict(
            {
                k: gym.spaces.Box(
                    np.broadcast_to(s.low, (To,) + s.shape).copy(),
                    np.broadcast_to(s.high, (To,) + s.shape).copy(),
                    dtype=s.dtype,
                )
                for k, s in env.observation_space.spaces.items()
            }
        )
        a = env.action_space
        self.action_space = gym.spaces.Box(
            np.broadcast_to(a.low, (Ta,) + a.shape).copy(), np.broadcast_to(a.high, (Ta,) + a.shape).copy(), dtype=a.dtype
        )

    def _stacked(self) -> dict[str, np.ndarray]:
        keys = self._history[0].keys()
        return {k: np.stack([o[k] for o in self._history]) for k in keys}

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)
        self._history.clear()
        for _ in range(self.n_obs_steps):
            self._history.append(obs)
        return self._stacked(), info

    def step(self, actions):
        actions = np.asarray(actions, dtype=np.float32)
        if actions.shape != self.action_space.shape:
            raise UserError(f"an action chunk must have shape {self.action_space.shape}, got {actions.shape}")
        base = self.env.unwrapped
        remaining = getattr(base, "episode_length", None)
        remaining = None if remaining is None else remaining - getattr(base, "elapsed_steps", 0)
        n = self.n_action_steps if remaining is None else max(1, min(self.n_action_steps, remaining))
        To = self.n_obs_steps
        previous = list(self._history)  # the window before this chunk: steps -To .. -1
        seen: list = []  # per executed step: its observation, or None if not rendered
        total, success = 0.0, False
        terminated = truncated = False
        info: dict = {}
        for i in range(n):
            # Only the last To steps before the chunk (or the episode) ends are rendered.
            observed = self._pc is None or i >= n - To
            ctx = contextlib.nullcontext() if observed else self._pc.rendering_suppressed()
            with ctx:
                obs, reward, terminated, truncated, info = self.env.step(actions[i])
            total += float(reward)
            success |= bool(info.get("success", False))
            seen.append(obs if observed else None)
            if terminated or truncated:
                break
        last = len(seen) - 1
        if seen[last] is None:  # the episode ended on a step that was not rendered
            final = dict(obs)
            final.update(self._pc.rendered())
            seen[last] = final
        # The window is the To steps ending at the last executed one; a step inside it
        # that was not rendered (only possible after an early termination) takes the
        # final observation.
        window = [previous[To + j] if j < 0 else (seen[j] if seen[j] is not None else seen[last])
                  for j in range(last - To + 1, last + 1)]
        self._history = deque(window, maxlen=To)
        executed = last + 1
        info = dict(info)
        info["success"] = success
        info["executed"] = executed
        return self._stacked(), total, terminated, truncated, info
