"""sodp3d: point-cloud diffusion planners, pre-trained on sub-optimal data and fine-tuned with PPO + BC."""

import os as _os
import sys as _sys

# Whether MuJoCo chose its GL backend before we could ask for EGL (for error messages).
MUJOCO_IMPORTED_FIRST = "mujoco" in _sys.modules and "MUJOCO_GL" not in _os.environ
# Headless rendering by default. MuJoCo reads this when it is first imported, so it is
# set here, before any sub-package imports mujoco; export MUJOCO_GL=glfw for a window.
_os.environ.setdefault("MUJOCO_GL", "egl")

__version__ = "0.1.0"
