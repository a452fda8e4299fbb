"""The SAC source: stored states re-render exactly what was seen live; a tiny SAC run lands in zarr."""

import tempfile
from pathlib import Path

import numpy as np
import pytest

from sodp3d.cli import main
from sodp3d.data.store import EpisodeDataset
from sodp3d.envs import make_env, task_settings
from sodp3d.envs.sac_source import EpisodeRecorder, render_episode
from sodp3d.envs.suites import make_suite_env


@pytest.mark.parametrize("task", ["push-v3", "adroit-hammer"])
def test_stored_states_render_the_live_clouds(task):
    """Phase 2 of the SAC source must see exactly what a live env saw at the same step."""
    settings = task_settings(task)
    live = make_env(task, settings=settings)
    recorder = EpisodeRecorder(make_suite_env(task, 12))
    rng = np.random.default_rng(0)
    obs, _ = live.reset(seed=3)
    recorder.reset(seed=3)
    clouds, agent_pos = [obs["point_cloud"]], [obs["agent_pos"]]
    for t in range(12):
        action = rng.uniform(-1, 1, live.action_space.shape).astype(np.float32)
        obs, *_ = live.step(action)
        _, _, terminated, truncated, _ = recorder.step(action)
        if t < 11:
            clouds.append(obs["point_cloud"])
            agent_pos.append(obs["agent_pos"])
    assert truncated and len(recorder.episodes) == 1
    record = recorder.episodes[0]
    assert len(record["physics"]) == len(record["action"]) == 12
    np.testing.assert_allclose(record["agent_pos"], np.stack(agent_pos), atol=1e-6)
    replayed, padded = render_episode(settings, record)
    assert padded == 0
    assert replayed.shape == (12, settings.num_points, 3)
    # The goal moves between seeds, so a replay that forgot the reset's model changes would differ.
    np.testing.assert_allclose(replayed, np.stack(clouds), atol=1e-5)


def test_sac_collection_end_to_end(tmp_path, capsys):
    out = tmp_path / "sac.zarr"
    args = ["collect", "task=reach-v3", "episodes=2", f"out={out}", "source=sac", "episode_length=25",
            "sac.learning_starts=20", "sac.batch_size=16", "sac.net_arch=[32,32]", "workers=1",
            "env.metaworld.resolution=[48,48]", "env.metaworld.num_points=64"]
    sb3_temp = set(Path(tempfile.gettempdir()).glob("SB3-*"))
    assert main(args) == 0
    data = EpisodeDataset(out)
    assert data.n_episodes == 2 and data.n_steps == 50
    # SB3's training log sits beside the store, not in a directory of its own in /tmp.
    assert (tmp_path / "sac-sac" / "reach-v3" / "progress.csv").stat().st_size > 0
    assert set(Path(tempfile.gettempdir()).glob("SB3-*")) == sb3_temp
    assert data.get("point_cloud").shape == (50, 64, 3)
    assert list(data.episode_info("source")) == ["sac", "sac"]
    # SAC's early experience starts with uniform random exploration: actions spread over the box.
    actions = data.get("action")
    assert actions.min() < -0.5 and actions.max() > 0.5
    # Re-running is a no-op: everything is committed.
    assert main(args) == 0
    assert EpisodeDataset(out).n_episodes == 2
