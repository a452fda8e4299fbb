"""Tests of the point-cloud environments (sodp3d.envs).

The geometry tests compare the back-projected clouds with what MuJoCo itself knows about
the scene (ray casting, geom poses), so a wrong intrinsic, extrinsic or axis convention
fails them; the rest checks cropping and sampling, observations, seeding, action chunks,
error messages and the vector env.
"""

from __future__ import annotations

import contextlib
import dataclasses

import gymnasium as gym
import mujoco
import numpy as np
import pytest
from omegaconf import OmegaConf
from scipy.spatial import cKDTree

from sodp3d.envs import default_env_config, make_env, make_vector_env, resolve_tasks, task_settings
from sodp3d.envs.camera import DepthCamera, fused_cloud
from sodp3d.envs.pointcloud import CropBox, crop, sample
from sodp3d.envs.suites import make_suite_env
from sodp3d.envs.wrappers import ActionChunking, PointCloudObservation, find_wrapper
from sodp3d.errors import UserError

# The geom groups that mujoco.Renderer draws by default (it renders with a default MjvOption).
RENDERED_GEOMGROUP = np.asarray(mujoco.MjvOption().geomgroup, dtype=np.uint8)


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def depth_cameras(model, names, res, rgb=False):
    """DepthCameras at ``res`` (square side, or (height, width)), closed afterwards."""
    height, width = (res, res) if isinstance(res, int) else res
    cams = [DepthCamera(model, name, height, width, rgb=rgb) for name in names]
    try:
        yield cams
    finally:
        for cam in cams:
            cam.close()


@contextlib.contextmanager
def closing(env):
    try:
        yield env
    finally:
        env.close()


def ray_distances(model, data, origin, targets):
    """Distance from ``origin`` to the first surface along the ray to each target (inf: miss)."""
    geomid = np.zeros(1, np.int32)
    out = np.empty(len(targets))
    for i, p in enumerate(np.asarray(targets, dtype=np.float64)):
        vec = p - origin
        vec /= np.linalg.norm(vec)
        dist = mujoco.mj_ray(
            model, data, pnt=origin, vec=vec, geomgroup=RENDERED_GEOMGROUP, flg_static=1, bodyexclude=-1, geomid=geomid
        )
        out[i] = dist if dist >= 0 else np.inf
    return out


def surface_distance(model, data, geom_id, points):
    """Unsigned distance from world points to the surface of a box or cylinder geom."""
    local = (points - data.geom_xpos[geom_id]) @ data.geom_xmat[geom_id].reshape(3, 3)
    size = model.geom_size[geom_id]
    gtype = model.geom_type[geom_id]
    if gtype == mujoco.mjtGeom.mjGEOM_BOX:
        excess = np.abs(local) - size
    elif gtype == mujoco.mjtGeom.mjGEOM_CYLINDER:
        excess = np.stack([np.linalg.norm(local[:, :2], axis=1) - size[0], np.abs(local[:, 2]) - size[1]], axis=1)
    else:
        raise NotImplementedError(f"geom type {gtype}")
    outside = np.linalg.norm(np.maximum(excess, 0.0), axis=1)
    inside = np.minimum(excess.max(axis=1), 0.0)
    return np.abs(outside + inside)


def visible_in(cam, data, depth, points, tol=0.01):
    """Points that camera ``cam`` (with depth image ``depth``) sees, not occluded."""
    uvz = cam.project(data, points)
    u, v = np.rint(uvz[:, 0]).astype(int), np.rint(uvz[:, 1]).astype(int)
    inside = (u >= 0) & (u < cam.width) & (v >= 0) & (v < cam.height) & (uvz[:, 2] > 0)
    seen = np.zeros(len(points), bool)
    seen[inside] = uvz[inside, 2] <= depth[v[inside], u[inside]] + tol
    return seen


def naive_fps(xyz, n, start):
    idx = [start]
    dist = np.linalg.norm(xyz - xyz[start], axis=1)
    for _ in range(n - 1):
        i = int(np.argmax(dist))
        idx.append(i)
        dist = np.minimum(dist, np.linalg.norm(xyz - xyz[i], axis=1))
    return np.array(idx)


def row_index(points):
    """Map each row (as bytes) to its index; rows must be unique."""
    return {row.tobytes(): i for i, row in enumerate(np.ascontiguousarray(points))}


# ---------------------------------------------------------------------------------------
# fixtures: one scene per suite, reused by the module
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pick_place():
    env = make_suite_env("pick-place-v3")
    env.reset(seed=0)
    # Move the arm off its reset pose (down and to the side, gripper open).
    for _ in range(10):
        env.step(np.array([0.4, -0.3, -0.5, -1.0]))
    yield env
    env.close()


@pytest.fixture(scope="module")
def door():
    env = make_suite_env("adroit-door")
    env.reset(seed=0)
    yield env
    env.close()


@pytest.fixture(scope="module")
def reach():
    env = make_env("reach-v3")
    yield env
    env.close()


SCENES = {"pick-place-v3": "pick_place", "adroit-door": "door"}


# ---------------------------------------------------------------------------------------
# 1. geometry against the simulator
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "task,camera,height,width",
    [
        ("pick-place-v3", "corner4", 128, 128),
        ("adroit-door", "fixed", 128, 128),
        # Not square (fovy is vertical), and wider than the scene's 640 px offscreen buffer.
        ("pick-place-v3", "corner3", 72, 720),
    ],
)
def test_back_projection_agrees_with_mujoco_ray_casting(request, task, camera, height, width):
    env = request.getfixturevalue(SCENES[task])
    model, data = env.model, env.data
    with depth_cameras(model, [camera], (height, width)) as (cam,):
        # The renderer draws exactly the geom groups that the rays below consider.
        option = getattr(cam._depth_renderer, "_scene_option", None)
        if option is not None:
            np.testing.assert_array_equal(option.geomgroup, RENDERED_GEOMGROUP)
        depth = cam.depth(data)
        points = cam.back_project(depth, data)

    assert depth.shape == (height, width) and depth.dtype == np.float32
    if task == "pick-place-v3":  # this view has background pixels, which must be dropped
        assert (depth >= cam.depth_trunc).any()
    assert points.dtype == np.float32 and points.ndim == 2 and points.shape[1] == 3
    assert np.isfinite(points).all()
    # One point per pixel that saw something; the far plane (nothing seen) is dropped.
    valid = (depth > 0) & (depth < cam.depth_trunc)
    assert points.shape[0] == np.count_nonzero(valid) > 1000

    origin = data.cam_xpos[cam.cam_id].astype(np.float64)
    rng = np.random.default_rng(0)
    subset = points[rng.choice(len(points), size=200, replace=False)].astype(np.float64)
    hit = ray_distances(model, data, origin, subset)
    err = np.abs(hit - np.linalg.norm(subset - origin, axis=1))
    assert np.median(err) < 1e-3, f"median ray/back-projection mismatch {np.median(err):.4f} m"
    assert np.percentile(err, 95) < 0.01, f"95th percentile mismatch {np.percentile(err, 95):.4f} m"

    # project() is the inverse: every point lands on the centre of the pixel it came from,
    # at that pixel's depth, and the points cover the valid pixels one to one.
    uvz = cam.project(data, points.astype(np.float64))
    u, v = np.rint(uvz[:, 0]).astype(int), np.rint(uvz[:, 1]).astype(int)
    assert np.abs(uvz[:, 0] - u).max() < 1e-3 and np.abs(uvz[:, 1] - v).max() < 1e-3
    assert u.min() >= 0 and u.max() <= cam.width - 1 and v.min() >= 0 and v.max() <= cam.height - 1
    np.testing.assert_allclose(uvz[:, 2], depth[v, u], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.sort(v * cam.width + u), np.flatnonzero(valid))


def test_camera_pose_is_read_from_mjdata_at_render_time(door):
    """Move and turn the camera: the cloud still lies on the surfaces MuJoCo sees."""
    model, data = door.model, door.data
    with depth_cameras(model, ["fixed"], 64) as (cam,):
        i = cam.cam_id
        saved_pos, saved_quat = model.cam_pos[i].copy(), model.cam_quat[i].copy()
        before = cam.cloud(data)
        try:
            turn = np.empty(4)
            mujoco.mju_axisAngle2Quat(turn, np.array([0.0, 1.0, 0.0]), np.deg2rad(10.0))
            mujoco.mju_mulQuat(model.cam_quat[i], saved_quat, turn)
            model.cam_pos[i] = saved_pos + np.array([0.05, -0.04, 0.03])
            mujoco.mj_kinematics(model, data)
            mujoco.mj_camlight(model, data)
            pose = cam.camera_to_world(data)
            np.testing.assert_allclose(pose[:3, 3], data.cam_xpos[i])
            np.testing.assert_allclose(pose[:3, :3] @ pose[:3, :3].T, np.eye(3), atol=1e-9)
            # The optical axis (+z, OpenCV) is MuJoCo's -z camera axis.
            np.testing.assert_allclose(pose[:3, 2], -data.cam_xmat[i].reshape(3, 3)[:, 2], atol=1e-12)
            np.testing.assert_allclose(cam.extrinsic(data) @ pose, np.eye(4), atol=1e-9)
            moved = cam.cloud(data)
            assert moved.shape != before.shape or not np.allclose(moved, before, atol=1e-3)
            origin = data.cam_xpos[i].astype(np.float64)
            subset = moved[np.random.default_rng(1).choice(len(moved), size=60, replace=False)].astype(np.float64)
            err = np.abs(ray_distances(model, data, origin, subset) - np.linalg.norm(subset - origin, axis=1))
            assert np.median(err) < 1e-3 and np.percentile(err, 90) < 0.01
        finally:
            model.cam_pos[i], model.cam_quat[i] = saved_pos, saved_quat
            mujoco.mj_kinematics(model, data)
            mujoco.mj_camlight(model, data)


# ---------------------------------------------------------------------------------------
# 2. points lie where MuJoCo says things are
# ---------------------------------------------------------------------------------------
def test_cloud_sees_gripper_pads_and_object(pick_place):
    model, data = pick_place.model, pick_place.data
    with depth_cameras(model, ["corner4"], 128) as (cam,):
        cloud = cam.cloud(data).astype(np.float64)
    tree = cKDTree(cloud)

    obj = model.body("obj").id
    obj_geoms = [g for g in range(model.ngeom) if model.geom_bodyid[g] == obj]
    assert obj_geoms, "the pick-place scene has no geom on body 'obj'"
    geoms = [model.geom("leftpad_geom").id, model.geom("rightpad_geom").id] + obj_geoms
    for g in geoms:
        name = model.geom(g).name or f"geom {g}"
        centre = data.geom_xpos[g]
        nearest, _ = tree.query(centre)
        bound = model.geom_size[g].max() + 0.01
        assert nearest < bound, f"{name}: nearest point {nearest:.4f} m from its centre (bound {bound:.4f})"
        # Stronger: some points lie on the geom's surface (within 2 mm).
        close = cloud[tree.query_ball_point(centre, r=float(np.linalg.norm(model.geom_size[g])) + 0.02)]
        on_surface = np.count_nonzero(surface_distance(model, data, g, close) < 0.002)
        assert on_surface >= 3, f"{name}: only {on_surface} points on its surface"


# ---------------------------------------------------------------------------------------
# 3. cameras share coordinates
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "task,cam_a,cam_b", [("pick-place-v3", "corner4", "corner3"), ("adroit-door", "fixed", "vil_camera")]
)
def test_two_cameras_see_the_scene_in_the_same_coordinates(request, task, cam_a, cam_b):
    env = request.getfixturevalue(SCENES[task])
    data = env.data
    box = task_settings(task).crop
    with depth_cameras(env.model, [cam_a, cam_b], 256) as cams:
        depths = [cam.depth(data) for cam in cams]
        clouds = [cam.back_project(dp, data).astype(np.float64) for cam, dp in zip(cams, depths)]
        for a, b in ((0, 1), (1, 0)):
            pts = crop(clouds[a], box)
            # Only what the other camera sees too (in its image, not occluded).
            shared = pts[visible_in(cams[b], data, depths[b], pts)]
            assert len(shared) > 500, f"{cams[a].name}/{cams[b].name}: only {len(shared)} shared points"
            dist, _ = cKDTree(clouds[b]).query(shared)
            label = f"{task}: {cams[a].name} -> {cams[b].name}"
            assert np.median(dist) < 0.005, f"{label}: median nearest neighbour {np.median(dist):.4f} m"
            assert np.mean(dist < 0.01) > 0.95, f"{label}: only {np.mean(dist < 0.01):.2%} within 1 cm"


def test_fused_multi_camera_env():
    settings = dataclasses.replace(task_settings("pick-place-v3"), cameras=("corner4", "corner3"))
    with closing(make_env("pick-place-v3", settings=settings)) as env:
        obs, _ = env.reset(seed=0)
        pc = find_wrapper(env, PointCloudObservation)
        cloud = obs["point_cloud"]
        assert cloud.shape == (settings.num_points, 3) and cloud.dtype == np.float32
        assert settings.crop.mask(cloud).all()
        assert [c.name for c in pc.cameras] == ["corner4", "corner3"]
        data = env.unwrapped.data
        per_camera = [crop(cam.cloud(data), settings.crop) for cam in pc.cameras]
        assert fused_cloud(pc.cameras, data).shape[0] == sum(cam.cloud(data).shape[0] for cam in pc.cameras)
        # Every point comes from one of the two cameras, and both contribute.
        from_each = [cKDTree(c).query(cloud)[0] == 0 for c in per_camera]
        assert np.all(from_each[0] | from_each[1])
        assert from_each[0].sum() > 50 and from_each[1].sum() > 50
        assert pc.padded == 0


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
# 8. bad input
# ---------------------------------------------------------------------------------------
def test_resolve_tasks():
    assert resolve_tasks("reach-v3") == ["reach-v3"]
    mt10 = resolve_tasks("mt10")
    assert len(mt10) == 10 and len(set(mt10)) == 10 and "reach-v3" in mt10
    assert resolve_tasks("MT10") == mt10
    both = resolve_tasks(["push-v3", "mt10", "push-v3"])
    assert both[0] == "push-v3" and len(both) == 10 and set(both) == set(mt10)
    assert both[1:] == [t for t in mt10 if t != "push-v3"]
    assert resolve_tasks(["reach-v3", "mt10"]) == ["reach-v3"] + [t for t in mt10 if t != "reach-v3"]
    assert resolve_tasks(["adroit-pen", "adroit"]) == ["adroit-pen", "adroit-door", "adroit-hammer"]
    assert len(resolve_tasks("mt50")) == 50

    with pytest.raises(UserError) as e:
        resolve_tasks("reach-v9")
    msg = str(e.value)
    assert "did you mean 'reach-v3'" in msg and "mt10" in msg and "adroit-door" in msg and "push-v3" in msg
    for bad in (None, "", "  ", [], [3]):
        with pytest.raises(UserError):
            resolve_tasks(bad)
    with pytest.raises(UserError, match="reach-v9"):
        make_vector_env("reach-v9", 2)


def test_unknown_camera(pick_place):
    with pytest.raises(UserError) as e:
        DepthCamera(pick_place.model, "nope", 32, 32)
    msg = str(e.value)
    assert "nope" in msg and "corner4" in msg and "topview" in msg and "gripperPOV" in msg
    settings = dataclasses.replace(task_settings("adroit-door"), cameras=("nowhere",))
    with pytest.raises(UserError, match="fixed, vil_camera"):
        make_env("adroit-door", settings=settings)
    with pytest.raises(UserError):
        DepthCamera(pick_place.model, "corner4", 0, 32)


def test_crop_box_that_leaves_no_points():
    settings = dataclasses.replace(task_settings("reach-v3"), crop=CropBox((5, 5, 5), (6, 6, 6)), height=32, width=32)
    with closing(make_env("reach-v3", settings=settings)) as env:
        with pytest.raises(UserError) as e:
            env.reset(seed=0)
    msg = str(e.value)
    assert "reach-v3" in msg and "[5.0, 5.0, 5.0]" in msg and "[6.0, 6.0, 6.0]" in msg and "crop" in msg


def _cfg(**metaworld):
    cfg = default_env_config()
    for key, value in metaworld.items():
        OmegaConf.update(cfg, f"metaworld.{key}", value, merge=False)
    return cfg


def test_bad_settings():
    s = task_settings("reach-v3")
    assert (s.num_points, s.cameras, s.height, s.width, s.sampling) == (512, ("corner4",), 128, 128, "fps")
    assert s.crop == CropBox((-0.65, 0.2, 0.005), (0.65, 1.1, 0.6))
    assert task_settings("pick-out-of-hole-v3").crop.low[2] == -0.15  # a per-task override
    assert task_settings("adroit-pen").crop.low == (-np.inf, -np.inf, 0.01)

    with pytest.raises(UserError, match=r"num_points must be a positive integer, got -5"):
        task_settings("reach-v3", _cfg(num_points=-5))
    with pytest.raises(UserError, match=r"env\.metaworld\.tasks\.reach-v3\.num_points"):
        task_settings("reach-v3", _cfg(**{"tasks.reach-v3": {"num_points": 0}}))
    with pytest.raises(UserError) as e:
        task_settings("reach-v3", _cfg(sampling="random"))
    assert "random" in str(e.value) and "fps" in str(e.value) and "uniform" in str(e.value)
    with pytest.raises(UserError, match="crop"):
        task_settings("reach-v3", _cfg(crop={"low": [0, 0, 1], "high": [1, 1, 0]}))
    with pytest.raises(UserError, match="resolution"):
        task_settings("reach-v3", _cfg(resolution=[128]))
    with pytest.raises(UserError, match="cameras"):
        task_settings("reach-v3", _cfg(cameras=[]))
    with pytest.raises(UserError, match="colour"):
        task_settings("reach-v3", _cfg(colour=True))
    with pytest.raises(UserError, match="reach-v9"):
        task_settings("reach-v9")


def test_bad_suite_setting_is_named_where_it_was_set():
    # pick-out-of-hole-v3 overrides only the crop; num_points comes from env.metaworld.
    with pytest.raises(UserError) as e:
        task_settings("pick-out-of-hole-v3", _cfg(num_points=-5))
    assert "env.metaworld.num_points" in str(e.value)


# ---------------------------------------------------------------------------------------
# 9. vector env
# ---------------------------------------------------------------------------------------
def test_async_vector_env():
    env = make_vector_env("reach-v3", 2, asynchronous=True, n_obs_steps=2, n_action_steps=8)
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
