"""sodp3d viz: rollouts as the policy sees them (GIF, MP4, HTML, Rerun), dataset views, bad input."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from sodp3d.cli import main
from omegaconf import OmegaConf

from sodp3d.envs import default_env_config, make_env
from sodp3d.envs.suites import make_suite_env
from sodp3d.policy import DiffusionPolicy, PolicyConfig
from sodp3d.viz import (HOLD_SECONDS, dataset_figure, pick_episodes, record_rollout, rollout_gif, rollout_html,
                        rollout_images, rollout_mp4, rollout_rrd)

ENV = OmegaConf.merge(default_env_config(),
                      {"metaworld": {"resolution": [40, 40], "num_points": 48, "episode_length": 40}})
FAST_ENV = ["env.metaworld.resolution=[40,40]", "env.metaworld.num_points=48", "env.metaworld.episode_length=40"]


@pytest.fixture(scope="module")
def policy() -> DiffusionPolicy:
    """An untrained tiny policy: its actions are arbitrary but move the arm."""
    torch.manual_seed(0)
    cfg = PolicyConfig(shape_meta={"point_cloud": [48, 3], "agent_pos": [9], "action": [4]}, unet="tiny",
                       num_inference_steps=3)
    return DiffusionPolicy(cfg).eval()


@pytest.fixture(scope="module")
def record(policy):
    return record_rollout(policy, "reach-v3", ENV, seed=3)


@pytest.fixture(scope="module")
def one_episode(tmp_path_factory):
    """A collected dataset: one reach-v3 episode of 40 steps, 48 points."""
    data = tmp_path_factory.mktemp("data") / "d.zarr"
    assert main(["collect", "task=reach-v3", "episodes=1", f"out={data}", "workers=1", *FAST_ENV]) == 0
    return data


def read_back(path) -> dict[str, dict[str, list]]:
    """A .rrd read with Rerun's own loader: per entity, per logged row, its step, and its
    point count / scalars / first positions and colours."""
    from rerun.chunk import RrdReader

    out: dict[str, dict[str, list]] = {}
    for chunk in RrdReader(path).stream().to_chunks():
        batch = chunk.to_record_batch()
        if "step" not in batch.schema.names:
            continue
        assert chunk.timeline_names == ["step"]  # the step timeline only (no wall-clock log_time)
        rows = out.setdefault(str(chunk.entity_path), {"step": [], "points": [], "values": [], "xyz": [], "rgb": []})
        rows["step"] += batch.column("step").to_numpy().tolist()
        names = batch.schema.names
        if "Points3D:positions" in names:
            rows["points"] += batch.column("Points3D:positions").value_lengths().to_numpy().tolist()
            rows["xyz"] += [np.array(p, np.float32) for p in batch.column("Points3D:positions").to_pylist()]
            packed = [np.array(c, np.uint32) for c in batch.column("Points3D:colors").to_pylist()]
            rows["rgb"] += [np.stack([(c >> 24) & 255, (c >> 16) & 255, (c >> 8) & 255], 1) for c in packed]
        if "LineStrips3D:strips" in names:
            rows["points"] += [sum(len(s) for s in row) for row in batch.column("LineStrips3D:strips").to_pylist()]
        if "Scalars:scalars" in names:
            rows["values"] += batch.column("Scalars:scalars").to_pylist()
    for rows in out.values():  # chunks may arrive in any order: sort rows by step
        order = np.argsort(rows["step"], kind="stable")
        for k, v in rows.items():
            rows[k] = [v[i] for i in order] if v else v
    return out


def test_record_follows_the_simulator(policy, record):
    # One frame per decision: 40 steps in chunks of Ta = 8.
    assert len(record.frames) == 5 and record.steps == 40
    assert [f.step for f in record.frames] == [0, 8, 16, 24, 32]
    # The executed path is the hand as the simulator has it: replaying the episode's
    # seed and actions is not possible from the record, but every decision's observed
    # agent_pos (hand xyz first) must sit on the recorded path at that step.
    env = make_env("reach-v3", ENV, n_obs_steps=2, n_action_steps=8)
    obs, _ = env.reset(seed=3)
    assert np.allclose(record.executed[0], obs["agent_pos"][-1, :3], atol=1e-6)
    env.close()
    for f in record.frames:
        assert f.cloud.shape == (48, 3)
        assert f.executed_upto == f.step + 1
    assert np.abs(np.diff(record.executed, axis=0)).sum() > 0.01  # the arm moved
    # Every predicted path starts at the hand and has Tp - To + 1 steps after it.
    for f in record.frames:
        assert f.predicted.shape == (12 - 2 + 2, 3)
        assert np.allclose(f.predicted[0], record.executed[f.executed_upto - 1])


def test_predicted_path_is_where_the_actions_steer_the_hand():
    env = make_suite_env("reach-v3")
    env.reset(seed=1)
    for _ in range(5):
        env.step(np.zeros(4, np.float32))
    actions = np.tile(np.array([0.5, -0.3, 0.4, 0.0], np.float32), (12, 1))
    predicted = env.predicted_path(actions)
    start = env.end_effector()
    for a in actions:
        env.step(a)
    moved, planned = env.end_effector() - start, predicted[-1] - predicted[0]
    # The hand follows the commanded (mocap) path with some lag, in the same direction.
    assert np.dot(moved, planned) / (np.linalg.norm(moved) * np.linalg.norm(planned)) > 0.98
    assert 0.5 < np.linalg.norm(moved) / np.linalg.norm(planned) < 1.05
    assert np.allclose(np.linalg.norm(np.diff(predicted, axis=0), axis=1), 0.01 * np.linalg.norm(actions[0, :3]))
    assert make_suite_env("adroit-door").predicted_path(np.zeros((3, 28))) is None


def test_gif_frames_differ_and_html_is_interactive(record, tmp_path):
    gif = rollout_gif(record, tmp_path / "r.gif")
    im = Image.open(gif)
    assert im.n_frames == len(record.frames) + 1  # plus the outcome frame
    frames = []
    for i in range(im.n_frames):
        im.seek(i)
        frames.append(np.asarray(im.convert("RGB"), dtype=np.int16))
    diffs = [np.abs(a - b).mean() for a, b in zip(frames, frames[1:])]
    assert min(diffs) > 0.1, diffs  # every frame shows something new
    html = rollout_html(record, tmp_path / "r.html").read_text()
    assert "Plotly.newPlot" in html or "plotly" in html.lower()
    assert not re.search(r"<script[^>]+src=\"https?://", html)  # works offline
    assert html.count('"name":"4"') >= 1 or html.count('"name": "4"') >= 1  # one animation frame per decision
    assert not list(tmp_path.glob(".*tmp*"))


def test_mp4_has_the_gifs_frames(record, tmp_path):
    """The MP4 shows the GIF's frames in order (the outcome frame held as long), at the
    codec's 16-pixel multiple, written atomically."""
    import imageio.v2 as imageio

    fps = 4.0
    images = rollout_images(record)
    gif = Image.open(rollout_gif(record, tmp_path / "r.gif", fps=fps, images=images))
    reader = imageio.get_reader(rollout_mp4(record, tmp_path / "r.mp4", fps=fps, images=images), format="FFMPEG")
    video = [frame for frame in reader]
    reader.close()
    assert len(video) == gif.n_frames + round(HOLD_SECONDS * fps) - 1
    h, w = np.asarray(images[0]).shape[:2]
    assert video[0].shape[0] % 16 == 0 and video[0].shape[1] % 16 == 0
    for i in (0, len(images) // 2, len(images) - 1):  # each frame is its drawing, not a neighbour's
        drawn = np.asarray(images[i].convert("RGB"), dtype=np.float32)
        errors = [np.abs(v[:h, :w].astype(np.float32) - drawn).mean() for v in video[: len(images)]]
        assert int(np.argmin(errors)) == i and errors[i] < 6.0, (i, errors[i])
    held = np.abs(video[-1].astype(np.float32) - video[len(images) - 1].astype(np.float32)).mean()
    assert held < 2.0, held  # the outcome frame, held (lossy codec: nearly equal)
    assert not list(tmp_path.glob(".*tmp*"))


def test_rgb_clouds_are_drawn_in_their_colours():
    from sodp3d.viz import _colours

    cloud = np.concatenate([np.zeros((4, 3)), np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]])], axis=1)
    assert np.allclose(_colours(cloud, (0, 1))[:, :3], cloud[:, 3:])
    heights = _colours(np.array([[0, 0, 0.0], [0, 0, 1.0]]), (0.0, 1.0))
    assert not np.allclose(heights[0], heights[1])


def test_rerun_recording_of_a_rollout_reads_back_frame_for_frame(record, tmp_path):
    """The .rrd holds, on the step timeline, the cloud of every decision (its points, in
    the GIF's colours), the executed path at every step, the predicted path at every
    decision, and the actions, rewards and success of every step, as recorded."""
    from sodp3d.viz import _rgb8

    path = rollout_rrd(record, tmp_path / "r.rrd")
    assert path.is_file() and not list(tmp_path.glob(".*tmp*"))
    got = read_back(path)
    assert {"/world/point_cloud", "/world/hand/executed", "/world/hand/predicted", "/action", "/reward",
            "/success"} <= set(got)
    clouds = got["/world/point_cloud"]
    assert clouds["step"] == [f.step for f in record.frames] == [0, 8, 16, 24, 32]
    assert clouds["points"] == [len(f.cloud) for f in record.frames] == [48] * 5
    lim = record.limits()
    for i, f in enumerate(record.frames):
        np.testing.assert_allclose(clouds["xyz"][i], f.cloud[:, :3], atol=1e-6)
        np.testing.assert_array_equal(clouds["rgb"][i], _rgb8(f.cloud, (lim[0][2], lim[1][2])))
    assert len({c.tobytes() for c in clouds["rgb"][0]}) > 3  # coloured by height, not one colour
    executed = got["/world/hand/executed"]
    assert executed["step"] == list(range(record.steps + 1)) and executed["points"] == list(range(1, record.steps + 2))
    predicted = got["/world/hand/predicted"]
    assert predicted["step"] == clouds["step"] and predicted["points"] == [len(f.predicted) for f in record.frames]
    T = record.steps
    assert got["/action"]["step"] == got["/reward"]["step"] == got["/success"]["step"] == list(range(T))
    np.testing.assert_allclose(np.array(got["/action"]["values"]), record.actions, atol=1e-6)
    assert record.actions.shape == (T, 4)
    np.testing.assert_allclose(np.array(got["/reward"]["values"])[:, 0], record.rewards, rtol=1e-6)
    assert np.ptp(record.rewards) > 0  # a reward that moves, so the comparison means something
    assert np.array(got["/success"]["values"])[:, 0].tolist() == record.successes.astype(float).tolist()


def test_viz_command_writes_rerun_for_rollouts_and_dataset_episodes(policy, one_episode, tmp_path, capsys,
                                                                     monkeypatch):
    """format=rerun for a checkpoint's rollout and for a dataset's episodes; a viewer is
    never started unless spawn=true; a bad format is one line naming the valid ones."""
    import subprocess

    from sodp3d import viz
    from sodp3d.checkpoint import save_checkpoint
    from sodp3d.data.store import EpisodeDataset

    def no_process(*args, **kwargs):
        raise AssertionError(f"a process was started: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    ckpt = tmp_path / "p.ckpt"
    save_checkpoint(ckpt, {"policy_config": policy.config.to_dict(), "policy": policy.state_dict(),
                           "train_config": {"env": OmegaConf.to_container(ENV)}})
    rollouts = tmp_path / "rollouts"
    assert main(["viz", f"ckpt={ckpt}", "task=reach-v3", "format=[gif,rerun]", f"out={rollouts}", "device=cpu"]) == 0
    assert sorted(p.name for p in rollouts.iterdir()) == ["reach-v3-seed0.gif", "reach-v3-seed0.rrd"]
    got = read_back(rollouts / "reach-v3-seed0.rrd")
    assert got["/world/point_cloud"]["points"] == [48] * 5 and len(got["/reward"]["step"]) == 40

    view = tmp_path / "view"
    assert main(["viz", f"data={one_episode}", "format=rerun", f"out={view}"]) == 0
    assert "| 0 | reach-v3 | 40 |" in capsys.readouterr().out
    assert sorted(p.name for p in view.iterdir()) == ["episode-0.rrd"]
    ep = EpisodeDataset(one_episode).episode(0)
    got = read_back(view / "episode-0.rrd")
    clouds = got["/world/point_cloud"]
    assert clouds["step"] == list(range(40)) and clouds["points"] == [48] * 40  # every step of the episode
    for t in (0, 39):
        np.testing.assert_allclose(clouds["xyz"][t], ep["point_cloud"][t][:, :3], atol=1e-6)
    np.testing.assert_allclose(np.array(got["/reward"]["values"])[:, 0], ep["reward"], rtol=1e-6)
    np.testing.assert_allclose(np.array(got["/action"]["values"]), ep["action"], atol=1e-6)
    assert np.array(got["/success"]["values"])[:, 0].tolist() == ep["success"].astype(float).tolist()
    assert got["/world/hand/executed"]["points"] == list(range(1, 41))  # the hand (agent_pos) path so far

    both = tmp_path / "both"
    assert main(["viz", f"data={one_episode}", "format=all", f"out={both}"]) == 0
    assert sorted(p.name for p in both.iterdir()) == ["episode-0.rrd", "episodes.png"]

    opened = []
    monkeypatch.setattr(viz, "open_viewer", opened.append)
    assert main(["viz", f"data={one_episode}", "format=rerun", f"out={view}", "spawn=true"]) == 0
    assert opened == [[view / "episode-0.rrd"]]
    capsys.readouterr()
    for args, words in [([f"data={one_episode}", "format=webm"], "valid: png, rerun, all"),
                        ([f"data={one_episode}", "format=gif"], "valid: png, rerun, all"),
                        ([f"ckpt={ckpt}", "task=reach-v3", "format=png"], "valid: gif, mp4, html, rerun, all"),
                        ([f"data={one_episode}", "spawn=true"], "format=rerun")]:
        rc = main(["viz", *args, f"out={tmp_path / 'bad'}"])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err and words in err, (args, err)
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_dataset_view_shows_episodes_with_their_success(tmp_path):
    data = tmp_path / "d.zarr"
    assert main(["collect", "task=[reach-v3,button-press-topdown-v3]", "episodes=2", f"out={data}", "workers=1",
                 *FAST_ENV]) == 0
    png, rows = dataset_figure(data, tmp_path / "v" / "episodes.png", episodes=3)
    assert Image.open(png).size[0] > 100
    from sodp3d.data.store import EpisodeDataset

    ds = EpisodeDataset(data)
    assert [r["task"] for r in rows] == [ds.episode_tasks[r["episode"]] for r in rows]
    assert {r["task"] for r in rows} == {"reach-v3", "button-press-topdown-v3"}  # spread over the tasks
    assert [r["success"] for r in rows] == [bool(ds.episode_info("success")[r["episode"]]) for r in rows]
    assert pick_episodes(["a", "a", "a", "b"], 4, 2) == [0, 3]


def test_viz_command_on_a_dataset_and_its_errors(one_episode, tmp_path, capsys):
    data = one_episode
    capsys.readouterr()
    assert main(["viz", f"data={data}", f"out={tmp_path / 'v'}"]) == 0
    out = capsys.readouterr().out
    assert "| 0 | reach-v3 | 40 |" in out and (tmp_path / "v" / "episodes.png").is_file()
    for args, words in [([], "exactly one of"), ([f"data={data}", "ckpt=x"], "exactly one of"),
                        ([f"data={data}", "episodes=0"], "positive"), ([f"data={tmp_path / 'none.zarr'}"], "none.zarr"),
                        (["ckpt=" + str(tmp_path / "missing.ckpt")], "no checkpoint")]:
        rc = main(["viz", *args])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err and words in err, (args, err)
        assert len([ln for ln in err.splitlines() if ln.startswith("sodp3d viz: error:")]) == 1
