"""Fine-tuning through the CLI: a set of tasks, the table, resumption, the NaN guard, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sodp3d.checkpoint import load_checkpoint
from sodp3d.cli import main

FAST_ENV = ["env.metaworld.resolution=[32,32]", "env.metaworld.num_points=64", "env.metaworld.episode_length=24"]
SMALL = ["num_envs=1", "algo.p_step=1", "algo.batch_size=20", "algo.bc_batch_size=8", "algo.n_init=1",
         "eval.episodes=1", "device=cpu", "wandb.mode=disabled", *FAST_ENV]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, collect_and_pretrain) -> Path:
    return collect_and_pretrain(tmp_path_factory.mktemp("ft"), "[reach-v3,push-v3]", 1, FAST_ENV,
                                ["policy=tiny", "steps=5", "batch_size=8", "device=cpu", "wandb.mode=disabled"])


def finetune(pretrained, out, *extra):
    return main(["finetune", f"ckpt={pretrained}", f"out={out}", *SMALL, *extra])


def one_line_error(capsys, rc):
    """Exactly one error line (progress bars may precede it on stderr), no traceback."""
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("sodp3d")]
    assert len(lines) == 1 and lines[0].startswith("sodp3d finetune: error:"), err
    return lines[0]


def test_a_set_fine_tunes_each_task_and_writes_one_table(pretrained, tmp_path):
    out = tmp_path / "set"
    assert finetune(pretrained, out, "task=[reach-v3,push-v3]", "env_steps=48") == 0
    for task in ("reach-v3", "push-v3"):
        history = [json.loads(line) for line in (out / task / "metrics.jsonl").read_text().splitlines()]
        updates = [h for h in history if "update" in h]
        assert updates and updates[-1]["env_steps"] >= 48
        for key in ("success_rate", "mean_chunk_reward", "approx_kl", "clip_fraction", "ratio_min", "ratio_max",
                    "loss_imp", "loss_bc", "target_buffer", "env_steps_per_s"):
            assert key in updates[0], key
        assert updates[0]["target_buffer"] >= 1
    table = (out / "results.md").read_text()
    assert "| reach-v3 | bc | pretrained |" in table and "| push-v3 | bc | pretrained |" in table
    assert "final evaluation" in table
    results = json.loads((out / "results.json").read_text())
    assert results["kind"] == "finetune" and results["reg"] == "bc" and results["encoder"] == "dp3"
    assert [r["task"] for r in results["tasks"]] == ["reach-v3", "push-v3"]
    for r in results["tasks"]:
        assert r["pretrained_success"] is not None and r["finetuned_success"] is not None
        assert [h["env_steps"] for h in r["history"]] == sorted(h["env_steps"] for h in r["history"])


@pytest.mark.parametrize("reg", ["none", "kl", "pl"])
def test_each_ablation_is_one_override(pretrained, tmp_path, reg):
    out = tmp_path / reg
    assert finetune(pretrained, out, "task=reach-v3", "env_steps=24", f"reg={reg}", "eval.episodes=0") == 0
    update = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert f"loss_{reg}" in update


def test_scratch_init(pretrained, tmp_path):
    out = tmp_path / "scratch"
    assert finetune(pretrained, out, "task=reach-v3", "env_steps=24", "init=scratch", "eval.episodes=0") == 0
    pre = load_checkpoint(pretrained / "checkpoints" / "latest.ckpt")["ema_policy"]
    ft = load_checkpoint(out / "checkpoints" / "latest.ckpt")["policy"]
    name = "model.final_conv.1.weight" if "model.final_conv.1.weight" in ft else next(k for k in ft if k.startswith("model."))
    assert not (ft[name] == pre[name]).all(), "init=scratch should not start from the pre-trained weights"
    assert (ft["normalizer.action__min"] == pre["normalizer.action__min"]).all()


def interrupting_second_update(original):
    """FineTuner.update that raises KeyboardInterrupt on its second call (a kill mid-run)."""
    calls = {"n": 0}

    def interrupt_second(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    return interrupt_second


def test_interrupted_run_resumes(pretrained, tmp_path, monkeypatch):
    from sodp3d.finetune import ppo as module

    out = tmp_path / "resume"
    original = module.FineTuner.update
    interrupt_second = interrupting_second_update(original)

    monkeypatch.setattr(module.FineTuner, "update", interrupt_second)
    assert finetune(pretrained, out, "task=reach-v3", "env_steps=72", "eval.episodes=0") == 130
    saved = load_checkpoint(out / "checkpoints" / "latest.ckpt")
    assert saved["updates"] == 1 and saved["finetune_state"]["env_steps"] == 24
    monkeypatch.setattr(module.FineTuner, "update", original)
    assert finetune(pretrained, out, "task=reach-v3", "env_steps=72", "eval.episodes=0", "resume=true") == 0
    final = load_checkpoint(out / "checkpoints" / "latest.ckpt")
    assert final["updates"] == 3 and final["finetune_state"]["env_steps"] == 72
    assert len(final["buffer"]) >= 3  # N_init rollout + one per update, kept across the restart


def test_nan_guard_keeps_the_last_good_checkpoint(pretrained, tmp_path, monkeypatch, capsys):
    from sodp3d.finetune import ppo as module

    out = tmp_path / "nan"
    original = module.ppo_loss
    calls = {"n": 0}

    def poisoned(new_logp, old_logp, weights, clip):
        calls["n"] += 1
        if calls["n"] > 1:  # the second update's batch is poisoned
            weights = weights * float("nan")
        return original(new_logp, old_logp, weights, clip)

    monkeypatch.setattr(module, "ppo_loss", poisoned)
    capsys.readouterr()
    msg = one_line_error(capsys, finetune(pretrained, out, "task=reach-v3", "env_steps=72", "eval.episodes=0"))
    assert "non-finite" in msg and "latest.ckpt" in msg
    saved = load_checkpoint(out / "checkpoints" / "latest.ckpt")
    assert saved["updates"] == 1
    import torch

    assert all(torch.isfinite(v).all() for v in saved["policy"].values() if v.is_floating_point())


def test_evaluations_at_two_etas(pretrained, tmp_path):
    out = tmp_path / "etas"
    assert finetune(pretrained, out, "task=reach-v3", "env_steps=24", "eval.etas=[0.0,1.0]", "eval.episodes=2") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["eval_etas"] == [0.0, 1.0] and "DDIM eta = 0" in results["metric"]
    (row,) = results["tasks"]
    assert [b["eta"] for b in row["by_eta"]] == [0.0, 1.0]
    assert row["by_eta"][0]["finetuned_success"] == row["finetuned_success"]  # the first eta is the headline
    assert sorted((e["tag"], e["eta"]) for e in row["evals"]) == [("final", 0.0), ("final", 1.0),
                                                                   ("initial", 0.0), ("initial", 1.0)]
    # the two samplers act differently on the same seeds
    returns = {e["eta"]: e["mean_return"] for e in row["evals"] if e["tag"] == "initial"}
    assert returns[0.0] != returns[1.0]
    assert "pre-trained (eta = 1) | fine-tuned (eta = 1) |" in (out / "results.md").read_text()


def test_bad_input(pretrained, tmp_path, capsys):
    capsys.readouterr()
    assert "valid: bc, none, kl, pl" in one_line_error(capsys, finetune(pretrained, tmp_path / "a", "task=reach-v3", "reg=ppo"))
    assert "pretrained, scratch" in one_line_error(capsys, finetune(pretrained, tmp_path / "b", "task=reach-v3", "init=warm"))
    msg = one_line_error(capsys, finetune(pretrained, tmp_path / "c", "task=adroit-hammer"))
    assert "26" in msg and "4" in msg
    assert "reach-v9" in one_line_error(capsys, finetune(pretrained, tmp_path / "d", "task=reach-v9"))
    assert "env_steps" in one_line_error(capsys, finetune(pretrained, tmp_path / "e", "task=reach-v3", "env_steps=0"))
    assert "eval.etas" in one_line_error(capsys, finetune(pretrained, tmp_path / "g", "task=reach-v3", "eval.etas=[2]"))
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    assert "junk.ckpt" in one_line_error(capsys, main(["finetune", f"ckpt={junk}", "task=reach-v3", f"out={tmp_path / 'f'}"]))


def test_gae_frozen_steps_and_epochs_through_the_cli(pretrained, tmp_path):
    """DPPO's options end to end: the checkpoint carries the critic, its optimiser, the return
    scale, the frozen prefix and the pre-trained checkpoint's cloud frame, and acts in eval."""
    out = tmp_path / "gae"
    assert finetune(pretrained, out, "task=reach-v3", "env_steps=48", "eval.episodes=0", "algo.advantage=gae",
                    "algo.update_epochs=2", "algo.ft_denoising_steps=4", "algo.critic.warmup_updates=1",
                    "algo.gamma_denoising=0.9") == 0
    saved = load_checkpoint(out / "checkpoints" / "latest.ckpt")
    assert saved["cloud_frame"] == "world"
    assert {"critic", "critic_optimizer", "return_scale"} <= set(saved)
    assert saved["policy_config"]["frozen_steps"] == 10 - 4 and any(k.startswith("prefix.") for k in saved["policy"])
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    warm, trained = [h for h in history if "update" in h]
    assert warm["critic_warmup"] == 1.0 and trained["critic_warmup"] == 0.0
    assert trained["gradient_steps"] == trained["planned_gradient_steps"] > 0
    for key in ("value_loss", "value_explained_variance", "return_scale", "critic_seconds",
                *[f"kl_step{k}" for k in range(6, 10)]):
        assert key in trained, key
    assert "kl_step5" not in trained  # frozen steps are not fine-tuned
    assert main(["eval", f"ckpt={out}", "task=reach-v3", "episodes=1", "num_envs=1", "device=cpu",
                 f"out={tmp_path / 'ev'}", *FAST_ENV]) == 0


def test_a_killed_run_resumes_its_curve_without_repeating_evaluations(pretrained, tmp_path, monkeypatch):
    from sodp3d.finetune import ppo as module

    out = tmp_path / "curve"
    original = module.FineTuner.update
    interrupt_second = interrupting_second_update(original)

    args = ("task=reach-v3", "env_steps=72", "eval.every_env_steps=24", "algo.advantage=gae")
    monkeypatch.setattr(module.FineTuner, "update", interrupt_second)
    assert finetune(pretrained, out, *args) == 130
    monkeypatch.setattr(module.FineTuner, "update", original)
    assert finetune(pretrained, out, *args, "resume=true") == 0
    (row,) = json.loads((out / "results.json").read_text())["tasks"]
    points = [(e["tag"], e["env_steps"]) for e in row["evals"]]
    # Each model is evaluated once: the last update's by the final evaluation alone.
    assert points == [("initial", 0), ("periodic", 24), ("periodic", 48), ("final", 72)], points


def test_bad_algorithm_settings_write_nothing(pretrained, tmp_path, capsys):
    capsys.readouterr()
    for i, (arg, needle) in enumerate([("algo.advantage=foo", "valid: reward, gae"),
                                       ("algo.ft_denoising_steps=11", "[1, 10]"),
                                       ("algo.update_epochs=0", "update_epochs"),
                                       ("algo.target_kl=-0.01", "target_kl"),
                                       ("algo.critic.features=pixels", "valid: policy, own")]):
        out = tmp_path / f"bad{i}"
        assert needle in one_line_error(capsys, finetune(pretrained, out, "task=reach-v3", arg))
        assert not out.exists()
