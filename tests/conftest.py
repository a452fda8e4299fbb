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


@pytest.fixture
def close_cached_envs():
    """Keep collection tests independent: close the environments a collect (or a failed
    one) left in this process's cache. Modules that collect use it for every test."""
    yield
    from sodp3d.envs.workers import close_envs

    close_envs()


# --------------------------------------------------------------------------------------
# One scene per suite, reused by a test module (tests/test_env_*.py). Imported lazily, so
# tests that need no simulator do not load it.
import numpy as np  # noqa: E402


@pytest.fixture(scope="module")
def pick_place():
    from sodp3d.envs.suites import make_suite_env

    env = make_suite_env("pick-place-v3")
    env.reset(seed=0)
    # Move the arm off its reset pose (down and to the side, gripper open).
    for _ in range(10):
        env.step(np.array([0.4, -0.3, -0.5, -1.0]))
    yield env
    env.close()


@pytest.fixture(scope="module")
def reach():
    from sodp3d.envs import make_env

    env = make_env("reach-v3")
    yield env
    env.close()


# --------------------------------------------------------------------------------------
# A tiny pre-trained run through the CLI, for modules that fine-tune, evaluate or resume.
@pytest.fixture(scope="session")
def collect_and_pretrain():
    """``make(root, task, episodes, env, pretrain)``: ``sodp3d collect`` of ``episodes`` per
    task into root/data.zarr, then ``sodp3d pretrain`` on it into root/pre (the overrides
    given); returns the run dir. Module fixtures call it once."""
    from sodp3d.cli import main

    def make(root, task: str, episodes: int, env: list[str], pretrain: list[str]):
        data = root / "data.zarr"
        assert main(["collect", f"task={task}", f"episodes={episodes}", f"out={data}", "workers=1", *env]) == 0
        run = root / "pre"
        assert main(["pretrain", f"data={data}", f"out={run}", *pretrain]) == 0
        return run

    return make
