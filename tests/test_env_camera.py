"""Camera geometry of the point-cloud environments (sodp3d.envs.camera).

The back-projected clouds are compared with what MuJoCo itself knows about the scene
(ray casting, geom poses), so a wrong intrinsic, extrinsic or axis convention fails
them; two cameras, and the fused multi-camera cloud, must agree on coordinates.
"""

from __future__ import annotations

import dataclasses

import mujoco
import numpy as np
import pytest
from env_kit import closing, depth_cameras
from scipy.spatial import cKDTree

from sodp3d.envs import make_env, task_settings
from sodp3d.envs.camera import fused_cloud
from sodp3d.envs.pointcloud import crop
from sodp3d.envs.suites import make_suite_env
from sodp3d.envs.wrappers import PointCloudObservation, find_wrapper

# The geom groups that mujoco.Renderer draws by default (it renders with a default MjvOption).
RENDERED_GEOMGROUP = np.asarray(mujoco.MjvOption().geomgroup, dtype=np.uint8)


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------
# fixtures: the Adroit scene (pick_place, the Meta-World one, is in conftest.py)
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def door():
    env = make_suite_env("adroit-door")
    env.reset(seed=0)
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
