"""sodp3d demo end to end (smoke size), its resumption and bad input; the CLI's help."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from sodp3d.cli import COMMANDS, main

FILES = ["config.yaml", "results.json", "results.md", "curves.png", "rollout.gif", "rollout.mp4", "rollout.html", "dataset.png",
         "data.zarr", "pretrain/checkpoints/latest.ckpt", "finetune/checkpoints/latest.ckpt"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    rc = main(["demo", "experiment=smoke", f"root={root}", "device=cpu"])
    assert rc == 0
    return root / "demo-smoke"


def test_demo_writes_every_file_and_the_table(demo_run, capsys):
    for name in FILES:
        assert (demo_run / name).exists(), name
    results = json.loads((demo_run / "results.json").read_text())
    assert results["kind"] == "finetune" and results["pretrain_tasks"] == ["reach-v3", "button-press-topdown-v3"]
    (row,) = results["tasks"]
    assert row["task"] == "reach-v3"
    assert 0 <= row["pretrained_success"] <= 1 and 0 <= row["finetuned_success"] <= 1
    assert row["history"] and row["history"][-1]["env_steps"] >= 96
    assert set(results["seconds"]) == {"collect", "pretrain", "finetune", "report"}
    assert results["dataset"]["episodes"] == 4
    table = (demo_run / "results.md").read_text()
    assert ("| task | pre-trained (eta = 0) | fine-tuned (eta = 0) | change | pre-trained (eta = 1) "
            "| fine-tuned (eta = 1) | change |") in table
    assert [b["eta"] for b in row["by_eta"]] == [0.0, 1.0]
    assert "| reach-v3 |" in table and "final evaluation" in table
    assert Image.open(demo_run / "rollout.gif").n_frames >= 2
    assert Image.open(demo_run / "curves.png").size[0] > 200
    assert not list(demo_run.glob(".*tmp*"))


def test_viz_of_a_finetuned_checkpoint_writes_gif_mp4_and_html(demo_run, tmp_path, capsys):
    """`sodp3d viz ckpt=<fine-tuning run>` acts on the task it was trained on and writes
    the same frames as GIF and MP4, plus the page."""
    assert main(["viz", f"ckpt={demo_run / 'finetune'}", f"out={tmp_path}", "device=cpu"]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["reach-v3-seed0.gif", "reach-v3-seed0.html", "reach-v3-seed0.mp4"], names
    assert all((tmp_path / n).stat().st_size > 1000 for n in names)
    assert "reach-v3-seed0.mp4" in capsys.readouterr().out


def test_a_rerun_resumes_instead_of_redoing(demo_run, capsys):
    root = demo_run.parent
    metrics = demo_run / "finetune" / "metrics.jsonl"
    before = metrics.read_text()
    pre_metrics = (demo_run / "pretrain" / "metrics.jsonl").read_text()
    pre_steps = json.loads((demo_run / "results.json").read_text())["pretrain_steps"]
    assert main(["demo", "experiment=smoke", f"root={root}", "device=cpu"]) == 0
    assert metrics.read_text() == before  # the finished fine-tuning was not repeated
    assert (demo_run / "pretrain" / "metrics.jsonl").read_text() == pre_metrics  # nor the pre-training
    again = json.loads((demo_run / "results.json").read_text())
    assert again["pretrain_steps"] == pre_steps
    assert "| reach-v3 |" in capsys.readouterr().out
    # Without resume an existing demo is refused.
    assert main(["demo", "experiment=smoke", f"root={root}", "resume=false"]) == 2
    assert "already holds a demo" in capsys.readouterr().err


def test_demo_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    for args, words in [(["task=[reach-v3,flying-v3]"], "flying-v3"), (["encoder=nope"], "bad override"),
                        (["finetune_task=[adroit-nope]"], "adroit-nope"), (["task=adroit-door"], "source=sac")]:
        rc = main(["demo", "experiment=smoke", f"root={tmp_path}", *args])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err and words in err, (args, err)
        assert len([ln for ln in err.splitlines() if ln.startswith("sodp3d demo: error:")]) == 1
    assert not any(tmp_path.iterdir())


def test_help_lists_every_command_and_each_commands_groups(capsys):
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    for name in ("demo", "collect", "pretrain", "finetune", "eval", "viz", "sweep", "report"):
        assert f"\n  {name} " in top
    assert set(COMMANDS) == {"demo", "collect", "pretrain", "finetune", "eval", "viz", "sweep", "report"}
    expect = {"demo": ["env:", "encoder:", "policy:", "algo: cpu, large-batch, sodp",
                       "experiment: ablation-cpu, adroit-cpu, adroit-paper, finetune-cpu, image-vs-dp3-cpu, mt10-cpu, mt10-paper, mt10-state, smoke, transfer-cpu", "Tasks"],
              "pretrain": ["encoder: dp3, image, pointnet, state", "policy: paper, simple, tiny"],
              "finetune": ["algo: cpu, large-batch, sodp  (default: sodp)", "Tasks"], "report": ["runs:"],
              "viz": ["ckpt:", "data:"], "eval": ["Tasks"], "collect": ["source:"],
              "sweep": ["Experiments (experiment=<name>):", "smoke: 8 runs (2 collect, 2 pretrain, 4 finetune)",
                        "variants bc, none", "ray:", "max_retries:",
                        "finetune-cpu: 60 runs (3 collect, 3 pretrain, 54 finetune); seeds [0, 1, 2]; "
                        "variants bc, bc-only, none, gae-bc, noise-sac, noise-sac-uniform",
                        "mt10-cpu: 82 runs (10 collect, 3 pretrain, 69 finetune); seeds [0, 1, 2]; "
                        "variants bc, bc-only, noise-sac",
                        "mt10-state: 88 runs (10 collect, 3 pretrain, 75 finetune); seeds [0, 1, 2]; "
                        "variants bc, bc-only, gae-bc, gae, bc-only-1m, gae-bc-1m, noise-sac, bc-1m",
                        "transfer-cpu: 52 runs (10 collect, 6 pretrain, 36 finetune); seeds [0, 1, 2]; "
                        "variants multi-task, single-task, scratch, noise-sac; fine-tuned tasks drawer-open-v3, "
                        "plate-slide-side-v3, handle-pull-side-v3"]}
    for name, words in expect.items():
        assert main([name, "--help"]) == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: sodp3d {name}")
        for w in words:
            assert w in text, (name, w)


def test_every_command_takes_hydra_group_overrides(capsys):
    assert main(["demo", "encoder=pointnet", "policy=simple", "algo=sodp", "--cfg"]) == 0
    cfg = capsys.readouterr().out
    assert "name: pointnet" in cfg and "unet: simple" in cfg and "lr: 1.0e-05" in cfg
    assert main(["finetune", "algo=cpu", "ckpt=x", "task=adroit-door", "out=y", "--cfg"]) == 0
    assert "lr: 0.0001" in capsys.readouterr().out
