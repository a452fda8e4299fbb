"""Shared test setup: MuJoCo renders offscreen through EGL unless the user chose otherwise.

This must run before anything imports mujoco (pytest imports conftest first).
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The networks in the tests are tiny and share 2 cores with env worker processes: one
    intra-op thread is faster, and avoids the thread-pool stalls seen on a busy 2-core
    machine (0.6 s instead of 3 ms for a tiny U-Net forward)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
