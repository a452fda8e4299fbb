"""A dataset holding NaN or infinity in what training reads is refused when it is opened.

Without the check, `sodp3d pretrain` starts, writes a run directory with an untrained
checkpoint and stops with "training diverged (loss is nan at step 0)". With it, opening
the windows is a one-line UserError naming the file, the array, the episode and the step.
Stores of both layouts (ours, written by EpisodeWriter, and DP3's) are poisoned with zarr
directly; the second episode crosses the 100-step chunk boundary.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from store_kit import assert_one_line_error, make_dp3_store, make_episode

from sodp3d.cli import main
from sodp3d.data.store import EpisodeDataset, EpisodeWriter
from sodp3d.data.windows import WindowDataset
from sodp3d.errors import UserError

LENGTHS = (30, 130, 40)  # episode starts: 0, 30, 160
KEYS = ["point_cloud", "agent_pos"]  # what the dp3 encoder reads; action is always read


def write_clean(path: Path) -> Path:
    writer = EpisodeWriter.create(path, {"source": "test"})
    for i, n in enumerate(LENGTHS):
        writer.append_episode(make_episode(i, n), "reach-v3", {"success": False})
    return path


def poison(path: Path, array: str, row: int, value: float, where: tuple = ()) -> None:
    """Write ``value`` into one element of ``array`` (its path in the store) at step ``row``."""
    arr = zarr.open_group(str(path), mode="r+")[array]
    block = np.asarray(arr[row])
    block[where] = value
    arr[row] = block


# (stored array, global step, value, index within the step, episode, step in the episode)
CASES = {
    "nan-action": ("data/action", 30 + 17, np.nan, (2,), 1, 17),
    "inf-point-cloud": ("data/point_cloud", 160 + 5, np.inf, (7, 2), 2, 5),
    "nan-agent-pos": ("data/agent_pos", 3, np.nan, (0,), 0, 3),
    "minus-inf-past-a-chunk": ("data/action", 30 + 129, -np.inf, (0,), 1, 129),
}


@pytest.mark.parametrize("memory_fraction", [0.5, 0.0], ids=["in-memory", "from-zarr"])
@pytest.mark.parametrize("case", list(CASES))
def test_window_dataset_names_array_episode_and_step(tmp_path, case, memory_fraction):
    array, row, value, where, episode, step = CASES[case]
    path = write_clean(tmp_path / "data.zarr")
    poison(path, array, row, value, where)
    with pytest.raises(UserError) as e:
        WindowDataset([str(path)], KEYS, 4, 2, 2, memory_fraction=memory_fraction)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == (
        f"{path}: {array} holds a non-finite value ({float(value)}) at episode {episode}, step {step}; "
        "the dataset is corrupt: re-collect it or drop that episode"
    )


def test_only_the_first_bad_value_is_named_and_unread_keys_do_not_count(tmp_path):
    path = write_clean(tmp_path / "data.zarr")
    poison(path, "data/state", 0, np.nan)  # not read by the dp3 encoder
    poison(path, "data/reward", 1, np.inf)
    WindowDataset([str(path)], KEYS, 4, 2, 2)
    with pytest.raises(UserError, match="data/state .*episode 0, step 0"):
        WindowDataset([str(path)], ["state"], 4, 2, 2)
    poison(path, "data/action", 40, np.nan)
    poison(path, "data/action", 190, np.nan)
    with pytest.raises(UserError, match=r"data/action holds a non-finite value \(nan\) at episode 1, step 10;"):
        WindowDataset([str(path)], KEYS, 4, 2, 2)


def test_uncommitted_rows_are_dropped_before_anything_reads_them(tmp_path):
    """Rows past the last commit (a killed append) are not part of the dataset: a reader
    refuses the store until the collection's writer drops them, and then it opens clean."""
    from sodp3d.data.store import EpisodeWriter

    path = write_clean(tmp_path / "data.zarr")
    root = zarr.open_group(str(path), mode="r+")
    root["data/action"].append(np.full((5, 4), np.nan, np.float32))
    with pytest.raises(UserError, match="5 frames lie past its last committed episode"):
        WindowDataset([str(path)], KEYS, 4, 2, 2)
    assert EpisodeWriter.open(path).dropped_frames == 5
    assert EpisodeDataset(path).n_steps == sum(LENGTHS)
    WindowDataset([str(path)], KEYS, 4, 2, 2)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_dp3_layout_names_its_own_arrays(tmp_path, zarr_format):
    path = tmp_path / "dp3.zarr"
    make_dp3_store(path, zarr_format, lengths=(6, 4, 9))
    WindowDataset([str(path)], KEYS, 4, 2, 2)  # clean: opens
    poison(path, "data/state", 6 + 2, np.nan, (1,))  # DP3's state is our agent_pos
    with pytest.raises(UserError) as e:
        WindowDataset([str(path)], KEYS, 4, 2, 2)
    assert str(e.value) == (
        f"{path}: data/state holds a non-finite value (nan) at episode 1, step 2; "
        "the dataset is corrupt: re-collect it or drop that episode"
    )
    poison(path, "data/state", 6 + 2, 0.0, (1,))
    poison(path, "data/point_cloud", 18, np.inf, (511, 0))  # the very last value
    with pytest.raises(UserError, match=r"data/point_cloud holds a non-finite value \(inf\) at episode 2, step 8;"):
        WindowDataset([str(path)], KEYS, 4, 2, 2)


def test_clean_stores_open(tmp_path):
    path = write_clean(tmp_path / "data.zarr")
    for frac in (0.5, 0.0):
        ds = WindowDataset([str(path)], KEYS, 4, 2, 2, memory_fraction=frac)
        assert ds.n_steps == sum(LENGTHS)
        batch = ds.sample(8, np.random.default_rng(0))
        assert np.isfinite(batch["action"]).all()


PRETRAIN = ["steps=2", "batch_size=4", "policy=tiny", "encoder=dp3", "device=cpu", "wandb.mode=disabled"]


@pytest.mark.parametrize("case", ["nan-action", "inf-point-cloud", "nan-agent-pos"])
def test_pretrain_refuses_a_non_finite_dataset_and_writes_nothing(tmp_path, capsys, case):
    array, row, value, where, episode, step = CASES[case]
    path = write_clean(tmp_path / "data.zarr")
    poison(path, array, row, value, where)
    out = tmp_path / "run"
    capsys.readouterr()
    rc = main(["pretrain", f"data={path}", f"out={out}", *PRETRAIN])
    o, e = capsys.readouterr()
    msg = assert_one_line_error(rc, o, e, command="pretrain")
    assert f"{path}: {array} holds a non-finite value" in msg and f"at episode {episode}, step {step};" in msg
    assert not out.exists()


def test_pretrain_runs_on_the_same_store_when_clean(tmp_path):
    """The refusal above is the check's doing: the same store and settings, clean, train."""
    path = write_clean(tmp_path / "data.zarr")
    out = tmp_path / "run"
    assert main(["pretrain", f"data={path}", f"out={out}", *PRETRAIN]) == 0
    assert (out / "checkpoints" / "latest.ckpt").exists()
