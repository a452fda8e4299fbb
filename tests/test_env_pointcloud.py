"""Cropping and sampling of the point clouds (sodp3d.envs.pointcloud), alone and in the env."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from env_kit import closing, depth_cameras, row_index

from sodp3d.envs import make_env, task_settings
from sodp3d.envs.camera import fused_cloud
from sodp3d.envs.pointcloud import CropBox, crop, sample
from sodp3d.envs.wrappers import PointCloudObservation, find_wrapper


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def naive_fps(xyz, n, start):
    idx = [start]
    dist = np.linalg.norm(xyz - xyz[start], axis=1)
    for _ in range(n - 1):
        i = int(np.argmax(dist))
        idx.append(i)
        dist = np.minimum(dist, np.linalg.norm(xyz - xyz[i], axis=1))
    return np.array(idx)



# ---------------------------------------------------------------------------------------
# 4. crop and sample
# ---------------------------------------------------------------------------------------
def test_crop_keeps_exactly_the_points_in_the_box():
    rng = np.random.default_rng(0)
    points = rng.uniform(-1, 1, size=(5000, 6)).astype(np.float32)
    points[:3, :3] = [[0.5, 0.0, 0.0], [-0.25, 0.5, 0.1], [0.5001, 0.0, 0.0]]  # on the boundary, just outside
    box = CropBox((-0.25, -0.5, -0.2), (0.5, 0.5, 0.9))
    brute = np.array(
        [all(lo <= x <= hi for x, lo, hi in zip(p[:3], box.low, box.high)) for p in points.astype(np.float64)]
    )
    out = crop(points, box)
    np.testing.assert_array_equal(out, points[brute])
    assert brute[0] and brute[1] and not brute[2]
    assert out.shape[1] == 6  # colours travel with their points
    assert crop(points, None) is points
    # Open sides (Adroit: a floor only).
    floor = CropBox((-np.inf, -np.inf, 0.0), (np.inf, np.inf, np.inf))
    np.testing.assert_array_equal(crop(points, floor), points[points[:, 2] >= 0])
    with pytest.raises(ValueError):
        CropBox((0, 0, 1), (1, 1, 1))
    with pytest.raises(ValueError):
        CropBox((0, 0), (1, 1))


def test_fps_sampling_is_an_exact_deterministic_subset():
    rng = np.random.default_rng(1)
    points = rng.random((3000, 6)).astype(np.float32)
    out, padded = sample(points, 512, "fps")
    assert out.shape == (512, 6) and not padded
    index = row_index(points)
    idx = np.array([index[row.tobytes()] for row in out])  # KeyError: not a subset
    assert len(np.unique(idx)) == 512
    again, _ = sample(points.copy(), 512, "fps")
    np.testing.assert_array_equal(again, out)
    # Only xyz matters: other colours, same points.
    recoloured = points.copy()
    recoloured[:, 3:] = rng.random((3000, 3))
    np.testing.assert_array_equal(sample(recoloured, 512, "fps")[0][:, :3], out[:, :3])


@pytest.mark.parametrize("m,n", [(1500, 128), (4000, 64)])  # both bucket heights (m < / >= 2048)
def test_fps_is_farthest_point_sampling(m, n):
    rng = np.random.default_rng(m)
    xyz = rng.random((m, 3)).astype(np.float32)
    out, _ = sample(xyz, n, "fps")
    index = row_index(xyz)
    idx = np.array([index[row.tobytes()] for row in out])
    ref = naive_fps(xyz.astype(np.float64), n, start=int(idx[0]))
    assert set(idx.tolist()) == set(ref.tolist())


def test_sample_pads_cyclically_and_uniform_is_a_subset():
    points = np.arange(15, dtype=np.float32).reshape(5, 3)
    out, padded = sample(points, 12, "fps")
    assert padded and out.shape == (12, 3)
    np.testing.assert_array_equal(out, points[[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]])
    out, padded = sample(points, 5, "fps")
    assert not padded
    np.testing.assert_array_equal(out, points)

    rng_points = np.random.default_rng(3).random((1000, 3)).astype(np.float32)
    a, padded = sample(rng_points, 100, "uniform", np.random.default_rng(7))
    b, _ = sample(rng_points, 100, "uniform", np.random.default_rng(7))
    c, _ = sample(rng_points, 100, "uniform", np.random.default_rng(8))
    assert not padded and a.shape == (100, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    index = row_index(rng_points)
    idx = [index[row.tobytes()] for row in a]
    assert len(set(idx)) == 100

    with pytest.raises(ValueError, match="no points"):
        sample(np.zeros((0, 3), np.float32), 4)
    with pytest.raises(ValueError, match="fps"):
        sample(rng_points, 10, "random")


def test_env_cloud_is_the_cropped_fps_sample_of_the_camera_cloud(reach):
    obs, _ = reach.reset(seed=0)
    settings = find_wrapper(reach, PointCloudObservation).settings
    cloud = obs["point_cloud"]
    assert settings.crop.mask(cloud).all()
    assert cloud[:, 2].min() >= settings.crop.low[2]  # the table plane is cut away
    assert len(np.unique(cloud, axis=0)) == settings.num_points  # no padding needed here
    data = reach.unwrapped.data
    with depth_cameras(reach.unwrapped.model, settings.cameras, settings.height) as cams:
        expected, padded = sample(crop(fused_cloud(cams, data), settings.crop), settings.num_points, "fps")
    assert not padded
    np.testing.assert_array_equal(cloud, expected)


def test_padded_observations_are_counted():
    settings = dataclasses.replace(task_settings("reach-v3"), num_points=20000, height=32, width=32)
    with closing(make_env("reach-v3", settings=settings)) as env:
        pc = find_wrapper(env, PointCloudObservation)
        obs, _ = env.reset(seed=0)
        assert (pc.observations, pc.padded) == (1, 1)
        cloud = obs["point_cloud"]
        assert cloud.shape == (20000, 3)
        m = len(np.unique(cloud, axis=0))
        assert 0 < m < 32 * 32
        np.testing.assert_array_equal(cloud, cloud[np.arange(20000) % m])
        assert settings.crop.mask(cloud).all()
        env.step(np.zeros(4, np.float32))
        assert (pc.observations, pc.padded) == (2, 2)
