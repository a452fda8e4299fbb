"""Tests of the episode store (sodp3d.data.store).

Exact round trips, commit-based crash safety (a kill mid-append loses at most the
episode in progress, and a re-opened writer repairs the arrays), reading DP3's layout in
zarr v2 and v3.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from store_kit import assert_same, make_dp3_store, make_episode, raw_lengths, snapshot

from sodp3d.data.store import (
    FORMAT,
    FORMAT_VERSION,
    STEP_KEYS,
    EpisodeDataset,
    EpisodeWriter,
    inspect_path,
)
from sodp3d.errors import UserError

# --------------------------------------------------------------------------------------
# helpers


def episode_meta(ep: dict[str, np.ndarray], kind: str, noise: float) -> dict:
    return {
        "success": bool(ep["success"].any()),
        "return": float(ep["reward"].sum()),
        "source": "scripted",
        "kind": kind,
        "noise_std": noise,
    }


# Three episodes; the second one crosses the 100-step chunk boundary.
EPISODES = [
    (make_episode(0, 7, success_at=4), "reach-v3", "noisy", 0.25),
    (make_episode(1, 120, success_at=100), "push-v3", "perturbed", 0.5),
    (make_episode(2, 5), "reach-v3", "random", 0.0),
]
ATTRS = {"num_points": 16, "channels": 3, "seed": 7, "tasks": {"reach-v3": {"cameras": ["corner4"]}}}


def write_store(path: Path, episodes=EPISODES) -> None:
    w = EpisodeWriter.create(path, ATTRS)
    for ep, task, kind, noise in episodes:
        w.append_episode(ep, task, episode_meta(ep, kind, noise))


# --------------------------------------------------------------------------------------
# 1. the store: round trip


def test_round_trip_is_exact(tmp_path):
    path = tmp_path / "ds.zarr"
    write_store(path)
    d = EpisodeDataset(path)
    assert d.layout == "sodp3d" and inspect_path(path) == "sodp3d"
    assert d.n_episodes == 3
    np.testing.assert_array_equal(d.episode_ends, [7, 127, 132])
    assert d.episode_ends.dtype == np.int64
    np.testing.assert_array_equal(d.episode_starts(), [0, 7, 127])
    assert d.n_steps == 132
    assert d.keys == sorted(STEP_KEYS)
    assert d.episode_tasks == ["reach-v3", "push-v3", "reach-v3"]

    for i, (ep, *_rest) in enumerate(EPISODES):
        got = d.episode(i)
        assert sorted(got) == sorted(ep)
        for k, v in ep.items():
            assert got[k].dtype == v.dtype, k
            np.testing.assert_array_equal(got[k], v, err_msg=f"episode {i} {k}")
    np.testing.assert_array_equal(d.episode(-1)["action"], EPISODES[2][0]["action"])
    assert sorted(d.episode(1, keys=["reward"])) == ["reward"]
    with pytest.raises(IndexError):
        d.episode(3)
    for k in STEP_KEYS:
        np.testing.assert_array_equal(d.get(k), np.concatenate([ep[k] for ep, *_ in EPISODES]))
    with pytest.raises(UserError, match="no 'img'"):
        d.get("img")

    np.testing.assert_array_equal(d.episode_info("success"), [True, True, False])
    np.testing.assert_allclose(d.episode_info("return"), [float(ep["reward"].sum()) for ep, *_ in EPISODES])
    assert [str(k) for k in d.episode_info("kind")] == ["noisy", "perturbed", "random"]
    np.testing.assert_allclose(d.episode_info("noise_std"), [0.25, 0.5, 0.0])
    assert d.episode_info("nonexistent") is None

    attrs = d.attrs
    assert attrs["format"] == FORMAT and attrs["format_version"] == FORMAT_VERSION
    assert attrs["n_episodes"] == 3
    assert attrs["seed"] == 7 and attrs["tasks"] == ATTRS["tasks"]

    rows = {r["task"]: r for r in d.summary()}
    assert list(rows) == ["reach-v3", "push-v3"]
    r0, r1, r2 = (ep["reward"] for ep, *_ in EPISODES)
    assert rows["reach-v3"]["episodes"] == 2 and rows["reach-v3"]["steps"] == 12
    assert rows["reach-v3"]["success_rate"] == 0.5
    assert rows["reach-v3"]["mean_return"] == pytest.approx((float(r0.sum()) + float(r2.sum())) / 2, rel=1e-6)
    assert rows["push-v3"]["episodes"] == 1 and rows["push-v3"]["steps"] == 120
    assert rows["push-v3"]["success_rate"] == 1.0
    assert rows["push-v3"]["mean_return"] == pytest.approx(float(r1.sum()), rel=1e-6)


def test_append_rejects_inconsistent_episodes(tmp_path):
    path = tmp_path / "ds.zarr"
    write_store(path, EPISODES[:1])
    w = EpisodeWriter.open(path)
    ep = make_episode(5, 4)
    ragged = dict(ep, reward=ep["reward"][:3])
    with pytest.raises(ValueError, match="share a non-zero length"):
        w.append_episode(ragged, "reach-v3")
    with pytest.raises(ValueError, match="share a non-zero length"):
        w.append_episode({k: v[:0] for k, v in ep.items()}, "reach-v3")
    with pytest.raises(ValueError, match="differ from the dataset"):
        w.append_episode({k: v for k, v in ep.items() if k != "state"}, "reach-v3")
    assert EpisodeDataset(path).n_episodes == 1
    assert set(raw_lengths(path).values()) <= {1, 7}  # nothing half-appended


def test_failed_append_does_not_shift_later_episodes(tmp_path):
    """A per-step shape error found on a later key must not leave rows behind that
    shift the next episode of the same writer (data would no longer match episode_ends)."""
    path = tmp_path / "ds.zarr"
    w = EpisodeWriter.create(path, ATTRS)
    first = make_episode(0, 5)
    w.append_episode(first, "reach-v3", {"success": False})
    bad = make_episode(1, 6)
    bad["success"] = np.zeros((6, 2), dtype=bool)  # 'success' comes last: the other keys are appended first
    with pytest.raises(ValueError, match="'success' has shape"):
        w.append_episode(bad, "reach-v3", {"success": False})
    good = make_episode(2, 4)
    w.append_episode(good, "reach-v3", {"success": False})
    d = EpisodeDataset(path)
    assert d.n_episodes == 2
    np.testing.assert_array_equal(d.episode_ends, [5, 9])
    for k in STEP_KEYS:
        np.testing.assert_array_equal(d.episode(1)[k], good[k], err_msg=k)
    assert set(raw_lengths(path)["data/" + k] for k in STEP_KEYS) == {9}


def test_inspect_path_and_opening_other_things(tmp_path):
    assert inspect_path(tmp_path / "nothing") == "missing"
    (tmp_path / "empty").mkdir()
    assert inspect_path(tmp_path / "empty") == "missing"
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    assert inspect_path(tmp_path / "junk") == "foreign"
    (tmp_path / "file.zarr").write_bytes(b"\x00\x01")
    assert inspect_path(tmp_path / "file.zarr") == "foreign"
    make_dp3_store(tmp_path / "dp3.zarr", 2)
    assert inspect_path(tmp_path / "dp3.zarr") == "dp3"
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").create_group("data")
    assert inspect_path(tmp_path / "other.zarr") == "foreign"

    for name, match in [("nothing", "no dataset"), ("junk", "not a sodp3d or DP3"), ("other.zarr", "not a sodp3d or DP3")]:
        with pytest.raises(UserError, match=match):
            EpisodeDataset(tmp_path / name)
    for name, match in [("nothing", "no dataset"), ("junk", "not a sodp3d dataset"), ("dp3.zarr", "DP3-layout")]:
        with pytest.raises(UserError, match=match):
            EpisodeWriter.open(tmp_path / name)

    path = tmp_path / "ds.zarr"
    write_store(path, EPISODES[:1])
    zarr.open_group(str(path), mode="r+").attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(UserError, match="format version"):
        EpisodeWriter.open(path)


def test_a_store_that_is_not_whole_is_refused_in_one_line(tmp_path):
    """Readers check episode ends, array lengths and per-episode records; writers refuse a
    committed part that is not whole instead of cutting it."""
    def broken(name: str, edit) -> Path:
        path = tmp_path / name
        write_store(path)
        edit(zarr.open_group(str(path), mode="r+"))
        return path

    def decreasing(root):
        ends = root["meta/episode_ends"]
        ends[:] = np.asarray(ends[:])[[1, 0, 2]]

    cases = {
        "decreasing": (decreasing, "meta/episode_ends is not strictly increasing"),
        "short-array": (lambda root: root["data/action"].resize((100, 4)), "data/action is shorter than its 132"),
        "short-record": (lambda root: root["meta/episode_success"].resize((1,)),
                         "meta/episode_success is shorter than its 3 episodes"),
        "uncounted-ends": (lambda root: root.attrs.update(n_episodes=4), "holds 3 entries but the dataset commits 4"),
    }
    for name, (edit, message) in cases.items():
        path = broken(f"{name}.zarr", edit)
        with pytest.raises(UserError, match=message) as e:
            EpisodeDataset(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value)
        with pytest.raises(UserError, match=message):
            EpisodeWriter.open(path)  # nothing is cut from a store that is corrupt, not cut short

    # Frames past the last committed episode: what two writers left (420 frames, ends up to 360).
    path = broken("tail.zarr", lambda root: root["data/action"].append(np.zeros((5, 4), np.float32)))
    with pytest.raises(UserError, match=r"5 frames lie past its last committed episode \(step 132\)"):
        EpisodeDataset(path)
    # A DP3-layout store with steps past its last episode end.
    dp3 = tmp_path / "dp3.zarr"
    make_dp3_store(dp3, 3)
    zarr.open_group(str(dp3), mode="r+")["data/action"].append(np.zeros((2, 4), np.float32))
    with pytest.raises(UserError, match=r"2 steps past the last of meta/episode_ends \(19\)"):
        EpisodeDataset(dp3)


# --------------------------------------------------------------------------------------
# 2. the store: crash safety


def _interrupted_append(path: Path, ep: dict, keys) -> None:
    """What a kill leaves behind mid-append: some arrays grown, no commit."""
    root = zarr.open_group(str(path), mode="r+")
    for k in keys:
        root["data"][k].append(np.asarray(ep[k]))
    ends = root["meta/episode_ends"]
    ends.append(np.array([int(ends[-1]) + len(ep["action"])], dtype=np.int64))
    root["meta/episode_task"].append(np.array(["push-v3"]))
    root["meta/episode_success"].append(np.array([True]))


@pytest.mark.parametrize("grown", [["point_cloud", "agent_pos"], list(STEP_KEYS)], ids=["some-keys", "all-keys"])
def test_kill_mid_append_loses_only_that_episode(tmp_path, grown):
    clean = tmp_path / "clean.zarr"
    write_store(clean)
    path = tmp_path / "ds.zarr"
    write_store(path, EPISODES[:2])
    committed = snapshot(path)
    third, task, kind, noise = EPISODES[2]

    _interrupted_append(path, make_episode(99, 11), grown)
    lengths = raw_lengths(path)
    assert lengths["data/point_cloud"] == 127 + 11 and lengths["meta/episode_ends"] == 3  # really half-written

    # A reader refuses the store in one line that says what to do; nothing is changed.
    with pytest.raises(UserError, match=r"11 frames lie past its last committed episode \(step 127\).*"
                                        r"run the same sodp3d collect command again"):
        EpisodeDataset(path)
    assert raw_lengths(path) == lengths

    w = EpisodeWriter.open(path)  # repairs: every array back to the committed length
    assert w.n_episodes == 2 and w.dropped_frames == 11
    d = EpisodeDataset(path)
    assert d.n_episodes == 2 and d.n_steps == 127
    assert d.summary()[0]["episodes"] == 1 and d.summary()[1]["episodes"] == 1
    lengths = raw_lengths(path)
    assert {lengths[f"data/{k}"] for k in STEP_KEYS} == {127}
    assert {v for k, v in lengths.items() if k.startswith("meta/")} == {2}
    assert_same(snapshot(path), committed)

    w.append_episode(third, task, episode_meta(third, kind, noise))
    assert_same(snapshot(path), snapshot(clean))
    assert raw_lengths(path) == raw_lengths(clean)
    assert EpisodeDataset(path).attrs == EpisodeDataset(clean).attrs


def test_kill_during_the_first_episode_can_resume(tmp_path):
    """A kill while the very first episode creates its arrays leaves some of them;
    re-opening must still allow appending (the store has 0 committed episodes)."""
    path = tmp_path / "ds.zarr"
    EpisodeWriter.create(path, ATTRS)
    root = zarr.open_group(str(path), mode="r+")
    ep = make_episode(0, 7, success_at=4)
    arr = root["data"].create_array("point_cloud", shape=(0, 16, 3), chunks=(100, 16, 3), dtype="float32")
    arr.append(ep["point_cloud"])
    with pytest.raises(UserError, match="7 frames lie past its last committed episode"):
        EpisodeDataset(path)

    w = EpisodeWriter.open(path)
    assert w.dropped_frames == 7 and EpisodeDataset(path).n_episodes == 0
    w.append_episode(ep, "reach-v3", episode_meta(ep, "noisy", 0.25))
    d = EpisodeDataset(path)
    assert d.n_episodes == 1
    for k in STEP_KEYS:
        np.testing.assert_array_equal(d.episode(0)[k], ep[k], err_msg=k)


# --------------------------------------------------------------------------------------
# 5. DP3's layout


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_reads_dp3_layout(tmp_path, zarr_format):
    path = tmp_path / "dp3.zarr"
    arrays = make_dp3_store(path, zarr_format)
    assert inspect_path(path) == "dp3"
    d = EpisodeDataset(path)
    assert d.layout == "dp3"
    assert d.n_episodes == 3 and d.n_steps == 19
    np.testing.assert_array_equal(d.episode_ends, [6, 10, 19])
    assert d.keys == ["action", "agent_pos", "point_cloud", "state"]
    np.testing.assert_array_equal(d.get("agent_pos"), arrays["state"])
    np.testing.assert_array_equal(d.get("state"), arrays["full_state"])
    np.testing.assert_array_equal(d.get("point_cloud"), arrays["point_cloud"])
    np.testing.assert_array_equal(d.get("action"), arrays["action"])
    for i, (s, e) in enumerate([(0, 6), (6, 10), (10, 19)]):
        ep = d.episode(i)
        np.testing.assert_array_equal(ep["agent_pos"], arrays["state"][s:e])
        np.testing.assert_array_equal(ep["state"], arrays["full_state"][s:e])
        np.testing.assert_array_equal(ep["point_cloud"], arrays["point_cloud"][s:e])
        np.testing.assert_array_equal(ep["action"], arrays["action"][s:e])
    assert d.episode_tasks is None
    assert d.episode_info("success") is None
    assert d.summary() == [
        {"task": "(unnamed)", "episodes": 3, "steps": 19, "success_rate": None, "mean_return": None,
         "padded_observations": None}
    ]


def test_reads_dp3_layout_without_full_state(tmp_path):
    path = tmp_path / "dp3.zarr"
    arrays = make_dp3_store(path, 3, lengths=(3, 2), full_state=False)
    d = EpisodeDataset(path)
    assert d.keys == ["action", "agent_pos", "point_cloud"]
    np.testing.assert_array_equal(d.episode(1)["agent_pos"], arrays["state"][3:5])


def test_dp3_layout_with_bad_episode_ends_is_a_user_error(tmp_path):
    path = tmp_path / "dp3.zarr"
    make_dp3_store(path, 2, lengths=(6, 4, 9))
    root = zarr.open_group(str(path), mode="r+")
    root["meta/episode_ends"][:] = [6, 40, 19]  # longer than the data, and not increasing
    with pytest.raises(UserError, match="episode_ends"):
        EpisodeDataset(path)


def with_colour(path: Path, zarr_format: int, colour: np.ndarray) -> np.ndarray:
    """Replace a DP3 store's clouds by (T, N, 6) ones with ``colour`` (T, N, 3); returns them."""
    root = zarr.open_group(str(path), mode="r+", zarr_format=zarr_format)
    xyz = np.asarray(root["data/point_cloud"][:])[..., :3]
    cloud = np.concatenate([xyz, colour.astype(np.float32)], axis=2)
    del root["data"]["point_cloud"]
    root["data"].create_array("point_cloud", data=cloud, chunks=(5,) + cloud.shape[1:])
    return cloud


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_dp3_colour_in_0_255_is_read_in_0_1(tmp_path, zarr_format):
    """DP3 stores colour as the image's 0-255: every way of reading the clouds (whole
    array, episodes, training windows from memory or from zarr) sees it in [0, 1],
    xyz untouched; the store says its clouds are in DP3's frame."""
    from sodp3d.data.windows import WindowDataset

    path = tmp_path / "dp3.zarr"
    make_dp3_store(path, zarr_format)
    rng = np.random.default_rng(0)
    cloud = with_colour(path, zarr_format, rng.integers(0, 256, (19, 512, 3)))
    assert cloud[..., 3:].max() > 200  # stored as 0-255
    d = EpisodeDataset(path)
    assert d.colour_scaled and d.cloud_frame == "dp3"
    expected = cloud.copy()
    expected[..., 3:] /= 255.0
    np.testing.assert_allclose(d.get("point_cloud"), expected, rtol=1e-6)
    np.testing.assert_array_equal(d.get("point_cloud")[..., :3], cloud[..., :3])
    np.testing.assert_allclose(d.episode(1)["point_cloud"], expected[6:10], rtol=1e-6)
    assert d.stored_name("point_cloud").endswith("point_cloud")
    for fraction in (0.5, 0.0):  # in memory, and read from zarr window by window
        windows = WindowDataset([str(path)], ["point_cloud"], horizon=4, n_obs_steps=2, n_action_steps=2,
                                memory_fraction=fraction)
        assert windows.in_memory == (fraction > 0)
        batch = windows.get(np.arange(len(windows)))["obs"]["point_cloud"]
        assert 0.0 <= batch[..., 3:].min() and batch[..., 3:].max() <= 1.0 and batch[..., 3:].max() > 0.75
        row = windows.index[5]
        np.testing.assert_allclose(batch[5, 0], expected[max(row[1], row[2])], rtol=1e-6)


def test_dp3_colour_already_in_0_1_is_kept_and_other_ranges_refused(tmp_path):
    path = tmp_path / "dp3.zarr"
    make_dp3_store(path, 3)
    cloud = with_colour(path, 3, np.random.default_rng(1).uniform(0, 1, (19, 512, 3)))
    d = EpisodeDataset(path)
    assert not d.colour_scaled
    np.testing.assert_array_equal(d.get("point_cloud"), cloud)
    with_colour(path, 3, np.full((19, 512, 3), 300.0))
    with pytest.raises(UserError, match="0-255") as e:
        EpisodeDataset(path)
    assert "\n" not in str(e.value)


def test_our_stores_are_in_the_world_frame(tmp_path):
    path = tmp_path / "ds.zarr"
    write_store(path, EPISODES[:1])
    d = EpisodeDataset(path)
    assert d.cloud_frame == "world" and not d.colour_scaled
    make_dp3_store(tmp_path / "dp3.zarr", 2)
    assert EpisodeDataset(tmp_path / "dp3.zarr").cloud_frame == "dp3"
