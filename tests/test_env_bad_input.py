"""Bad environment input: unknown tasks, sets and cameras, empty crops, bad settings, all UserErrors
that name what was wrong and where it was set."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from env_kit import closing
from omegaconf import OmegaConf

from sodp3d.envs import default_env_config, make_env, make_vector_env, resolve_tasks, task_settings
from sodp3d.envs.camera import DepthCamera
from sodp3d.envs.pointcloud import CropBox
from sodp3d.errors import UserError


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
    assert s.crop == CropBox((-0.67, 0.23, 0.005), (0.67, 0.975, 0.6))
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
