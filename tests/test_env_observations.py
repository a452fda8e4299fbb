"""What the environments observe (point_cloud, agent_pos, state) and its reproducibility per seed."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from env_kit import closing, row_index

from sodp3d.envs import make_env, task_settings
from sodp3d.envs.pointcloud import crop, sample
from sodp3d.envs.wrappers import PointCloudObservation, find_wrapper


# ---------------------------------------------------------------------------------------
# 5. observations
# ---------------------------------------------------------------------------------------
def test_metaworld_observations(reach):
    obs, _ = reach.reset(seed=0)
    assert obs["point_cloud"].shape == (512, 3) and obs["point_cloud"].dtype == np.float32
    assert obs["agent_pos"].shape == (9,) and obs["agent_pos"].dtype == np.float32
    assert obs["state"].shape == (39,) and obs["state"].dtype == np.float32
    assert reach.action_space.shape == (4,)
    for space_key, value in obs.items():
        assert reach.observation_space[space_key].shape == value.shape
    data = reach.unwrapped.data
    for _ in range(2):
        expected = np.concatenate(
            [data.body("hand").xpos, data.site("leftEndEffector").xpos, data.site("rightEndEffector").xpos]
        )
        np.testing.assert_allclose(obs["agent_pos"], expected, atol=1e-6)
        # Meta-World's own state starts with the hand position too.
        np.testing.assert_allclose(obs["state"][:3], data.body("hand").xpos, atol=1e-6)
        obs, *_ = reach.step(np.array([1.0, 0.5, -0.5, 0.0], np.float32))


def test_rgb_cloud_has_colours_in_unit_range():
    settings = dataclasses.replace(task_settings("reach-v3"), rgb=True, height=64, width=64)
    with closing(make_env("reach-v3", settings=settings)) as env:
        obs, _ = env.reset(seed=0)
        cloud = obs["point_cloud"]
        assert cloud.shape == (512, 6) and cloud.dtype == np.float32
        assert env.observation_space["point_cloud"].shape == (512, 6)
        rgb = cloud[:, 3:]
        assert rgb.min() >= 0.0 and rgb.max() <= 1.0
        assert rgb.std(axis=0).max() > 0.02  # real colours, not a constant
        # Same geometry as the depth-only path.
        cam = find_wrapper(env, PointCloudObservation).cameras[0]
        data = env.unwrapped.data
        xyz = cam.back_project(cam.depth(data), data)
        colour_cloud = cam.cloud(data)
        np.testing.assert_array_equal(colour_cloud[:, :3], xyz)
        # Colours are the rendered image's pixels (row-major over the valid pixels).
        depth = cam.depth(data)
        image = cam.color(data).reshape(-1, 3)[(depth < cam.depth_trunc).reshape(-1)]
        np.testing.assert_allclose(colour_cloud[:, 3:], image / 255.0, atol=1e-6)


@pytest.mark.parametrize("task,dim", [("adroit-door", 28), ("adroit-hammer", 26), ("adroit-pen", 24)])
def test_adroit_observations(task, dim):
    with closing(make_env(task)) as env:
        obs, _ = env.reset(seed=0)
        assert env.action_space.shape == (dim,)
        assert obs["agent_pos"].shape == (dim,) and obs["agent_pos"].dtype == np.float32
        assert obs["point_cloud"].shape == (512, 3) and obs["point_cloud"].dtype == np.float32
        assert obs["point_cloud"][:, 2].min() >= 0.01  # above the table top
        assert obs["state"].shape == env.observation_space["state"].shape
        model, data = env.unwrapped.model, env.unwrapped.data
        obs, *_ = env.step(env.action_space.sample() * 0.5)
        # agent_pos: the joints that the actuators drive, in actuator order.
        joints = [model.joint(model.actuator_trnid[i, 0]).name for i in range(model.nu)]
        expected = np.array([data.joint(j).qpos[0] for j in joints])
        np.testing.assert_allclose(obs["agent_pos"], expected, atol=1e-6)


# ---------------------------------------------------------------------------------------
# 6. reproducibility
# ---------------------------------------------------------------------------------------
def _rollout(env, seed, actions):
    obs, _ = env.reset(seed=seed)
    out = [obs]
    for a in actions:
        out.append(env.step(a)[0])
    return out


def test_same_seed_same_episode_different_seed_different_goal(reach):
    actions = np.random.default_rng(0).uniform(-1, 1, size=(3, 4)).astype(np.float32)
    first = _rollout(reach, 7, actions)
    second = _rollout(reach, 7, actions)
    with closing(make_env("reach-v3")) as fresh:
        third = _rollout(fresh, 7, actions)
    for run in (second, third):
        for a, b in zip(first, run):
            np.testing.assert_array_equal(a["point_cloud"], b["point_cloud"])
            np.testing.assert_array_equal(a["state"], b["state"])
            np.testing.assert_array_equal(a["agent_pos"], b["agent_pos"])
    # The arm moved, so the clouds change along the episode.
    assert not np.array_equal(first[0]["point_cloud"], first[-1]["point_cloud"])
    other, _ = reach.reset(seed=8)
    assert np.linalg.norm(other["state"][-3:] - first[0]["state"][-3:]) > 1e-3


def test_uniform_sampling_is_reproducible_per_seed():
    settings = dataclasses.replace(task_settings("reach-v3"), sampling="uniform")
    with closing(make_env("reach-v3", settings=settings)) as env:
        pc = find_wrapper(env, PointCloudObservation)
        a = env.reset(seed=3)[0]["point_cloud"]
        b = env.reset(seed=3)[0]["point_cloud"]
        assert pc.padded == 0
        np.testing.assert_array_equal(a, b)
        assert settings.crop.mask(a).all()
        assert len(np.unique(a, axis=0)) == 512
        # The subset is drawn with the seeded generator: it is not the FPS subset.
        full = crop(pc.cameras[0].cloud(env.unwrapped.data), settings.crop)
        assert not np.array_equal(a, sample(full, 512, "fps")[0])
        index = row_index(full)
        idx = np.array([index[row.tobytes()] for row in a])
        assert np.all(np.diff(idx) > 0)  # a subset, in the camera's order
