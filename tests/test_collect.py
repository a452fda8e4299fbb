"""Tests of `sodp3d collect` (sodp3d.envs.collect).

Same seed -> same bytes, a SIGKILLed collection resumes to the same dataset as an
uninterrupted one, extension keeps what is there, the recorded episodes are sub-optimal
and self-consistent, every bad input is one line on stderr, exit status 2, nothing
written, and run(cfg) / render(record) give the record and the text the CLI prints.

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
from store_kit import assert_one_line_error, assert_same, make_dp3_store, raw_lengths, snapshot

os.environ.setdefault("MUJOCO_GL", "egl")

from sodp3d.cli import main  # noqa: E402
from sodp3d.data.store import STEP_KEYS, EpisodeDataset  # noqa: E402
from sodp3d.envs import collect as collect_module  # noqa: E402
from sodp3d.envs import workers  # noqa: E402

FAST = ["workers=1", "env.metaworld.resolution=[48,48]", "env.metaworld.num_points=64"]
N_FAST = 64


# --------------------------------------------------------------------------------------
# helpers


pytestmark = pytest.mark.usefixtures("close_cached_envs")


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
    leaked = list(workers._ENVS)  # the fixture below starts each test with an empty cache
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


# --------------------------------------------------------------------------------------
# 9. the command: run(cfg) -> record, render(record) -> the text the CLI prints


def test_run_returns_a_record_and_render_prints_counts_and_table(tmp_path, capsys):
    import json

    from sodp3d.config import compose

    out = tmp_path / "ds.zarr"
    args = ["task=[reach-v3,push-v3]", "episodes=1", "episode_length=6", "seed=0", *FAST]
    cfg = compose("collect", [f"out={out}", *args])
    record = collect_module.run(cfg)
    assert json.loads(json.dumps(record)) == record  # JSON-serialisable as it is
    d = EpisodeDataset(out)
    assert record["kind"] == "collect" and record["out"] == str(out)
    assert (record["new_episodes"], record["skipped"], record["steps"]) == (2, 0, 12)
    assert (record["episodes"], record["total_steps"]) == (2, 12)
    assert record["seconds"] > 0
    assert record["per_task"] == d.summary()
    assert [r["task"] for r in record["per_task"]] == ["reach-v3", "push-v3"]

    lines = collect_module.render(record).split("\n")
    assert lines[0] == ""
    assert lines[1].startswith(f"2 episodes, 12 steps in {out} (2 new, 0 already there; ")
    assert lines[1].endswith(" steps/s)")
    assert lines[2:] == collect_module.dataset_table(d.summary()).split("\n")
    assert lines[2] == "| task | episodes | steps | success rate | mean return | padded obs |"
    assert len(lines) == 6 and lines[4].startswith("| reach-v3 | 1 | 6 | ") and lines[5].startswith("| push-v3 | 1 | 6 | ")

    # Nothing left to collect (so 0 steps/s both ways): the CLI prints exactly render(record).
    again = collect_module.run(cfg)
    assert (again["new_episodes"], again["skipped"], again["steps"], again["episodes"]) == (0, 2, 0, 2)
    capsys.readouterr()
    assert main(["collect", f"out={out}", *args]) == 0
    printed = capsys.readouterr().out
    assert printed == collect_module.render(again) + "\n"
    assert "(0 new, 2 already there; 0 steps/s)" in printed


def test_dataset_table():
    rows = [
        {"task": "reach-v3", "episodes": 2, "steps": 10, "success_rate": 0.5, "mean_return": 12.345,
         "padded_observations": 3},
        {"task": "(unnamed)", "episodes": 3, "steps": 19, "success_rate": None, "mean_return": None,
         "padded_observations": None},
    ]
    assert collect_module.dataset_table(rows) == (
        "| task | episodes | steps | success rate | mean return | padded obs |\n"
        "|---|---:|---:|---:|---:|---:|\n"
        "| reach-v3 | 2 | 10 | 50% | 12.3 | 3 |\n"
        "| (unnamed) | 3 | 19 | - | - | - |"
    )
