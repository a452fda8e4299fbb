"""Nothing lost: one writer per run directory, store, sweep root and demo; a second writer is
refused in one line naming the place and the holder's pid, before it writes anything; a
lock whose holder was killed does not block; a write that fails with an operating-system
error (a full disk) is one line with the path, the cause and what is intact, and leaves
no partial file."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sodp3d.checkpoint import load_checkpoint
from sodp3d.cli import main
from sodp3d.data.store import EpisodeDataset
from sodp3d.locks import lock_path, writer_lock

FAST_ENV = ["env.metaworld.resolution=[32,32]", "env.metaworld.num_points=32", "env.metaworld.episode_length=24"]
FT = ["num_envs=1", "algo.p_step=1", "algo.batch_size=20", "algo.bc_batch_size=8", "algo.n_init=1",
      "eval.episodes=1", "device=cpu", "wandb.mode=disabled", "task=reach-v3", *FAST_ENV]
PRE = ["policy=tiny", "batch_size=8", "device=cpu", "wandb.mode=disabled", "log_every=1"]
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS="1")
HOLD = ("import sys, time\nfrom sodp3d.locks import writer_lock\n"
        "with writer_lock(sys.argv[1], sys.argv[2]):\n    print('held', flush=True)\n    time.sleep(600)\n")

pytestmark = pytest.mark.usefixtures("close_cached_envs")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, collect_and_pretrain) -> Path:
    return collect_and_pretrain(tmp_path_factory.mktemp("writers"), "reach-v3", 1, FAST_ENV, ["steps=2", *PRE])


def refused(capsys, rc: int, command: str, place: Path, pid: int) -> str:
    """The one line a refused writer prints: it names the place and the holder's pid."""
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("sodp3d")]
    assert len(lines) == 1 and lines[0].startswith(f"sodp3d {command}: error: {place} is being written by pid {pid}"), err
    return lines[0]


def hold(place: Path, what: str) -> subprocess.Popen:
    """A process holding the writer lock of ``place`` until it is killed."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(place), what], stdout=subprocess.PIPE, text=True,
                             env=CHILD_ENV)
    assert child.stdout.readline().strip() == "held"
    return child


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sodp3d.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=CHILD_ENV)


def wait_for_lock(place: Path, child: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not lock_path(place).exists():
        assert child.poll() is None, child.communicate()[1][-2000:]
        assert time.time() - t0 < timeout, "the first writer never took its lock"
        time.sleep(0.05)


# ---------------------------------------------------------------------------- the lock


def test_a_held_lock_refuses_and_a_killed_holders_lock_does_not_block(tmp_path):
    place = tmp_path / "run"
    child = hold(place, "sodp3d finetune")
    try:
        with pytest.raises(Exception, match=rf"{place} is being written by pid {child.pid}, sodp3d finetune"):
            with writer_lock(place, "sodp3d finetune"):
                pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert lock_path(place).exists()  # left behind by the killed holder, with its pid ...
    with writer_lock(place, "sodp3d finetune"):  # ... and taken at once by the next writer
        assert str(os.getpid()) in lock_path(place).read_text()
    assert not lock_path(place).exists() and not place.exists()  # released and removed; nothing else written


# ---------------------------------------------------------------------------- two writers of one place


def test_two_finetunes_into_one_run_dir_one_runs_the_other_is_refused(pretrained, tmp_path, capsys):
    out = tmp_path / "ft"
    first = start("finetune", f"ckpt={pretrained}", f"out={out}", "env_steps=96", *FT)
    wait_for_lock(out, first)
    # resume=true is what the demo and the sweep pass: it must not let a second writer in.
    rc = main(["finetune", f"ckpt={pretrained}", f"out={out}", "env_steps=96", "resume=true", *FT])
    refused(capsys, rc, "finetune", out, first.pid)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    # What the first wrote is a single writer's: each update logged once, the checkpoint its last.
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    updates = [r["update"] for r in rows if "update" in r]
    assert updates == list(range(1, len(updates) + 1)) and updates
    record = json.loads((out / "results.json").read_text())
    assert record["tasks"][0]["updates"] == updates[-1]
    assert load_checkpoint(out / "checkpoints" / "latest.ckpt")["finetune_state"]["env_steps"] >= 96
    assert not lock_path(out).exists()


def test_two_collects_into_one_store_one_runs_the_other_is_refused(tmp_path, capsys):
    store, single = tmp_path / "two.zarr", tmp_path / "one.zarr"
    args = ["task=reach-v3", "episodes=3", "workers=1", *FAST_ENV]
    first = start("collect", f"out={store}", *args)
    wait_for_lock(store, first)
    rc = main(["collect", f"out={store}", *args])
    refused(capsys, rc, "collect", store, first.pid)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert main(["collect", f"out={single}", *args]) == 0
    a, b = EpisodeDataset(store), EpisodeDataset(single)
    assert a.n_episodes == b.n_episodes == 3
    np.testing.assert_array_equal(a.episode_ends, b.episode_ends)
    for key in a.keys:  # numpy and MuJoCo on one machine: the same bytes in every process
        np.testing.assert_array_equal(a.get(key), b.get(key), err_msg=key)


@pytest.mark.parametrize("command", ["sweep", "demo", "pretrain"])
def test_a_held_sweep_root_demo_dir_or_run_dir_refuses_before_writing(command, pretrained, tmp_path, capsys):
    if command == "sweep":
        place, args = tmp_path / "sweeps" / "demo-smoke", ["experiment=smoke", f"root={tmp_path / 'sweeps'}"]
    elif command == "demo":
        place, args = tmp_path / "demos" / "mine", ["name=mine", f"root={tmp_path / 'demos'}", *FAST_ENV]
    else:
        data = load_checkpoint(pretrained / "checkpoints" / "latest.ckpt")["data"][0]
        place, args = tmp_path / "pre", [f"data={data}", f"out={tmp_path / 'pre'}", "steps=2", *PRE]
    child = hold(place, f"sodp3d {command}")
    try:
        rc = main([command, *args])
        refused(capsys, rc, command, place, child.pid)
        assert not place.exists()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


# ---------------------------------------------------------------------------- full disks


def _no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_last_good_one_loads(pretrained, tmp_path, capsys,
                                                                                    monkeypatch):
    data = load_checkpoint(pretrained / "checkpoints" / "latest.ckpt")["data"][0]
    run = tmp_path / "pre"
    assert main(["pretrain", f"data={data}", f"out={run}", "steps=2", *PRE]) == 0
    ckpt = run / "checkpoints" / "latest.ckpt"
    capsys.readouterr()

    real_fdopen = os.fdopen

    class FillsUp:  # the checkpoint's file: the disk fills once its first kilobyte is written
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, chunk):
            if self.written > 1000:
                _no_space()
            self.written += len(chunk)
            return self.f.write(chunk)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(os, "fdopen", lambda *a, **k: FillsUp(real_fdopen(*a, **k)))
    rc = main(["pretrain", f"data={data}", f"out={run}", "steps=4", "resume=true", *PRE])
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("sodp3d")]
    assert rc == 2 and "Traceback" not in err, err
    assert lines == [f"sodp3d pretrain: error: could not write {ckpt}: no space left on device; "
                     f"the last good checkpoint, step 2, is {ckpt}"]
    monkeypatch.undo()
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["latest.ckpt"]  # no partial file
    assert load_checkpoint(ckpt)["step"] == 2
    assert main(["pretrain", f"data={data}", f"out={run}", "steps=4", "resume=true", *PRE]) == 0  # and it goes on
    assert load_checkpoint(ckpt)["step"] == 4


def test_a_full_disk_during_collection_or_a_results_file_is_one_line(tmp_path, capsys, monkeypatch):
    from sodp3d.data import store
    from sodp3d.files import write_text_atomic
    from sodp3d.errors import UserError

    out = tmp_path / "d.zarr"
    assert main(["collect", f"out={out}", "task=reach-v3", "episodes=1", "workers=1", *FAST_ENV]) == 0
    capsys.readouterr()
    real = store.EpisodeWriter._write

    def half_then_full(self, values, *args):  # the first array's chunk lands, then the disk is full
        key = next(iter(values))
        self.root["data"][key].append(values[key])
        _no_space()

    monkeypatch.setattr(store.EpisodeWriter, "_write", half_then_full)
    rc = main(["collect", f"out={out}", "task=reach-v3", "episodes=2", "workers=1", *FAST_ENV])
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("sodp3d")]
    assert rc == 2 and "Traceback" not in err, err
    assert lines == [f"sodp3d collect: error: could not write {out}: no space left on device; its 1 committed "
                     "episode is intact; run the same command again to continue"]
    monkeypatch.setattr(store.EpisodeWriter, "_write", real)
    assert EpisodeDataset(out).n_episodes == 1  # whole: the half-written episode was cut back
    assert main(["collect", f"out={out}", "task=reach-v3", "episodes=2", "workers=1", *FAST_ENV]) == 0
    assert EpisodeDataset(out).n_episodes == 2

    target = tmp_path / "results.json"
    target.write_text("old")
    monkeypatch.setattr(Path, "write_text", _no_space)
    with pytest.raises(UserError) as e:
        write_text_atomic(target, "new")
    monkeypatch.undo()
    assert str(e.value) == f"could not write {target}: no space left on device; its previous version is intact"
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["d.zarr", "results.json"]
