"""Shared pieces of the environment tests (tests/test_env_*.py): cameras closed after use,
an env closed after use, rows of a cloud by value. Not a test file."""

from __future__ import annotations

import contextlib

import numpy as np

@contextlib.contextmanager
def depth_cameras(model, names, res, rgb=False):
    """DepthCameras at ``res`` (square side, or (height, width)), closed afterwards."""
    from sodp3d.envs.camera import DepthCamera

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


def row_index(points):
    """Map each row (as bytes) to its index; rows must be unique."""
    return {row.tobytes(): i for i, row in enumerate(np.ascontiguousarray(points))}
