"""Pre-training and evaluation through the CLI: learning, resumption, results, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from store_kit import assert_one_line_error

from sodp3d.checkpoint import load_checkpoint
from sodp3d.cli import main

FAST_ENV = ["env.metaworld.resolution=[32,32]", "env.metaworld.num_points=64", "env.metaworld.episode_length=24"]
TINY = ["policy=tiny", "batch_size=16", "device=cpu", "wandb.mode=disabled", "optim.warmup_steps=5", "log_every=5"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "two.zarr"
    rc = main(["collect", "task=[reach-v3,push-v3]", "episodes=2", f"out={out}", "workers=1", *FAST_ENV])
    assert rc == 0
    return out


def pretrain(dataset, out, *extra):
    return main(["pretrain", f"data={dataset}", f"out={out}", *TINY, *extra])


def one_line_error(capsys, rc, command):
    return assert_one_line_error(rc, *capsys.readouterr(), command)


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_pretraining_lowers_the_loss(dataset, tmp_path):
    run = tmp_path / "run"
    assert pretrain(dataset, run, "steps=80", "optim.lr=1e-3") == 0
    curve = losses(run)
    assert len(curve) == 16
    assert sum(curve[-3:]) / 3 < 0.7 * sum(curve[:3]) / 3, curve
    payload = load_checkpoint(run / "checkpoints" / "latest.ckpt")
    assert payload["step"] == 80
    assert payload["cloud_frame"] == "world"  # our collector's clouds
    assert payload["policy_config"]["shape_meta"]["point_cloud"] == [64, 3]
    assert (payload["policy_config"]["horizon"], payload["policy_config"]["n_obs_steps"],
            payload["policy_config"]["n_action_steps"]) == (12, 2, 8)  # Meta-World defaults
    assert (run / "config.yaml").exists()


def test_interrupted_and_resumed_equals_uninterrupted(dataset, tmp_path, monkeypatch):
    """Same step count, optimiser, scheduler, EMA and RNG state: the same next steps."""
    from sodp3d import pretrain as module

    straight = tmp_path / "straight"
    assert pretrain(dataset, straight, "steps=12") == 0

    interrupted = tmp_path / "interrupted"
    original = module.Trainer.train_step

    def stop_at_7(self, *args, **kwargs):
        if self.step == 7:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(module.Trainer, "train_step", stop_at_7)
    assert pretrain(dataset, interrupted, "steps=12") == 130
    assert load_checkpoint(interrupted / "checkpoints" / "latest.ckpt")["step"] == 7
    monkeypatch.setattr(module.Trainer, "train_step", original)
    assert pretrain(dataset, interrupted, "steps=12", "resume=true") == 0

    a = load_checkpoint(straight / "checkpoints" / "latest.ckpt")
    b = load_checkpoint(interrupted / "checkpoints" / "latest.ckpt")
    assert a["step"] == b["step"] == 12
    for key in ("policy", "ema_policy"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resuming"


def test_killed_run_resumes_from_its_last_checkpoint(dataset, tmp_path):
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "sodp3d.cli", "pretrain", f"data={dataset}", f"out={run}", *TINY,
           "steps=100000", "checkpoint_every=3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "MUJOCO_GL": "egl"})
    ckpt = run / "checkpoints" / "latest.ckpt"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if ckpt.exists() and load_checkpoint(ckpt)["step"] >= 6:
                break
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint appeared")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    step = load_checkpoint(ckpt)["step"]  # readable: the write was atomic
    assert step >= 6 and step % 3 == 0
    (ckpt.parent / f".{ckpt.name}.killed.tmp").write_bytes(b"half a checkpoint")  # as a kill mid-save leaves
    assert pretrain(dataset, run, f"steps={step + 4}", "checkpoint_every=3", "resume=true") == 0
    assert load_checkpoint(ckpt)["step"] == step + 4
    assert not [p.name for p in ckpt.parent.iterdir() if p.name.endswith(".tmp")], "stale temporary files remain"


def test_wandb_offline_needs_no_network(dataset, tmp_path):
    run = tmp_path / "wb"
    rc = main(["pretrain", f"data={dataset}", f"out={run}", "policy=tiny", "batch_size=8", "device=cpu",
               "steps=3", "log_every=1", "wandb.mode=offline"])
    assert rc == 0
    assert list((run / "wandb").glob("offline-run-*")), "wandb wrote no offline run"


def test_eval_end_to_end(dataset, tmp_path):
    run = tmp_path / "ev"
    assert pretrain(dataset, run, "steps=5") == 0
    rc = main(["eval", f"ckpt={run}", "task=[reach-v3,push-v3]", "episodes=3", "num_envs=2", "seeds=[0,1]", *FAST_ENV])
    assert rc == 0
    results = json.loads((run / "eval" / "results.json").read_text())
    assert [t["task"] for t in results["tasks"]] == ["reach-v3", "push-v3"]
    for t in results["tasks"]:
        assert len(t["per_seed_success_rate"]) == 2 and all(0 <= r <= 1 for r in t["per_seed_success_rate"])
    # 2 tasks x 2 seeds x 24 steps x 4 episodes run (two lockstep batches of 2 envs; the
    # 4th episode is simulated and discarded, and counted as the cost it was)
    assert results["env_steps"] == 2 * 2 * 4 * 24
    assert "final evaluation" in (run / "eval" / "results.md").read_text()
    assert results["kind"] == "eval" and results["eta"] == 0.0 and "DDIM eta = 0" in results["metric"]
    # eta = 1 acts through the stochastic sampler: same seeds, other actions, other returns.
    returns = {}
    for eta in ("null", "1"):
        out = tmp_path / f"ev-eta-{eta}"
        assert main(["eval", f"ckpt={run}", "task=reach-v3", "episodes=2", "num_envs=2", f"eta={eta}", f"out={out}",
                     *FAST_ENV]) == 0
        r = json.loads((out / "results.json").read_text())
        returns[eta] = r["tasks"][0]["mean_return"]
        assert f"DDIM eta = {0 if eta == 'null' else 1}" in r["metric"]
    assert returns["null"] != returns["1"]


def test_bf16_pretraining_lowers_the_loss_and_keeps_fp32_weights(dataset, tmp_path):
    """precision=bf16 runs the loss's forward under bf16 autocast: it still learns, its
    curve is not the fp32 one (autocast is on), and the checkpoint stays fp32."""
    assert pretrain(dataset, tmp_path / "fp32", "steps=80", "optim.lr=1e-3") == 0
    assert pretrain(dataset, tmp_path / "bf16", "steps=80", "optim.lr=1e-3", "precision=bf16") == 0
    curve = losses(tmp_path / "bf16")
    assert sum(curve[-3:]) / 3 < 0.7 * sum(curve[:3]) / 3, curve
    assert curve != losses(tmp_path / "fp32")
    payload = load_checkpoint(tmp_path / "bf16" / "checkpoints" / "latest.ckpt")
    assert {v.dtype for v in payload["policy"].values() if v.is_floating_point()} == {torch.float32}


def test_colour_pretraining_normalises_the_colour_channels(tmp_path):
    """encoder.use_rgb=true on a coloured dataset: DP3's coloured network, and the
    normaliser scales rgb per channel over the data (as DP3), not only xyz."""
    data = tmp_path / "rgb.zarr"
    assert main(["collect", "task=reach-v3", "episodes=1", f"out={data}", "workers=1", *FAST_ENV,
                 "env.metaworld.rgb=true"]) == 0
    assert pretrain(data, tmp_path / "run", "steps=4", "encoder.use_rgb=true") == 0
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.ckpt")["policy"]
    lo, scale = state["normalizer.point_cloud__min"], state["normalizer.point_cloud__scale"]
    assert lo.shape == (6,) and scale.shape == (6,)
    assert ((lo[3:] >= 0) & (lo[3:] <= 1)).all() and (scale[3:] >= 2.0).all()  # colour ranges within [0, 1]
    assert state["encoder.mlp.9.weight"].shape == (512, 256)  # the coloured network's last layer


def test_bad_input(dataset, tmp_path, capsys):
    run = tmp_path / "bad"
    assert pretrain(dataset, run, "steps=2") == 0
    capsys.readouterr()
    msg = one_line_error(capsys, pretrain(dataset, run, "steps=4"), "pretrain")
    assert "resume=true" in msg
    msg = one_line_error(capsys, pretrain(dataset, run, "steps=4", "resume=true", "encoder=pointnet"), "pretrain")
    assert "encoder" in msg
    msg = one_line_error(capsys, pretrain(dataset, tmp_path / "x", "policy=huge"), "pretrain")
    assert "policy" in msg and "huge" in msg
    msg = one_line_error(capsys, pretrain(dataset, tmp_path / "x", "encoder=nope"), "pretrain")
    assert "nope" in msg
    msg = one_line_error(capsys, pretrain(tmp_path / "missing.zarr", tmp_path / "x"), "pretrain")
    assert "missing.zarr" in msg
    msg = one_line_error(capsys, pretrain(dataset, tmp_path / "x", "n_action_steps=20"), "pretrain")
    assert "n_action_steps" in msg
    msg = one_line_error(capsys, pretrain(dataset, tmp_path / "x", "precision=fp8"), "pretrain")
    assert "fp8" in msg and "bf16" in msg
    assert not (tmp_path / "x").exists()

    # A checkpoint built for 4 Meta-World actions cannot drive Adroit's 28.
    msg = one_line_error(capsys, main(["eval", f"ckpt={run}", "task=adroit-door", "episodes=1"]), "eval")
    assert "28" in msg and "4" in msg
    msg = one_line_error(capsys, main(["eval", f"ckpt={run}", "task=reach-v3", "episodes=1",
                                       "env.metaworld.num_points=32"]), "eval")
    assert "point_cloud" in msg
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(os.urandom(256))
    msg = one_line_error(capsys, main(["eval", f"ckpt={junk}", "task=reach-v3"]), "eval")
    assert "junk.ckpt" in msg



def test_periodic_evaluation_and_top5_metric(dataset, tmp_path, capsys):
    run = tmp_path / "top5"
    rc = pretrain(dataset, run, "steps=6", "eval.every=3", "eval.task=reach-v3", "eval.episodes=1",
                  "eval.num_envs=1", *FAST_ENV)
    assert rc == 0
    history = [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [3, 6]
    capsys.readouterr()
    assert main(["eval", f"ckpt={run}", "metric=top5"]) == 0
    md = (run / "eval-top5" / "results.md").read_text()
    assert "DP3-style" in md and "2 evaluations" in md and "not a final evaluation" in md
    # Without recorded evaluations the top-5 metric cannot be formed.
    bare = tmp_path / "bare"
    assert pretrain(dataset, bare, "steps=2") == 0
    capsys.readouterr()
    msg = one_line_error(capsys, main(["eval", f"ckpt={bare}", "metric=top5"]), "eval")
    assert "eval_every" in msg or "evals.jsonl" in msg


def test_checkpoints_act_with_the_settings_of_their_data(dataset, tmp_path):
    """The data were collected with 64 points; a plain eval (no env overrides) and a changed
    episode length still act with 64 points, and a suite-level user change wins."""
    from sodp3d.checkpoint import acting_env_config, load_checkpoint
    from sodp3d.envs import default_env_config, task_settings

    run = tmp_path / "settings"
    assert pretrain(dataset, run, "steps=2") == 0
    payload = load_checkpoint(run / "checkpoints" / "latest.ckpt")
    plain = task_settings("reach-v3", acting_env_config(default_env_config(), payload))
    assert (plain.num_points, plain.height) == (64, 32)
    longer = default_env_config()
    longer.metaworld.episode_length = 77
    s = task_settings("push-v3", acting_env_config(longer, payload))
    assert (s.num_points, s.episode_length) == (64, 77)
    more = default_env_config()
    more.metaworld.num_points = 100
    assert task_settings("reach-v3", acting_env_config(more, payload)).num_points == 100
    rc = main(["eval", f"ckpt={run}", "task=reach-v3", "episodes=1", "num_envs=1", "env.metaworld.episode_length=24"])
    assert rc == 0


def test_a_dp3_store_is_said_to_be_in_dp3s_frame_and_its_checkpoint_refused_in_our_envs(tmp_path, capsys):
    """Pre-training on a DP3-layout store says in one line which frame its clouds are in
    and records it; eval, finetune and viz of that checkpoint in sodp3d's environments stop
    with one line unless allow_foreign_frame=true. Its 0-255 colour is trained in [0, 1]."""
    import numpy as np
    import zarr
    from store_kit import make_dp3_store

    data = tmp_path / "dp3.zarr"
    make_dp3_store(data, 2, lengths=(12, 12))
    root = zarr.open_group(str(data), mode="r+")
    rng = np.random.default_rng(0)
    cloud = np.concatenate([rng.normal(size=(24, 64, 3)), rng.integers(0, 256, (24, 64, 3))], axis=2).astype(np.float32)
    del root["data"]["point_cloud"]
    root["data"].create_array("point_cloud", data=cloud, chunks=(5, 64, 6))

    run = tmp_path / "run"
    capsys.readouterr()
    assert pretrain(data, run, "steps=2", "encoder.use_rgb=true") == 0
    err = capsys.readouterr().err
    said = [ln for ln in err.splitlines() if "DP3's layout" in ln]
    assert len(said) == 1 and "DP3's frame" in said[0] and "0-255" in said[0], err
    payload = load_checkpoint(run / "checkpoints" / "latest.ckpt")
    assert payload["cloud_frame"] == "dp3"
    assert json.loads((run / "results.json").read_text())["cloud_frame"] == "dp3"
    lo, scale = payload["policy"]["normalizer.point_cloud__min"], payload["policy"]["normalizer.point_cloud__scale"]
    assert (lo[3:] >= 0).all() and (lo[3:] + 2 / scale[3:] <= 1 + 1e-5).all()  # colour fitted within [0, 1]

    rgb_env = [*FAST_ENV, "env.metaworld.rgb=true", "episodes=1", "num_envs=1"]
    for command, args in [("eval", ["task=reach-v3", *rgb_env]),
                          ("finetune", ["task=reach-v3", f"out={tmp_path / 'ft'}", "device=cpu"]),
                          ("viz", ["task=reach-v3", f"out={tmp_path / 'viz'}", "device=cpu"])]:
        msg = one_line_error(capsys, main([command, f"ckpt={run}", *args]), command)
        assert "DP3's frame" in msg and "allow_foreign_frame=true" in msg and "world frame" in msg, msg
    assert not (tmp_path / "ft").exists() and not (tmp_path / "viz").exists()
    # Asked for, it acts (eval), or goes on to its next check (finetune: Adroit's 28 action dims).
    assert main(["eval", f"ckpt={run}", "task=reach-v3", *rgb_env, "allow_foreign_frame=true",
                 f"out={tmp_path / 'ev'}"]) == 0
    capsys.readouterr()
    msg = one_line_error(capsys, main(["finetune", f"ckpt={run}", "task=adroit-door", f"out={tmp_path / 'ft'}",
                                       "device=cpu", "allow_foreign_frame=true"]), "finetune")
    assert "28" in msg
    # Periodic evaluation during pre-training acts in our environments too.
    msg = one_line_error(capsys, pretrain(data, tmp_path / "x", "steps=2", "eval.every=1", "eval.task=reach-v3"),
                         "pretrain")
    assert "DP3's frame" in msg and "allow_foreign_frame=true" in msg
    assert not (tmp_path / "x").exists()


def test_held_out_episodes_are_never_in_training_windows(tmp_path):
    """Per task, round(ratio x n) episodes (at most n - 1) are held out, the same for the
    same seed; every training window's steps lie outside them, every validation window's
    inside them, and together they are all the windows."""
    import numpy as np
    from policy_kit import write_dataset

    from sodp3d.data.store import EpisodeDataset, EpisodeWriter
    from sodp3d.data.windows import WindowDataset
    from sodp3d.pretrain import held_out_episodes, split_windows

    path = tmp_path / "tasks.zarr"  # 3 tasks of 10, 4 and 1 episodes; step t holds the value t
    writer = EpisodeWriter.create(path, attrs={})
    start = 0
    for task, n in [("a", 10), ("b", 4), ("c", 1)]:
        for _ in range(n):
            t = np.arange(start, start + 6, dtype=np.float32)
            writer.append_episode({"point_cloud": np.broadcast_to(t[:, None, None], (6, 16, 3)).copy(),
                                   "agent_pos": np.stack([t, -t], 1), "action": np.stack([t, 10 * t], 1)}, task=task)
            start += 6
    # A store with one task per episode (values from 1000 on): nothing of it is held out.
    other = write_dataset(tmp_path / "other.zarr", lengths=(7, 8, 9), offset=1000)
    windows = WindowDataset([str(path), str(other)], ["point_cloud", "agent_pos"], horizon=4, n_obs_steps=2,
                            n_action_steps=3)
    held = held_out_episodes(windows, 0.25, seed=3)
    tasks = EpisodeDataset(path).episode_tasks
    assert sorted(tasks[e] for e in held[str(path)]) == ["a", "a", "a", "b"]  # round(2.5) = 3, round(1.0) = 1, c kept
    assert str(other) not in held
    assert held == held_out_episodes(windows, 0.25, seed=3)
    assert held != held_out_episodes(windows, 0.25, seed=4)
    assert held_out_episodes(windows, 0.95, seed=0)[str(path)].__len__() == 9 + 3  # all but one per task
    train, val = split_windows(windows, held)
    assert len(train) + len(val) == len(windows) and len(val) > 0
    held_steps = {v for e in held[str(path)] for v in range(6 * e, 6 * e + 6)}
    for part, inside in ((train, False), (val, True)):
        batch = part.get(np.arange(len(part)))
        steps = np.concatenate([batch["obs"]["agent_pos"][..., 0], batch["obs"]["point_cloud"][:, :, 0, 0],
                                batch["action"][..., 0]], axis=1).astype(int)  # the step of every value read
        assert (np.isin(steps, list(held_steps)).all(axis=1) if inside
                else ~np.isin(steps, list(held_steps)).any(axis=1)).all()
    assert {int(v) for v in train.get(np.arange(len(train)))["action"][..., 0].ravel()} >= set(range(1000, 1024))
    sampled = train.sample(2048, np.random.default_rng(0))["action"][..., 0].astype(int)
    assert not np.isin(sampled, list(held_steps)).any()


def test_validation_loss_is_recorded_finite_and_falls(dataset, tmp_path):
    """val_ratio=0.5 holds out one of each task's two episodes; the validation loss is
    logged every val_every steps and at the end, finite, in the checkpoint and the
    results, and falls over a short run."""
    run = tmp_path / "val"
    assert pretrain(dataset, run, "steps=60", "optim.lr=1e-3", "val_ratio=0.5", "val_every=15") == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    assert [s for s, _ in curve] == [15, 30, 45, 60]
    values = [v for _, v in curve]
    assert all(v == v and 0 < v < 10 for v in values), values
    assert values[-1] < 0.8 * values[0], values
    results = json.loads((run / "results.json").read_text())
    assert results["val_episodes"] == 2 and results["val_loss"] == values[-1] and results["val_windows"] > 0
    assert "validation loss" in (run / "results.md").read_text()
    payload = load_checkpoint(run / "checkpoints" / "latest.ckpt")
    assert payload["val"]["loss"] == values[-1] and len(payload["val"]["held_out"][str(dataset)]) == 2
    # The same noise every time: the same weights give the same validation loss.
    from sodp3d.checkpoint import policy_from_payload
    from sodp3d.data.windows import WindowDataset
    from sodp3d.pretrain import Validator, split_windows

    policy = policy_from_payload(payload, use_ema=False)
    windows = WindowDataset([str(dataset)], policy.obs_keys, 12, 2, 8)
    _, val = split_windows(windows, payload["val"]["held_out"])
    validator = Validator(val, 16, 2048, 1, torch.device("cpu"))
    assert validator.loss(policy) == validator.loss(policy)
    assert abs(validator.loss(policy) - values[-1]) < 1e-4
    # Resuming with another split is refused; a ratio outside [0, 1) is refused.
    assert pretrain(dataset, run, "steps=62", "resume=true", "val_ratio=0.0") == 2
    assert pretrain(dataset, tmp_path / "bad", "val_ratio=1.0") == 2
    assert not (tmp_path / "bad").exists()


def test_validation_under_two_processes_matches_one_process(dataset, tmp_path):
    """Under torchrun (two processes, gloo), training skips the same held-out episodes and
    rank 0 computes the same validation losses one process computes. SGD, as in
    test_distributed: its weights differ from one process's by rounding only (AdamW can turn
    rounding into lr-sized steps); the losses then agree far within 1e-4."""
    import subprocess
    import sys

    args = [f"data={dataset}", *TINY, "steps=4", "val_ratio=0.5", "val_every=2", "optim.name=sgd", "optim.lr=0.1"]
    assert main(["pretrain", f"out={tmp_path / 'one'}", *args]) == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "sodp3d.cli", "pretrain", f"out={tmp_path / 'two'}", *args],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("one", "two"))
    assert two["processes"] == 2 and [s for s, _ in two["val_history"]] == [2, 4]
    assert one["val_episodes"] == two["val_episodes"] > 0 and one["val_windows"] == two["val_windows"]
    held = [load_checkpoint(tmp_path / name / "checkpoints" / "latest.ckpt")["val"]["held_out"] for name in ("one", "two")]
    assert held[0] == held[1]
    for (s1, v1), (s2, v2) in zip(one["val_history"], two["val_history"]):
        assert s1 == s2 and abs(v1 - v2) < 1e-4 * max(1.0, abs(v1)), (one["val_history"], two["val_history"])


def test_ema_follows_its_closed_form():
    """The EMA (one foreach lerp per step) is Diffusion Policy's warm-up average:
    e_0 = w_0, e_n = d_n e_{n-1} + (1 - d_n) w_n with d_n = min(0.9999, 1 - (1 + n)^-0.75)."""
    from sodp3d.pretrain import ema_decay, ema_multi_avg_fn

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(0.75, 0.9999), use_buffers=True)
    expected = None
    for n in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p))
        ema.update_parameters(model)
        w = torch.cat([p.detach().flatten() for p in model.parameters()])
        d = ema_decay(n)
        expected = w.clone() if expected is None else d * expected + (1 - d) * w
        got = torch.cat([p.detach().flatten() for p in ema.module.parameters()])
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert ema_decay(1) == pytest.approx(1 - 2 ** -0.75) and ema_decay(10 ** 9) == 0.9999
