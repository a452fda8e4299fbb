"""Pre-training in several processes (torchrun, gloo on CPU): two processes take exactly
the steps one process takes with the same global batch and seed; a run killed under
two processes resumes to the same weights; rank 0 alone writes and prints; a batch that
does not split is one line and writes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from sodp3d.checkpoint import load_checkpoint
from sodp3d.cli import main

FAST_ENV = ["env.metaworld.resolution=[32,32]", "env.metaworld.num_points=32", "env.metaworld.episode_length=24"]
TINY = ["policy=tiny", "batch_size=8", "device=cpu", "wandb.mode=disabled", "optim.warmup_steps=1", "log_every=1",
        "optim.lr=1e-3"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "reach.zarr"
    assert main(["collect", "task=reach-v3", "episodes=2", f"out={out}", "workers=1", *FAST_ENV]) == 0
    return out


def torchrun(*args: str, n: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           "-m", "sodp3d.cli", *args], capture_output=True, text=True, env=env, timeout=600)


def weights(run) -> dict:
    return load_checkpoint(run / "checkpoints" / "latest.ckpt")


def assert_same_weights(a: dict, b: dict) -> None:
    for part in ("policy", "ema_policy"):
        assert a[part].keys() == b[part].keys()
        for name, tensor in a[part].items():
            torch.testing.assert_close(b[part][name], tensor, rtol=1e-4, atol=1e-6, msg=f"{part}.{name}")


@pytest.fixture(scope="module")
def one_process(dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("one") / "run"
    assert main(["pretrain", f"data={dataset}", f"out={run}", "steps=4", *TINY]) == 0
    return run


def test_two_processes_take_the_steps_of_one(dataset, one_process, tmp_path):
    run = tmp_path / "two"
    r = torchrun("pretrain", f"data={dataset}", f"out={run}", "steps=4", *TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = weights(one_process), weights(run)
    assert a["step"] == b["step"] == 4
    assert_same_weights(a, b)
    # The steps moved the weights: two steps fewer give other weights.
    fewer = tmp_path / "fewer"
    assert main(["pretrain", f"data={dataset}", f"out={fewer}", "steps=2", *TINY]) == 0
    name = next(k for k in a["policy"] if k.startswith("model.") and k.endswith("weight"))
    assert not torch.allclose(weights(fewer)["policy"][name], a["policy"][name])
    # Rank 0 alone writes and prints.
    record = json.loads((run / "results.json").read_text())
    assert record["processes"] == 2 and record["steps"] == 4
    assert r.stdout.count("pre-trained 4 steps") == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4


def test_a_run_resumed_under_two_processes_matches_one_process_resumed(dataset, tmp_path):
    """Stopped after 2 steps and continued to 4 (the schedule's length changes with
    ``steps``, so the reference is the same two invocations in one process)."""
    one, two = tmp_path / "one", tmp_path / "two"
    for steps, extra in (("steps=2", []), ("steps=4", ["resume=true"])):
        assert main(["pretrain", f"data={dataset}", f"out={one}", steps, *extra, *TINY]) == 0
        r = torchrun("pretrain", f"data={dataset}", f"out={two}", steps, *extra, *TINY)
        assert r.returncode == 0, r.stderr[-3000:]
    assert weights(two)["step"] == 4
    assert_same_weights(weights(one), weights(two))


def test_a_batch_that_does_not_split_is_one_line_and_writes_nothing(dataset, tmp_path):
    run = tmp_path / "odd"
    r = torchrun("pretrain", f"data={dataset}", f"out={run}", "steps=2", *TINY[:1], "batch_size=7", *TINY[2:])
    assert r.returncode != 0
    ours = [line for line in r.stderr.splitlines() if line.startswith("sodp3d pretrain: error:")]
    assert ours == ["sodp3d pretrain: error: batch_size=7 does not split over 2 processes; use a multiple of 2"]
    assert not run.exists()
