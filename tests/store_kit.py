"""Shared pieces of the episode-store tests (tests/test_store.py, test_collect.py,
test_data_*.py): synthetic episodes, DP3-layout stores, what a reader sees, and the CLI's
one-line errors. Not a test file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

def make_episode(seed: int, steps: int, n_points: int = 16, success_at: int | None = None) -> dict[str, np.ndarray]:
    """A synthetic episode with our layout's keys, dtypes and shapes."""
    rng = np.random.default_rng(seed)
    success = np.zeros(steps, dtype=bool)
    if success_at is not None:
        success[success_at:] = True
    return {
        "point_cloud": rng.standard_normal((steps, n_points, 3)).astype(np.float32),
        "agent_pos": rng.standard_normal((steps, 9)).astype(np.float32),
        "state": rng.standard_normal((steps, 39)).astype(np.float32),
        "action": rng.uniform(-1, 1, (steps, 4)).astype(np.float32),
        "reward": rng.uniform(0, 10, steps).astype(np.float32),
        "success": success,
    }


def snapshot(path) -> dict:
    """Everything a reader sees of the committed episodes."""
    from sodp3d.data.store import EpisodeDataset

    d = EpisodeDataset(path)
    snap: dict = {f"data/{k}": d.get(k) for k in d.keys}
    snap["episode_ends"] = d.episode_ends.copy()
    snap["episode_task"] = d.episode_tasks
    for name in sorted(d.root["meta"].array_keys()):
        if name not in ("episode_ends", "episode_task"):
            snap[f"meta/{name}"] = d.episode_info(name[len("episode_"):])
    return snap


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype, k
            assert a[k].shape == b[k].shape, k
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            assert a[k] == b[k], k


def raw_lengths(path) -> dict[str, int]:
    """Leading lengths of every array in the store, committed or not."""
    import zarr

    root = zarr.open_group(str(path), mode="r")
    out = {f"data/{k}": root["data"][k].shape[0] for k in root["data"].array_keys()}
    out.update({f"meta/{k}": root["meta"][k].shape[0] for k in root["meta"].array_keys()})
    return out


def assert_one_line_error(rc: int, out: str, err: str, command: str = "collect") -> str:
    assert rc == 2, (out, err)
    assert "Traceback" not in out + err
    assert err.endswith("\n") and err.count("\n") == 1, f"expected one line on stderr, got {err!r}"
    assert err.startswith(f"sodp3d {command}: error: "), err
    return err.strip()


def make_dp3_store(path: Path, zarr_format: int, lengths=(6, 4, 9), full_state: bool = True) -> dict:
    """A dataset in DP3's layout (data/point_cloud, state, action[, full_state], meta/episode_ends)."""
    import zarr

    rng = np.random.default_rng(11)
    t = sum(lengths)
    arrays = {
        "point_cloud": rng.standard_normal((t, 512, 3)).astype(np.float32),
        "state": rng.standard_normal((t, 9)).astype(np.float32),
        "action": rng.uniform(-1, 1, (t, 4)).astype(np.float32),
    }
    if full_state:
        arrays["full_state"] = rng.standard_normal((t, 39)).astype(np.float32)
    root = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    data = root.create_group("data")
    for k, v in arrays.items():
        data.create_array(k, data=v, chunks=(5,) + v.shape[1:])
    root.create_group("meta").create_array("episode_ends", data=np.cumsum(lengths).astype(np.int64))
    return arrays
