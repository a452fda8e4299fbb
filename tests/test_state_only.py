"""State observations without a camera: a state-only dataset (no point_cloud, so no render)
pre-trains and fine-tunes; a policy that reads no cloud acts in environments that make no
renderer; a cloud-reading policy on a state-only dataset is refused in one line; the
vector-env layouts (sync, async, workers) give the same episodes, and bad layouts are one
line; an update reads rollouts_per_update episodes per environment."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sodp3d.cli import main
from sodp3d.data.store import EpisodeDataset

STATE_ENV = ["env.metaworld.episode_length=24", "env.metaworld.point_cloud=false"]
PRE = ["policy=tiny", "encoder=state", "steps=4", "batch_size=8", "device=cpu", "wandb.mode=disabled"]
FT = ["task=reach-v3", "num_envs=2", "algo.p_step=1", "algo.batch_size=20", "algo.bc_batch_size=8", "algo.n_init=2",
      "eval.episodes=2", "device=cpu", "wandb.mode=disabled", "env.metaworld.episode_length=24"]

pytestmark = pytest.mark.usefixtures("close_cached_envs")


def no_camera(monkeypatch) -> None:
    """Any renderer made in this process fails the test."""
    from sodp3d.envs import wrappers

    def refuse(*_args, **_kwargs):
        raise AssertionError("a renderer was made for a policy that reads no cloud or image")

    monkeypatch.setattr(wrappers, "DepthCamera", refuse)


@pytest.fixture(scope="module")
def state_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("state") / "d.zarr"
    import _pytest.monkeypatch

    with _pytest.monkeypatch.MonkeyPatch.context() as mp:
        no_camera(mp)  # collection without a camera makes no renderer either
        assert main(["collect", "task=reach-v3", "episodes=2", f"out={out}", "workers=1", *STATE_ENV]) == 0
    return out


def one_line(capsys, rc: int, command: str) -> str:
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("sodp3d")]
    assert len(lines) == 1 and lines[0].startswith(f"sodp3d {command}: error:"), err
    return lines[0]


def test_a_state_only_dataset_holds_no_cloud_and_says_so(state_data):
    data = EpisodeDataset(state_data)
    assert "point_cloud" not in data.keys and {"agent_pos", "state", "action"} <= set(data.keys)
    assert data.attrs["observations"] == ["agent_pos", "state"]
    assert data.attrs["tasks"]["reach-v3"]["point_cloud"] is False
    assert data.n_steps == 48


def test_a_state_only_dataset_pretrains_and_finetunes_without_a_renderer(state_data, tmp_path, monkeypatch, capsys):
    no_camera(monkeypatch)
    pre = tmp_path / "pre"
    assert main(["pretrain", f"data={state_data}", f"out={pre}", *PRE]) == 0
    out = tmp_path / "ft"
    assert main(["finetune", f"ckpt={pre}", f"out={out}", "env_steps=96", "vector_env=sync", *FT]) == 0
    record = json.loads((out / "results.json").read_text())
    assert record["tasks"][0]["env_steps"] >= 96 and record["tasks"][0]["finetuned_success"] is not None
    assert main(["eval", f"ckpt={out}", "task=reach-v3", "episodes=2", "num_envs=1", "device=cpu",
                 f"out={tmp_path / 'ev'}", "env.metaworld.episode_length=24"]) == 0


def test_a_cloud_policy_on_a_state_only_dataset_is_one_line_and_writes_nothing(state_data, tmp_path, capsys):
    out = tmp_path / "pc"
    rc = main(["pretrain", f"data={state_data}", f"out={out}", *PRE, "encoder=dp3"])
    line = one_line(capsys, rc, "pretrain")
    assert "holds no point_cloud" in line and "encoder=state" in line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_state_policy_trained_on_clouds_acts_without_a_renderer(tmp_path, monkeypatch):
    """The policy decides: data with clouds, encoder=state, and fine-tuning renders nothing."""
    data = tmp_path / "pc.zarr"
    assert main(["collect", "task=reach-v3", "episodes=1", f"out={data}", "workers=1", "env.metaworld.episode_length=24",
                 "env.metaworld.resolution=[32,32]", "env.metaworld.num_points=32"]) == 0
    pre = tmp_path / "pre"
    assert main(["pretrain", f"data={data}", f"out={pre}", *PRE]) == 0
    no_camera(monkeypatch)
    assert main(["finetune", f"ckpt={pre}", f"out={tmp_path / 'ft'}", "env_steps=48", "vector_env=sync", *FT]) == 0


def test_the_vector_layouts_give_the_same_episodes():
    """workers (2 processes of 2 envs) and async step, reset and report as sync does, over an
    episode end and its autoreset."""
    from sodp3d.envs import make_vector_env

    kw = dict(point_cloud=False, n_obs_steps=2, n_action_steps=8)
    cfg = {"metaworld": {"episode_length": 20}}
    from sodp3d.envs.settings import default_env_config
    from omegaconf import OmegaConf

    env_cfg = OmegaConf.merge(default_env_config(), cfg)
    vecs = {mode: make_vector_env("reach-v3", 4, env_cfg, mode=mode, workers=2, **kw) for mode in ("sync", "workers", "async")}
    try:
        first = {mode: v.reset(seed=[5, 6, 7, 8])[0] for mode, v in vecs.items()}
        rng = np.random.default_rng(0)
        ends = 0
        for _ in range(8):
            actions = rng.uniform(-1, 1, (4, 8, 4)).astype(np.float32)
            out = {mode: v.step(actions) for mode, v in vecs.items()}
            ref = out["sync"]
            ends += int(ref[3].sum())
            for mode in ("workers", "async"):
                got = out[mode]
                for k in ref[0]:  # the same simulator in every layout: the same bytes
                    np.testing.assert_array_equal(got[0][k], ref[0][k], err_msg=f"{mode} {k}")
                for i in (1, 2, 3):
                    np.testing.assert_array_equal(got[i], ref[i], err_msg=mode)
                assert set(got[4]) == set(ref[4]), mode  # (empty on the step that autoresets every env)
                for k in set(ref[4]) & {"success", "executed", "_success"}:
                    np.testing.assert_array_equal(got[4][k], ref[4][k], err_msg=f"{mode} {k}")
        assert ends == 8  # every env ended twice (20-step episodes, chunks of 8) and was reset
        for k in first["sync"]:
            np.testing.assert_array_equal(first["workers"][k], first["sync"][k])
    finally:
        for v in vecs.values():
            v.close()


@pytest.mark.parametrize("bad, words", [
    (["vector_env=threads"], ["unknown vector_env=threads", "auto, sync, async, workers"]),
    (["num_envs=0"], ["num_envs must be a positive integer"]),
    (["num_envs=4", "vector_env=workers", "env_workers=3"], ["env_workers=3 does not divide num_envs=4", "1, 2, 4"]),
    (["vector_env=workers", "env_workers=0"], ["env_workers"]),
    (["algo.rollouts_per_update=0"], ["algo.rollouts_per_update must be a positive integer"]),
])
def test_bad_layouts_are_one_line_and_write_nothing(bad, words, tmp_path, capsys):
    out = tmp_path / "ft"
    rc = main(["finetune", f"ckpt={tmp_path / 'missing'}", f"out={out}", "task=reach-v3", *bad])
    line = one_line(capsys, rc, "finetune")
    for w in words:
        assert w in line, line
    assert not out.exists()


def test_an_update_reads_rollouts_per_update_episodes_per_env(state_data, tmp_path):
    pre = tmp_path / "pre"
    assert main(["pretrain", f"data={state_data}", f"out={pre}", *PRE]) == 0
    out = tmp_path / "ft"
    assert main(["finetune", f"ckpt={pre}", f"out={out}", "env_steps=200", "vector_env=workers", "env_workers=2",
                 "algo=large-batch", "algo.rollouts_per_update=3", "algo.batch_size=40", "algo.bc_batch_size=8",
                 "task=reach-v3", "num_envs=2", "algo.n_init=2", "eval.episodes=2", "device=cpu", "wandb.mode=disabled",
                 "env.metaworld.episode_length=24"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in rows if "update" in r]
    # 2 envs x 3 episodes of 24 steps (3 chunks each) = 144 env steps, 18 chunks per update; the
    # second update stops collecting once the budget (200) is spent, after two rollouts.
    assert [(u["episodes"], u["chunks"], u["env_steps"]) for u in updates] == [(6, 18, 144), (4, 12, 240)]
    assert updates[0]["gradient_steps"] == 3 * 5  # algo.update_epochs=3 epochs of 18 chunks in minibatches of 4
