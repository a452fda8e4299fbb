"""The target buffer: its windows are the pre-training windows, its BC term is the
pre-training loss, and it keeps the proficient trajectories within its capacity."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from finetune_kit import CPU, Da, Ta, To, Tp, algo, make_policy, trajectory

from sodp3d.finetune.buffer import TargetBuffer, action_windows
from sodp3d.finetune.ppo import FineTuner
from sodp3d.finetune.regularisers import BCRegulariser


def test_action_windows_are_the_pretraining_windows():
    T = 8  # executed actions 0..7; chunks start at 0, 3, 6 (the last one ran out after 2)
    actions = np.stack([np.arange(T), -np.arange(T) * 10], axis=1).astype(np.float32)
    traj = trajectory(actions, [0, 3, 6])
    w = action_windows(traj, Tp, To)
    assert w.shape == (3, Tp, Da)
    # window i starts at chunk_starts[i] - (To - 1) = start - 1, edge-padded at both ends
    expected_steps = [[0, 0, 1, 2], [2, 3, 4, 5], [5, 6, 7, 7]]
    np.testing.assert_array_equal(w, actions[np.array(expected_steps)])
    # the executed part of each window (steps To-1 .. To-2+Ta) is the chunk's own actions
    np.testing.assert_array_equal(w[1, To - 1: To - 1 + Ta], actions[3:6])


def test_buffer_sample_and_bc_term_equal_the_pretraining_loss():
    T = 8
    actions = np.stack([np.linspace(-1, 1, T), np.linspace(1, -1, T) ** 3], axis=1).astype(np.float32)
    traj = trajectory(actions, [0, 3, 6], ret=1.0, success=True)
    windows = action_windows(traj, Tp, To)

    buf = TargetBuffer(capacity=5, top_n=2)
    buf.add([traj])
    batch = buf.sample(16, Tp, To, np.random.default_rng(7))
    flat = np.random.default_rng(7).integers(0, 3, size=16)  # one trajectory: the chunk indices
    np.testing.assert_array_equal(batch["action"], windows[flat])
    np.testing.assert_array_equal(batch["obs"]["state"], traj.obs["state"][flat])
    assert batch["action"].dtype == np.float32 and batch["action"].shape == (16, Tp, Da)

    policy = make_policy(3)
    ft = FineTuner(policy, algo(reg="bc", bc_batch_size=16), CPU, seed=5)
    assert isinstance(ft.regulariser, BCRegulariser)
    ft.buffer.add([traj])
    rng_copy = np.random.default_rng()
    rng_copy.bit_generator.state = copy.deepcopy(ft.rng.bit_generator.state)
    gen_copy = torch.Generator().manual_seed(0)
    gen_copy.set_state(ft.torch_gen.get_state())
    policy.train()
    reg = ft.regulariser.loss(None, None, None, None)  # bc reads only its own buffer
    same = policy.compute_loss(ft.buffer.sample(16, Tp, To, rng_copy), generator=gen_copy)
    assert reg.requires_grad
    torch.testing.assert_close(reg, same, atol=0, rtol=0)
    # a different generator state gives a different loss (the comparison is not vacuous)
    other = policy.compute_loss(ft.buffer.sample(16, Tp, To, np.random.default_rng(99)),
                                generator=torch.Generator().manual_seed(99))
    assert float(other.detach()) != float(reg.detach())


def test_target_buffer_proficient_and_capacity():
    acts = np.zeros((6, Da), np.float32)
    buf = TargetBuffer(capacity=4, top_n=2)
    assert len(buf) == 0
    with pytest.raises(RuntimeError):
        buf.sample(2, Tp, To, np.random.default_rng(0))
    fails = [trajectory(acts, [0, 3], ret=r) for r in (1.0, 5.0, 3.0)]
    buf.add(fails)
    # no success: the top_n by return, best first
    assert [t.ret for t in buf.proficient()] == [5.0, 3.0]
    assert len(buf) == 2
    win = trajectory(acts, [0, 3], ret=-10.0, success=True)
    buf.add([win])
    # any success: the successes only, whatever their return
    assert buf.proficient() == [win]
    # capacity 4: adding two more drops the two oldest (returns 1 and 5)
    buf.add([trajectory(acts, [0, 3], ret=r) for r in (0.5, 0.25)])
    assert len(buf.trajectories) == 4
    assert [t.ret for t in buf.trajectories] == [3.0, -10.0, 0.5, 0.25]
    assert buf.proficient() == [win]
    buf.add([trajectory(acts, [0, 3], ret=r) for r in (2.0, 4.0)])  # the success falls out
    assert [t.ret for t in buf.proficient()] == [4.0, 2.0]
    # sampling draws only from proficient trajectories
    buf = TargetBuffer(capacity=4, top_n=1)
    buf.add([trajectory(np.full((6, Da), v, np.float32), [0, 3], ret=v) for v in (1.0, 7.0, 2.0)])
    batch = buf.sample(32, Tp, To, np.random.default_rng(0))
    assert np.all(batch["action"] == 7.0)
