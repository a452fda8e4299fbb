"""Tests of the episode store (sodp3d.data.store) and of `sodp3d collect`.

Store: exact round trips, commit-based crash safety (a kill mid-append loses at most the
episode in progress, and a re-opened writer repairs the arrays), reading DP3's layout in
zarr v2 and v3. Collector: same seed -> same bytes, a SIGKILLed collection resumes to
the same dataset as an uninterrupted one, extension keeps what is there, the recorded
episodes are sub-optimal and self-consistent, and every bad input is one line on stderr,
exit status 2, nothing written.

Collections are kept small (short episodes, 48x48 depth images, 64 points, one
in-process worker) so the whole file runs in about a minute on two cores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

os.environ.setdefault("MUJOCO_GL", "egl")

from sodp3d.cli import main  # noqa: E402
from sodp3d.data.store import (  # noqa: E402
    FORMAT,
    FORMAT_VERSION,
    STEP_KEYS,
    EpisodeDataset,
    EpisodeWriter,
    inspect_path,
)
from sodp3d.envs import collect as collect_module  # noqa: E402
from sodp3d.errors import UserError  # noqa: E402

FAST = ["workers=1", "env.metaworld.resolution=[48,48]", "env.metaworld.num_points=64"]
N_FAST = 64


# --------------------------------------------------------------------------------------
# helpers


@pytest.fixture(autouse=True)
def _close_cached_envs():
    """Keep tests independent: close environments a failed collect left in the cache."""
    yield
    for env in collect_module._ENVS.values():
        env.close()
    collect_module._ENVS.clear()


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


def snapshot(path) -> dict:
    """Everything a reader sees of the committed episodes."""
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
    root = zarr.open_group(str(path), mode="r")
    out = {f"data/{k}": root["data"][k].shape[0] for k in root["data"].array_keys()}
    out.update({f"meta/{k}": root["meta"][k].shape[0] for k in root["meta"].array_keys()})
    return out


def tree_state(path) -> dict[str, bytes]:
    """The bytes of every file under path (or of path itself), to show nothing changed."""
    p = Path(path)
    if p.is_file():
        return {"": p.read_bytes()}
    return {str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()}


def collect_cli(capsys, out, *args) -> tuple[int, str, str]:
    rc = main(["collect", f"out={out}", *args])
    o, e = capsys.readouterr()
    return rc, o, e


def assert_one_line_error(rc: int, out: str, err: str, command: str = "collect") -> str:
    assert rc == 2, (out, err)
    assert "Traceback" not in out + err
    assert err.endswith("\n") and err.count("\n") == 1, f"expected one line on stderr, got {err!r}"
    assert err.startswith(f"sodp3d {command}: error: "), err
    return err.strip()


def make_dp3_store(path: Path, zarr_format: int, lengths=(6, 4, 9), full_state: bool = True) -> dict:
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

    d = EpisodeDataset(path)
    assert d.n_episodes == 2 and d.n_steps == 127
    assert_same(snapshot(path), committed)
    assert d.summary()[0]["episodes"] == 1 and d.summary()[1]["episodes"] == 1

    w = EpisodeWriter.open(path)  # repairs: every array back to the committed length
    assert w.n_episodes == 2
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
    assert EpisodeDataset(path).n_episodes == 0

    w = EpisodeWriter.open(path)
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


# --------------------------------------------------------------------------------------
# 3. reproducibility


def test_same_seed_same_data(tmp_path, capsys):
    common = ["task=[reach-v3,push-v3]", "episodes=2", "episode_length=15", *FAST]
    a, b, c = tmp_path / "a.zarr", tmp_path / "b.zarr", tmp_path / "c.zarr"
    for out, seed in [(a, 0), (b, 0), (c, 1)]:
        rc, o, e = collect_cli(capsys, out, *common, f"seed={seed}")
        assert rc == 0, e
        assert "4 episodes, 60 steps" in o and "4 new, 0 already there" in o
    sa, sb, sc = snapshot(a), snapshot(b), snapshot(c)
    assert sorted(k for k in sa if k.startswith("data/")) == [f"data/{k}" for k in sorted(STEP_KEYS)]
    assert sa["data/point_cloud"].shape == (60, N_FAST, 3)
    assert sa["data/point_cloud"].dtype == np.float32 and sa["data/success"].dtype == np.bool_
    assert sa["data/state"].shape == (60, 39) and sa["data/agent_pos"].shape == (60, 9)
    assert sa["data/action"].shape == (60, 4) and sa["data/reward"].shape == (60,)
    assert sa["episode_task"] == ["reach-v3", "push-v3", "reach-v3", "push-v3"]
    assert_same(sa, sb)
    assert not np.array_equal(sa["data/action"], sc["data/action"])
    assert not np.array_equal(sa["data/point_cloud"], sc["data/point_cloud"])

    attrs = EpisodeDataset(a).attrs
    assert attrs["seed"] == 0 and EpisodeDataset(c).attrs["seed"] == 1
    assert attrs["num_points"] == N_FAST and attrs["channels"] == 3
    assert sorted(attrs["tasks"]) == ["push-v3", "reach-v3"]
    reach = attrs["tasks"]["reach-v3"]
    assert reach["episode_length"] == 15 and reach["height"] == 48 and reach["width"] == 48
    assert reach["source"] == "scripted" and reach["cameras"] == ["corner4"]
    assert "zarr" in attrs["versions"] and "numpy" in attrs["versions"]


# --------------------------------------------------------------------------------------
# 4. kill and resume (a real process, SIGKILLed)


def _cli_cmd(out: Path) -> list[str]:
    return [
        sys.executable, "-m", "sodp3d.cli", "collect", "task=[reach-v3,push-v3]", "episodes=4",
        f"out={out}", "episode_length=30", "seed=3", *FAST,
    ]


def _spawn(cmd, log: Path) -> subprocess.Popen:
    env = dict(os.environ, MUJOCO_GL="egl")
    fh = open(log, "wb")
    try:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
    finally:
        fh.close()


def _committed(path: Path) -> int:
    try:
        return EpisodeDataset(path).n_episodes
    except Exception:  # not there yet, or being created
        return -1


def test_killed_collection_resumes_without_loss(tmp_path, capsys):
    killed, reference = tmp_path / "killed.zarr", tmp_path / "reference.zarr"
    ref_proc = _spawn(_cli_cmd(reference), tmp_path / "reference.log")  # runs alongside
    proc = _spawn(_cli_cmd(killed), tmp_path / "killed.log")
    try:
        deadline = time.monotonic() + 120
        while _committed(killed) < 2:
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "no episode was committed in 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    k = EpisodeDataset(killed).n_episodes
    assert 2 <= k < 8, f"{k} episodes committed: the kill came too late to test resuming"
    before = snapshot(killed)

    env = dict(os.environ, MUJOCO_GL="egl")
    resumed = subprocess.run(_cli_cmd(killed), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{8 - k} new, {k} already there" in resumed.stdout
    assert ref_proc.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-2000:]

    after, ref = snapshot(killed), snapshot(reference)
    assert EpisodeDataset(killed).n_episodes == 8
    assert_same(after, ref)
    # the episodes committed before the kill were kept, not redone differently
    n = int(before["episode_ends"][-1])
    np.testing.assert_array_equal(after["data/point_cloud"][:n], before["data/point_cloud"])
    # no left-over uncommitted rows anywhere
    assert set(raw_lengths(killed).values()) == {8, 8 * 30}

    # a complete collection re-run appends nothing
    rc, o, e = collect_cli(capsys, reference, "task=[reach-v3,push-v3]", "episodes=4", "episode_length=30", "seed=3", *FAST)
    assert rc == 0, e
    assert "0 new, 8 already there" in o
    assert EpisodeDataset(reference).n_episodes == 8
    assert_same(snapshot(reference), ref)


# --------------------------------------------------------------------------------------
# 7. sub-optimal data, self-consistent records


def test_scripted_data_is_suboptimal_and_consistent(tmp_path, capsys):
    out = tmp_path / "ds.zarr"
    rc, o, e = collect_cli(capsys, out, "task=reach-v3", "episodes=6", "episode_length=15", "seed=0",
                           "scripted.random_share=0.5", *FAST)
    assert rc == 0, e
    d = EpisodeDataset(out)
    assert d.n_episodes == 6
    np.testing.assert_array_equal(np.diff(np.concatenate([[0], d.episode_ends])), [15] * 6)
    kinds = [str(k) for k in d.episode_info("kind")]
    assert set(kinds) <= {"noisy", "perturbed", "random"}
    assert "random" in kinds and len(set(kinds)) >= 2, kinds
    assert [str(s) for s in d.episode_info("source")] == ["scripted"] * 6
    noise = d.episode_info("noise_std")
    assert np.all((noise >= 0) & (noise <= 1)) and len(np.unique(noise)) == 6
    returns, successes = d.episode_info("return"), d.episode_info("success")
    assert returns.shape == (6,) and successes.shape == (6,) and successes.dtype == np.bool_
    for i in range(6):
        ep = d.episode(i)
        for k in STEP_KEYS:
            assert len(ep[k]) == 15, k
        assert ep["success"].dtype == np.bool_ and ep["reward"].shape == (15,)
        assert returns[i] == pytest.approx(float(ep["reward"].astype(np.float64).sum()), rel=1e-5, abs=1e-4)
        assert bool(successes[i]) == bool(ep["success"].any())
        assert np.all(np.abs(ep["action"]) <= 1.0)
        assert np.all(np.isfinite(ep["point_cloud"]))
    # random episodes really act at random: their actions are not the scripted ones
    rnd = [i for i, k in enumerate(kinds) if k == "random"]
    scripted = [i for i, k in enumerate(kinds) if k != "random"]
    if scripted:
        assert not any(np.array_equal(d.episode(i)["action"], d.episode(j)["action"]) for i in rnd for j in scripted)
    row = d.summary()[0]
    assert row["episodes"] == 6 and row["steps"] == 90
    assert row["mean_return"] == pytest.approx(float(returns.mean()), rel=1e-5)
    assert row["success_rate"] == pytest.approx(float(successes.mean()))


# --------------------------------------------------------------------------------------
# 8. extending a dataset


def test_extend_keeps_what_is_there_and_refuses_other_settings(tmp_path, capsys):
    out, fresh = tmp_path / "ds.zarr", tmp_path / "fresh.zarr"
    common = ["task=[reach-v3,push-v3]", "episode_length=15", "seed=5", *FAST]
    rc, o, e = collect_cli(capsys, out, "episodes=2", *common)
    assert rc == 0, e
    first = snapshot(out)
    rc, o, e = collect_cli(capsys, out, "episodes=3", *common)
    assert rc == 0, e
    assert "2 new, 4 already there" in o
    d = EpisodeDataset(out)
    assert {r["task"]: r["episodes"] for r in d.summary()} == {"reach-v3": 3, "push-v3": 3}
    ext = snapshot(out)
    n = int(first["episode_ends"][-1])
    for k, v in first.items():
        if k.startswith("data/"):
            np.testing.assert_array_equal(ext[k][:n], v, err_msg=k)
        elif isinstance(v, np.ndarray):
            np.testing.assert_array_equal(ext[k][: len(v)], v, err_msg=k)
        else:
            assert ext[k][: len(v)] == v
    # extending equals collecting 3 per task at once
    rc, o, e = collect_cli(capsys, fresh, "episodes=3", *common)
    assert rc == 0, e
    assert_same(ext, snapshot(fresh))

    stored = tree_state(out)
    rc, o, e = collect_cli(capsys, out, "episodes=4", *common, "env.metaworld.num_points=32")
    msg = assert_one_line_error(rc, o, e)
    assert str(out) in msg and "64" in msg and "32" in msg
    assert tree_state(out) == stored
    rc, o, e = collect_cli(capsys, out, "episodes=4", *common, "env.metaworld.resolution=[40,40]")
    msg = assert_one_line_error(rc, o, e)
    assert "height" in msg and "width" in msg
    assert tree_state(out) == stored
    # Another seed or another noise recipe would make a mix that is neither collection.
    for other in ("seed=1", "scripted.random_share=0.5"):
        rc, o, e = collect_cli(capsys, out, "episodes=4", *common, other)
        msg = assert_one_line_error(rc, o, e)
        assert other.split("=")[0].split(".")[0] in msg
        assert tree_state(out) == stored
    assert EpisodeDataset(out).n_episodes == 6


# --------------------------------------------------------------------------------------
# 6. bad input: one line, status 2, nothing written

BASE = ["task=reach-v3", "episodes=1", "episode_length=10", *FAST]


def _with(args: list[str], **repl: str) -> list[str]:
    out = [a for a in args if a.split("=")[0] not in repl]
    return out + [f"{k}={v}" if v is not None else k for k, v in repl.items()]


BAD_INPUT = {
    "unknown-task": (_with(BASE, task="reach-v9"), ["'reach-v9'", "did you mean 'reach-v3'", "reach-wall-v3", "mt10"]),
    "unknown-task-in-list": (_with(BASE, task="[reach-v3,nope]"), ["'nope'", "valid tasks:", "adroit-door"]),
    "unknown-set": (_with(BASE, task="mt11"), ["'mt11'", "valid sets: mt10, mt50, adroit"]),
    "empty-crop": (
        BASE + ["env.metaworld.crop.low=[5,5,5]", "env.metaworld.crop.high=[6,6,6]"],
        ["reach-v3", "[5.0, 5.0, 5.0]", "[6.0, 6.0, 6.0]", "crop"],
    ),
    "inverted-crop": (BASE + ["env.metaworld.crop.low=[1,1,1]", "env.metaworld.crop.high=[0,0,0]"], ["crop"]),
    "episodes-0": (_with(BASE, episodes="0"), ["episodes", "0"]),
    "episodes-negative": (_with(BASE, episodes="-3"), ["episodes", "-3"]),
    "episodes-float": (_with(BASE, episodes="1.5"), ["episodes"]),
    "episodes-empty": (_with(BASE, episodes=""), ["episodes"]),
    "episode-length-0": (_with(BASE, episode_length="0"), ["episode_length"]),
    "workers-0": (_with(BASE, workers="0"), ["workers"]),
    "num-points-0": (BASE + ["env.metaworld.num_points=0"], ["num_points"]),
    "scripted-adroit": (_with(BASE, task="adroit-door", source="scripted"), ["adroit-door", "source=sac"]),
    "unknown-source": (_with(BASE, source="teleop"), ["'teleop'", "scripted", "sac"]),
    "bad-random-share": (BASE + ["scripted.random_share=2"], ["random_share"]),
    "unknown-key": (BASE + ["nonexistent_key=3"], ["bad override", "nonexistent_key"]),
    "unparsable-override": (_with(BASE, task="[reach-v3"), ["bad override"]),
    "unknown-flag": (BASE + ["--fast"], ["--fast"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case):
    args, expected = BAD_INPUT[case]
    out = tmp_path / "out.zarr"
    rc, o, e = collect_cli(capsys, out, *args)
    msg = assert_one_line_error(rc, o, e)
    for part in expected:
        assert part in msg, (part, msg)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_failed_preflight_names_the_task_and_releases_environments(tmp_path, capsys):
    """A crop that empties only the second task's cloud: the message names that task's
    own setting, nothing is written, and no rendering environment stays open in the
    process (each holds a GL context; the collector's cache must be emptied)."""
    out = tmp_path / "out.zarr"
    rc, o, e = collect_cli(capsys, out, *_with(BASE, task="[reach-v3,push-v3]"),
                           "+env.metaworld.tasks.push-v3.crop={low:[5,5,5],high:[6,6,6]}")
    msg = assert_one_line_error(rc, o, e)
    assert "push-v3" in msg and "env.metaworld.tasks.push-v3.crop" in msg and "reach-v3" not in msg
    assert not out.exists()
    leaked = list(collect_module._ENVS)  # the fixture below starts each test with an empty cache
    assert leaked == [], f"environments left open after a failed collect: {[k[0] for k in leaked]}"


def test_missing_out_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(["collect", *BASE])
    o, e = capsys.readouterr()
    assert "out=" in assert_one_line_error(rc, o, e)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["directory", "file", "dp3-v2", "dp3-v3"])
def test_refuses_out_paths_holding_something_else(tmp_path, capsys, kind):
    out = tmp_path / "out.zarr"
    if kind == "directory":
        out.mkdir()
        (out / "thesis.txt").write_bytes(np.random.default_rng(0).bytes(300))
    elif kind == "file":
        out.write_bytes(np.random.default_rng(1).bytes(300))
    else:
        make_dp3_store(out, int(kind[-1]))
    before = tree_state(out)
    rc, o, e = collect_cli(capsys, out, *BASE)
    msg = assert_one_line_error(rc, o, e)
    assert str(out) in msg and "not a sodp3d dataset" in msg
    if kind.startswith("dp3"):
        assert "DP3" in msg
    assert tree_state(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.zarr"]


def test_unknown_command(capsys):
    rc = main(["nope"])
    o, e = capsys.readouterr()
    msg = assert_one_line_error(rc, o, e, command="nope")
    assert "unknown command 'nope'" in msg and "collect" in msg


def test_help(capsys):
    for argv in (["--help"], [], ["-h"]):
        assert main(argv) == 0
        o, e = capsys.readouterr()
        assert o.startswith("usage: sodp3d <command>") and "collect" in o and "commands:" in o
        assert e == ""
    assert main(["collect", "--help"]) == 0
    o, e = capsys.readouterr()
    assert o.startswith("usage: sodp3d collect task=")
    for key in ("task:", "episodes:", "out:", "source:", "seed:", "workers:", "episode_length:",
                "random_share:", "metaworld:", "num_points:"):
        assert key in o, key
    assert e == ""


def test_padded_observations_are_recorded_per_episode(tmp_path, capsys):
    """A crop that keeps fewer points than N pads every observation, and the dataset says so."""
    out = tmp_path / "pad.zarr"
    rc = main(["collect", "task=reach-v3", "episodes=1", f"out={out}", "episode_length=6", "workers=1",
               "env.metaworld.resolution=[24,24]", "env.metaworld.num_points=600"])
    assert rc == 0
    d = EpisodeDataset(out)
    assert list(d.episode_info("padded")) == [6]
    assert d.summary()[0]["padded_observations"] == 6
    assert "| 6 |" in capsys.readouterr().out
    clouds = d.get("point_cloud")
    # Cyclic repetition: fewer distinct points than N, none invented.
    assert len(np.unique(clouds[0], axis=0)) < 600
