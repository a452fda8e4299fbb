"""Action chunks (sodp3d.envs.wrappers.ActionChunking), alone and in the vector env."""

from __future__ import annotations

import dataclasses

import gymnasium as gym
import numpy as np
import pytest
from env_kit import closing

from sodp3d.envs import make_env, make_vector_env, task_settings
from sodp3d.envs.suites import make_suite_env
from sodp3d.envs.wrappers import ActionChunking, PointCloudObservation, find_wrapper
from sodp3d.errors import UserError


# ---------------------------------------------------------------------------------------
# 7. action chunks
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chunked():
    env = make_env("reach-v3", n_obs_steps=2, n_action_steps=8)
    yield env
    env.close()


def test_action_chunking_shapes_steps_and_renders(chunked):
    env = chunked
    assert isinstance(env, ActionChunking)
    assert env.action_space.shape == (8, 4)
    obs, _ = env.reset(seed=5)
    assert obs["point_cloud"].shape == (2, 512, 3)
    assert obs["agent_pos"].shape == (2, 9) and obs["state"].shape == (2, 39)
    np.testing.assert_array_equal(obs["point_cloud"][0], obs["point_cloud"][1])  # reset repeats
    for key, value in obs.items():
        assert env.observation_space[key].shape == value.shape
    pc = find_wrapper(env, PointCloudObservation)
    assert pc is not None

    actions = np.random.default_rng(5).uniform(-1, 1, size=(16, 4)).astype(np.float32)
    rewards = []
    for k in range(2):
        before = pc.observations
        obs, reward, terminated, truncated, info = env.step(actions[8 * k : 8 * (k + 1)])
        assert pc.observations - before == 2
        assert env.unwrapped.elapsed_steps == 8 * (k + 1)
        assert info["executed"] == 8 and not terminated and not truncated
        rewards.append(reward)
        assert not np.array_equal(obs["point_cloud"][0], obs["point_cloud"][1])
    final_cloud = pc.point_cloud()  # the current state rendered again
    np.testing.assert_array_equal(obs["point_cloud"][-1], final_cloud)

    # The same actions one at a time in a fresh env with the same seed.
    with closing(make_env("reach-v3", point_cloud=False)) as single:
        single.reset(seed=5)
        states, single_rewards = [], []
        for a in actions:
            o, r, *_ = single.step(a)
            states.append(o["state"])
            single_rewards.append(r)
    assert rewards[0] == pytest.approx(sum(single_rewards[:8]), rel=1e-9, abs=1e-9)
    assert rewards[1] == pytest.approx(sum(single_rewards[8:]), rel=1e-9, abs=1e-9)
    # The observed window is the last two steps of the chunk, in order.
    np.testing.assert_array_equal(obs["state"], np.stack(states[-2:]))

    with pytest.raises(UserError, match=r"\(8, 4\)"):
        env.step(np.zeros((4,), np.float32))
    with pytest.raises(UserError):
        env.step(np.zeros((7, 4), np.float32))


def test_action_chunking_truncates_inside_a_chunk():
    settings = dataclasses.replace(task_settings("reach-v3"), episode_length=20, height=64, width=64)
    with closing(make_env("reach-v3", settings=settings, n_obs_steps=2, n_action_steps=8)) as env:
        pc = find_wrapper(env, PointCloudObservation)
        env.reset(seed=1)
        results = []
        for _ in range(3):
            before = pc.observations
            _, _, terminated, truncated, info = env.step(np.zeros((8, 4), np.float32))
            results.append((info["executed"], terminated, truncated, pc.observations - before))
        assert results == [(8, False, False, 2), (8, False, False, 2), (4, False, True, 2)]
        assert env.unwrapped.elapsed_steps == 20


# ---------------------------------------------------------------------------------------
# 9. vector env
# ---------------------------------------------------------------------------------------
def test_async_vector_env():
    env = make_vector_env("reach-v3", 2, mode="async", n_obs_steps=2, n_action_steps=8)
    try:
        assert env.num_envs == 2
        obs, _ = env.reset(seed=11)
        assert obs["point_cloud"].shape == (2, 2, 512, 3)
        assert obs["state"].shape == (2, 2, 39)
        goals = obs["state"][:, -1, -3:]
        assert np.linalg.norm(goals[0] - goals[1]) > 1e-3
        actions = np.zeros((2, 8, 4), np.float32)
        obs, reward, terminated, truncated, info = env.step(actions)
        assert obs["point_cloud"].shape == (2, 2, 512, 3) and obs["agent_pos"].shape == (2, 2, 9)
        assert reward.shape == (2,) and not terminated.any() and not truncated.any()
        np.testing.assert_array_equal(info["executed"], [8, 8])
        np.testing.assert_array_equal(obs["state"][:, -1, -3:], goals)  # same episode, same goals
    finally:
        env.close()


class _TerminateAt(gym.Wrapper):
    """Ends the episode (terminated) after a fixed number of steps."""

    def __init__(self, env, at):
        super().__init__(env)
        self.at, self.t = at, 0

    def reset(self, **kw):
        self.t = 0
        return self.env.reset(**kw)

    def step(self, action):
        obs, r, term, trunc, info = self.env.step(action)
        self.t += 1
        return obs, r, term or self.t == self.at, trunc, info


@pytest.mark.parametrize("at, executed", [(15, 7), (11, 3)])
def test_action_chunking_window_after_early_termination(at, executed):
    """Step 15 is the first rendered step of the second chunk, step 11 an unrendered one:
    either way the window holds only observations of the episode's end, never a stale
    observation from the previous chunk, and the cloud is rendered."""
    settings = dataclasses.replace(task_settings("reach-v3"), height=48, width=48, num_points=64)
    env = ActionChunking(
        PointCloudObservation(_TerminateAt(make_suite_env("reach-v3", 50), at), settings), 2, 8
    )
    env.reset(seed=0)
    actions = np.full((8, 4), 0.3, np.float32)
    obs, _, term, trunc, info = env.step(actions)
    assert not (term or trunc) and info["executed"] == 8
    obs, _, term, trunc, info = env.step(actions)
    assert term and info["executed"] == executed
    for key in ("point_cloud", "agent_pos", "state"):
        np.testing.assert_array_equal(obs[key][0], obs[key][1])
    assert np.abs(obs["point_cloud"][1]).sum() > 0
    np.testing.assert_allclose(obs["agent_pos"][1], env.unwrapped.agent_pos(), atol=1e-6)
