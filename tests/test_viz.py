"""sodp3d viz: rollouts as the policy sees them (GIF, MP4, HTML), dataset views, bad input."""

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
                        rollout_images, rollout_mp4)

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


def test_viz_command_on_a_dataset_and_its_errors(tmp_path, capsys):
    data = tmp_path / "d.zarr"
    assert main(["collect", "task=reach-v3", "episodes=1", f"out={data}", "workers=1", *FAST_ENV]) == 0
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
