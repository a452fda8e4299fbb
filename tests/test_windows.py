"""Training windows (Tp / To / Ta) cut from episode stores: counts, edge padding at episode
boundaries, never across datasets, reproducible sampling, readable errors."""

from __future__ import annotations

import numpy as np
import pytest
from policy_kit import EPISODE_LENGTHS, write_dataset

from sodp3d.data.windows import WindowDataset
from sodp3d.errors import UserError


def expected_windows(lengths, horizon, n_obs, n_action, offset=0):
    """Independent enumeration: per window the global step indices of its Tp steps."""
    out, e0 = [], 0
    for n in lengths:
        e1 = e0 + n
        first = e0 - (n_obs - 1)
        last = max(e1 - horizon + (n_action - 1), first)
        for s in range(first, last + 1):
            out.append(np.clip(np.arange(s, s + horizon), e0, e1 - 1) + offset)
        e0 = e1
    return np.array(out)


HORIZONS = [(4, 2, 2), (12, 2, 8), (8, 3, 3), (6, 1, 1), (16, 2, 4)]  # (Tp, To, Ta); the last two hit short episodes


@pytest.mark.parametrize("memory_fraction", [0.5, 0.0], ids=["in-memory", "from-zarr"])
@pytest.mark.parametrize("tp,to,ta", HORIZONS)
def test_windows_count_padding_and_content(tmp_path, tp, to, ta, memory_fraction):
    path = write_dataset(tmp_path / "d.zarr")
    ds = WindowDataset([str(path)], ["point_cloud", "agent_pos", "state"], tp, to, ta, memory_fraction=memory_fraction)
    assert ds.in_memory is (memory_fraction > 0)
    assert ds.n_steps == sum(EPISODE_LENGTHS)

    # closed form: per episode (len - Tp + Ta - 1) - (-(To - 1)) + 1, at least one window
    count = sum(max(n - tp + ta - 1, -(to - 1)) - (-(to - 1)) + 1 for n in EPISODE_LENGTHS)
    assert len(ds) == count

    steps = expected_windows(EPISODE_LENGTHS, tp, to, ta)
    assert len(steps) == count
    b = ds.get(np.arange(len(ds)))
    assert b["obs"]["point_cloud"].shape == (count, to, 16, 3)
    assert b["obs"]["agent_pos"].shape == (count, to, 2)
    assert b["obs"]["state"].shape == (count, to, 3)
    assert b["action"].shape == (count, tp, 2)
    assert all(v.dtype == np.float32 for v in [*b["obs"].values(), b["action"]])
    np.testing.assert_array_equal(b["action"][..., 0], steps)
    np.testing.assert_array_equal(b["action"][..., 1], 10 * steps)
    np.testing.assert_array_equal(b["obs"]["agent_pos"][..., 0], steps[:, :to])
    np.testing.assert_array_equal(b["obs"]["agent_pos"][..., 1], -steps[:, :to])
    np.testing.assert_array_equal(b["obs"]["point_cloud"], np.broadcast_to(steps[:, :to, None, None], (count, to, 16, 3)))
    np.testing.assert_array_equal(b["obs"]["state"][..., 0], steps[:, :to])

    # windows never cross episodes
    ends = np.cumsum(EPISODE_LENGTHS)
    episode_of = np.searchsorted(ends, b["action"][..., 0], side="right")
    assert (episode_of == episode_of[:, :1]).all()

    # a shuffled, repeated selection gives the same rows
    sel = np.array([count - 1, 0, 3 % count, 0, count // 2])
    b2 = ds.get(sel)
    np.testing.assert_array_equal(b2["action"], b["action"][sel])
    np.testing.assert_array_equal(b2["obs"]["agent_pos"], b["obs"]["agent_pos"][sel])


def test_windows_edge_padding_at_episode_boundaries(tmp_path):
    tp, to, ta = 6, 3, 3
    path = write_dataset(tmp_path / "d.zarr")
    ds = WindowDataset([str(path)], ["agent_pos"], tp, to, ta)
    b = ds.get(np.arange(len(ds)))
    pos, act = b["obs"]["agent_pos"][..., 0], b["action"][..., 0]
    n_first = max(EPISODE_LENGTHS[0] - tp + ta - 1, -(to - 1)) + to  # windows of episode 0
    for e, (w_first, w_last, e0, e1) in enumerate([(0, n_first - 1, 0, 5), (n_first, len(ds) - 1, 5, 14)]):
        # the first window starts To-1 steps before the episode: its first To-1 obs repeat step e0
        np.testing.assert_array_equal(pos[w_first], [e0] * (to - 1) + [e0])
        np.testing.assert_array_equal(act[w_first, : to - 1], [e0] * (to - 1))
        assert act[w_first, to - 1] == e0
        # the last window runs Ta-1 steps past the end: they repeat step e1-1
        np.testing.assert_array_equal(act[w_last, -(ta - 1):], [e1 - 1] * (ta - 1))
        assert act[w_last].max() == e1 - 1 and act[w_last].min() >= e0
        # its executed actions (To-1 .. To-2+Ta) start inside the episode
        assert act[w_last, to - 1] < e1 - 1


def test_windows_over_two_datasets_never_mix_them(tmp_path):
    a = write_dataset(tmp_path / "a.zarr", lengths=(5, 9))
    b = write_dataset(tmp_path / "b.zarr", lengths=(7,), offset=1000)
    ds = WindowDataset([str(a), str(b)], ["agent_pos"], 4, 2, 2)
    assert len(ds) == (5 - 1) + (9 - 1) + (7 - 1)
    assert ds.n_steps == 21
    out = ds.get(np.arange(len(ds)))
    expected = np.concatenate([expected_windows((5, 9), 4, 2, 2), expected_windows((7,), 4, 2, 2, offset=1000)])
    np.testing.assert_array_equal(out["action"][..., 0], expected)
    fit = ds.arrays_for_fit()
    assert set(fit) == {"agent_pos", "action"}
    np.testing.assert_array_equal(np.concatenate(fit["action"])[:, 0],
                                  np.concatenate([np.arange(14), 1000 + np.arange(7)]))


def test_windows_sample_is_reproducible(tmp_path):
    path = write_dataset(tmp_path / "d.zarr")
    ds = WindowDataset([str(path)], ["point_cloud", "agent_pos"], 4, 2, 2)
    b1 = ds.sample(16, np.random.default_rng(7))
    b2 = ds.sample(16, np.random.default_rng(7))
    b3 = ds.sample(16, np.random.default_rng(8))
    assert b1["action"].shape == (16, 4, 2) and b1["obs"]["point_cloud"].shape == (16, 2, 16, 3)
    np.testing.assert_array_equal(b1["action"], b2["action"])
    for k in b1["obs"]:
        np.testing.assert_array_equal(b1["obs"][k], b2["obs"][k])
    assert not np.array_equal(b1["action"], b3["action"])


def test_windows_missing_key_is_a_user_error(tmp_path):
    path = write_dataset(tmp_path / "d.zarr", keys={"point_cloud", "state", "action"})
    with pytest.raises(UserError, match="agent_pos") as err:
        WindowDataset([str(path)], ["point_cloud", "agent_pos"], 4, 2, 2)
    assert str(path) in str(err.value)


def test_windows_datasets_with_different_action_dims_are_a_user_error(tmp_path):
    a = write_dataset(tmp_path / "a.zarr", action_dim=2)
    b = write_dataset(tmp_path / "b.zarr", action_dim=3)
    with pytest.raises(UserError, match="action") as err:
        WindowDataset([str(a), str(b)], ["agent_pos"], 4, 2, 2)
    msg = str(err.value)
    assert "(2,)" in msg and "(3,)" in msg


def test_windows_no_paths_is_a_user_error():
    with pytest.raises(UserError, match="data="):
        WindowDataset([], ["agent_pos"], 4, 2, 2)


def test_windows_read_only_obs_keys_and_action(tmp_path):
    import zarr

    path = write_dataset(tmp_path / "d.zarr")
    reference = WindowDataset([str(path)], ["point_cloud", "agent_pos"], 4, 2, 2).get(np.arange(12))
    g = zarr.open_group(str(path), mode="r+")
    del g["data/reward"]
    del g["data/success"]
    del g["meta/episode_task"]
    del g["data/state"]  # not read by a point-cloud encoder either
    g = zarr.open_group(str(path), mode="r")
    assert set(g["data"].array_keys()) == {"point_cloud", "agent_pos", "action"}
    assert "episode_task" not in set(g["meta"].array_keys())

    for frac in (0.5, 0.0):
        ds = WindowDataset([str(path)], ["point_cloud", "agent_pos"], 4, 2, 2, memory_fraction=frac)
        assert len(ds) == 12
        out = ds.get(np.arange(12))
        np.testing.assert_array_equal(out["action"], reference["action"])
        for k in reference["obs"]:
            np.testing.assert_array_equal(out["obs"][k], reference["obs"][k])
        ds.sample(4, np.random.default_rng(0))
