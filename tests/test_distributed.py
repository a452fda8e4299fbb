"""Pre-training in several processes (torchrun, gloo on CPU): two processes take the steps
one process takes with the same global batch and seed; a run killed under two processes
resumes to the weights one process resumes to; rank 0 alone writes and prints; a batch
that does not split is one line and writes nothing.

What "the same steps" can promise in floating point. Each gradient entry is a sum over
the batch's rows and positions; one process sums the whole batch, two processes sum
halves and average them (gloo's all-reduce), and the CPU's kernels block the sums by
batch size, thread count and instruction set (AVX2, AVX-512, AMX). The results differ by
rounding, and rounding is bounded by the magnitude of the terms summed (fp32's unit
roundoff u = 6e-8 times up to ~10^3 terms), not by the sum: where terms cancel, as in a
GroupNorm weight's gradient, the entry is small and its relative error large (measured:
4e-4 of that tensor's own step). So the tests compare the steps taken, w_k - w_0, entry
by entry against the largest step entry of the whole model, STEP_TOL = 1e-4 of it.
Measured on an AVX-512 + AMX CPU under ATEN_CPU_CAPABILITY default, avx2 and avx512 and
1 or 2 threads: at most 6e-6 (a margin of 17x), while the same steps on other rows of
the data differ by 0.3-0.5 (the test checks that they are refused).

They train with SGD (``optim.name=sgd``), whose step is linear in the gradient. AdamW
divides by the root of the squared gradient: a rounding difference of 1e-7 in a
near-zero gradient becomes a step of size lr, so its weights after steps cannot be
compared at a tolerance that would also catch a wrong step.
"""

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
        "optim.name=sgd", "optim.lr=0.1"]
STEP_TOL = 1e-4  # of the largest entry of the whole model's step; see the module's docstring


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


@pytest.fixture(scope="module")
def initial(dataset, tmp_path_factory) -> dict:
    """The weights before any step (the same seed gives the same initial weights in every
    process: they are drawn, not reduced)."""
    run = tmp_path_factory.mktemp("zero") / "run"
    assert main(["pretrain", f"data={dataset}", f"out={run}", "steps=1", *TINY, "optim.lr=0.0"]) == 0
    return weights(run)


def assert_same_steps(w0: dict, a: dict, b: dict) -> None:
    """The steps w - w0 of runs a and b agree entry by entry within STEP_TOL of the largest
    step entry of the model (weights and their EMA, each on its own scale)."""
    for part in ("policy", "ema_policy"):
        assert a[part].keys() == b[part].keys() == w0[part].keys()
        steps = {k: (a[part][k] - w, b[part][k] - w) for k, w in w0[part].items() if w.is_floating_point()}
        scale = max(float(sa.abs().max()) for sa, _ in steps.values())
        assert scale > 0, f"{part}: no step was taken"
        for name, (step_a, step_b) in steps.items():
            torch.testing.assert_close(step_b, step_a, rtol=0, atol=STEP_TOL * scale,
                                       msg=lambda m, n=f"{part}.{name}": f"{n}: {m}")


@pytest.fixture(scope="module")
def one_process(dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("one") / "run"
    assert main(["pretrain", f"data={dataset}", f"out={run}", "steps=4", *TINY]) == 0
    return run


def test_two_processes_take_the_steps_of_one(dataset, one_process, initial, tmp_path):
    run = tmp_path / "two"
    r = torchrun("pretrain", f"data={dataset}", f"out={run}", "steps=4", *TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = weights(one_process), weights(run)
    assert a["step"] == b["step"] == 4
    assert_same_steps(initial, a, b)
    # The steps moved the weights: two steps fewer give other weights.
    fewer = tmp_path / "fewer"
    assert main(["pretrain", f"data={dataset}", f"out={fewer}", "steps=2", *TINY]) == 0
    name = next(k for k in a["policy"] if k.startswith("model.") and k.endswith("weight"))
    assert not torch.allclose(weights(fewer)["policy"][name], a["policy"][name])
    # The tolerance tells rows apart: the same steps on a batch of other windows are refused.
    other = tmp_path / "other-rows"
    assert main(["pretrain", f"data={dataset}", f"out={other}", "steps=4", *TINY, "batch_size=16"]) == 0
    with pytest.raises(AssertionError):
        assert_same_steps(initial, a, weights(other))
    # Rank 0 alone writes and prints.
    record = json.loads((run / "results.json").read_text())
    assert record["processes"] == 2 and record["steps"] == 4
    assert r.stdout.count("pre-trained 4 steps") == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4


def test_a_run_resumed_under_two_processes_matches_one_process_resumed(dataset, initial, tmp_path):
    """Stopped after 2 steps and continued to 4 (the schedule's length changes with
    ``steps``, so the reference is the same two invocations in one process)."""
    one, two = tmp_path / "one", tmp_path / "two"
    for steps, extra in (("steps=2", []), ("steps=4", ["resume=true"])):
        assert main(["pretrain", f"data={dataset}", f"out={one}", steps, *extra, *TINY]) == 0
        r = torchrun("pretrain", f"data={dataset}", f"out={two}", steps, *extra, *TINY)
        assert r.returncode == 0, r.stderr[-3000:]
    assert weights(two)["step"] == 4
    assert_same_steps(initial, weights(one), weights(two))



def test_a_batch_that_does_not_split_is_one_line_and_writes_nothing(dataset, tmp_path):
    run = tmp_path / "odd"
    r = torchrun("pretrain", f"data={dataset}", f"out={run}", "steps=2", *TINY[:1], "batch_size=7", *TINY[2:])
    assert r.returncode != 0
    ours = [line for line in r.stderr.splitlines() if line.startswith("sodp3d pretrain: error:")]
    assert ours == ["sodp3d pretrain: error: batch_size=7 does not split over 2 processes; use a multiple of 2"]
    assert not run.exists()
