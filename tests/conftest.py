"""Shared test setup: MuJoCo renders offscreen through EGL unless the user chose otherwise.

This must run before anything imports mujoco (pytest imports conftest first).
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")
