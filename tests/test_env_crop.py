"""The shipped Meta-World crop boxes, checked on all 50 tasks against the simulator.

For every task, at reset and at the end of a scripted episode: the hand, the task's
object(s) and the goal are inside the task's box, and fewer than 5% of the sampled
points lie on the table's retaining wall. Which geom a point lies on comes from MuJoCo's
segmentation render of the same camera and state, not from the coordinates.
"""

from __future__ import annotations

import mujoco
import numpy as np
import pytest
from env_kit import closing

from sodp3d.envs import make_env, task_settings
from sodp3d.envs.settings import default_env_config
from sodp3d.envs.scripted_source import scripted_policy
from sodp3d.envs.tasks import metaworld_tasks
from sodp3d.envs.wrappers import PointCloudObservation, find_wrapper

EPISODE_STEPS = 150      # the demo's episode length; the scripted policies finish most tasks in it
WALL_SHARE_MAX = 0.05
# The box reaches down to the table top through a hole in a platform: the hole's bottom
# is the table, so only the wall counts against these tasks.
LOOKS_INTO_A_HOLE = {"pick-out-of-hole-v3"}
TABLE_BODIES = ("tablelink", "RetainingWall")


def _table_share(pc: PointCloudObservation, points: np.ndarray, bodies=TABLE_BODIES) -> float:
    """Share of ``points`` whose pixel in the camera shows the table: its top (body
    tablelink) or its retaining wall (body RetainingWall, absent in the tasks whose table
    has a hole instead)."""
    model, data = pc.unwrapped.model, pc.unwrapped.data
    table = [b for b in (mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, n) for n in bodies) if b >= 0]
    assert table, f"none of the bodies {bodies} is in the model"
    cam = pc.cameras[0]
    renderer = mujoco.Renderer(model, cam.height, cam.width)
    try:
        renderer.enable_segmentation_rendering()
        renderer.update_scene(data, camera=cam.name)
        seg = renderer.render()
    finally:
        renderer.close()
    uvz = cam.project(data, points[:, :3])
    u = np.clip(np.rint(uvz[:, 0]).astype(int), 0, cam.width - 1)
    v = np.clip(np.rint(uvz[:, 1]).astype(int), 0, cam.height - 1)
    ids, kinds = seg[v, u, 0], seg[v, u, 1]
    on_geom = kinds == int(mujoco.mjtObj.mjOBJ_GEOM)
    on_table = np.zeros(len(points), bool)
    on_table[on_geom] = np.isin(model.geom_bodyid[ids[on_geom]], table)
    return float(on_table.mean())


def _table_top(model, data) -> float:
    """Height of the table's top face: the highest top of the table body's visible boxes
    (0 for the usual table; 0.05 for the table of four blocks around a hole)."""
    body = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, "tablelink")
    tops = [data.geom_xpos[g][2] + model.geom_size[g][2] for g in range(model.ngeom)
            if model.geom_bodyid[g] == body and model.geom_type[g] == mujoco.mjtGeom.mjGEOM_BOX
            and model.geom_group[g] == 1]
    return float(max(tops))


def _task_points(raw) -> dict[str, np.ndarray]:
    """What the box must keep: the hand's grasp point, the object(s), the goal."""
    return {
        "hand": np.asarray(raw.tcp_center, float)[None],
        "object": np.asarray(raw._get_pos_objects(), float).reshape(-1, 3),
        "goal": np.asarray(raw._target_pos, float)[None],
    }


def _outside(points: np.ndarray, low, high, what: str) -> list[str]:
    """Points outside the box in x and y, or above its top. The floor is checked on its
    own: objects and goals rest on the table top (their origin on it) or lie in a hole
    under it, and are seen by what stands above the floor."""
    lo, hi = np.asarray(low, float), np.asarray(high, float)
    bad = []
    for p in points:
        if np.any(p[:2] < lo[:2]) or np.any(p[:2] > hi[:2]) or p[2] > hi[2]:
            bad.append(f"{what} {np.round(p, 3).tolist()}")
    return bad


@pytest.mark.parametrize("task", metaworld_tasks())
def test_crop_box_keeps_the_task_and_drops_the_wall(task):
    with closing(make_env(task)) as env:
        pc = find_wrapper(env, PointCloudObservation)
        box = pc.settings.crop
        raw = env.unwrapped.raw
        env.reset(seed=0)
        # The floor drops the table's top face and at most the lowest centimetre of what
        # stands on it, unless the task looks into a hole under the table.
        top = _table_top(env.unwrapped.model, env.unwrapped.data)
        if task in LOOKS_INTO_A_HOLE:
            assert box.low[2] < top, f"{task}: the box must reach the bottom of the hole"
        else:
            assert top < box.low[2] <= top + 0.01, f"{task}: floor {box.low[2]} for a table top at {top:.3f}"
        not_wanted = ("RetainingWall",) if task in LOOKS_INTO_A_HOLE else TABLE_BODIES
        problems = _outside_all(raw, box, "at reset")
        share_reset = _table_share(pc, pc.point_cloud(), not_wanted)
        policy = scripted_policy(task)
        for _ in range(EPISODE_STEPS):
            # The suite env itself: no cloud is rendered on the way, only at the end.
            _, _, terminated, truncated, info = env.unwrapped.step(policy.get_action(env.unwrapped._last_state))
            problems += _outside_all(raw, box, "after the scripted episode")
            if info["success"] or terminated or truncated:
                break
        share_end = _table_share(pc, pc.point_cloud(), not_wanted)
    assert not problems, f"{task}: outside the crop box {box.as_list()}: {problems[:4]}"
    assert share_reset < WALL_SHARE_MAX and share_end < WALL_SHARE_MAX, (
        f"{task}: {share_reset:.1%} (reset) and {share_end:.1%} (end) of the points lie on the table or its wall"
    )


def _outside_all(raw, box, when: str) -> list[str]:
    out = []
    for what, pts in _task_points(raw).items():
        out += [f"{s} {when}" for s in _outside(pts, box.low, box.high, what)]
    return out


def test_the_wall_check_sees_the_wall():
    """The segmentation check is not vacuous: with the box widened to the whole table
    (the old default), the wall is a large share of reach's cloud."""
    cfg = default_env_config()
    cfg.metaworld.crop = {"low": [-0.65, 0.2, 0.005], "high": [0.65, 1.1, 0.6]}
    with closing(make_env("reach-v3", cfg)) as env:
        pc = find_wrapper(env, PointCloudObservation)
        env.reset(seed=0)
        assert _table_share(pc, pc.point_cloud()) > 0.3
