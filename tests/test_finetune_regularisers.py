"""The regularisers (bc, none, kl, pl): each runs and reports its loss term; KL grows as
the policy moves while the reference stays frozen; an unknown name is a user error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from finetune_kit import (
    CPU,
    Da,
    S,
    algo,
    assert_same_params,
    make_policy,
    params,
    random_obs,
    sample_rollout,
    trajectory,
)

from sodp3d.errors import UserError
from sodp3d.finetune.ppo import FineTuner
from sodp3d.finetune.regularisers import REGULARISERS


@pytest.mark.parametrize("reg", sorted(REGULARISERS))
def test_each_regulariser_runs_and_reports(reg):
    policy = make_policy(4)
    ft = FineTuner(policy, algo(reg=reg, p_step=1, batch_size=8 * S, bc_batch_size=16), CPU, seed=0)
    gen = torch.Generator().manual_seed(3)
    ro, _ = sample_rollout(ft, random_obs(16, gen), gen)
    if reg == "bc":
        ft.buffer.add([trajectory(np.random.default_rng(0).uniform(-1, 1, (9, Da)), [0, 3, 6], success=True)])
    before = params(policy)
    stats = ft.update(ro, episodes=1)
    key = f"loss_{reg}"
    assert key in stats, sorted(stats)
    for k in ("loss", "loss_imp", "approx_kl", "clip_fraction", "ratio_min", "ratio_max", "grad_norm", "lr"):
        assert np.isfinite(stats[k]), (k, stats)
    if reg in ("bc", "pl"):
        assert stats[key] > 0
        assert stats["loss"] == pytest.approx(stats["loss_imp"] + stats[key], rel=1e-5, abs=1e-7)
    elif reg == "kl":
        assert 0 <= stats[key] < 1e-10  # the reference equals the policy before the first step
    else:
        assert stats[key] == 0 and stats["loss"] == stats["loss_imp"]
    changed = [k for k, v in policy.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "one update did not change the policy"


def test_kl_grows_as_the_policy_moves_and_reference_stays_frozen():
    policy = make_policy(5)
    ft = FineTuner(policy, algo(reg="kl", p_step=3, batch_size=8 * S, lr=3e-3), CPU, seed=0)
    assert ft.reference is not None and ft.reference is not policy
    assert not any(p.requires_grad for p in ft.reference.parameters())
    ref_before = params(ft.reference)
    gen = torch.Generator().manual_seed(4)
    kls = []
    for _ in range(3):
        ro, _ = sample_rollout(ft, random_obs(16, gen), gen)
        kls.append(ft.update(ro, episodes=1)["loss_kl"])
    # the first update's first step sees KL = 0; its later steps and all later updates see the moved policy
    assert min(kls) > 1e-6, kls
    assert_same_params(ref_before, ft.reference)

    # An explicit reference is used as given: a different model gives KL > 0 at once.
    other = make_policy(6)
    ft2 = FineTuner(make_policy(5), algo(reg="kl", p_step=1, batch_size=8 * S), CPU, seed=0, reference=other)
    assert ft2.reference is other
    ro, _ = sample_rollout(ft2, random_obs(16, gen), gen)
    assert ft2.update(ro, episodes=1)["loss_kl"] > 1e-6


def test_unknown_regulariser_is_a_user_error():
    with pytest.raises(UserError) as info:
        FineTuner(make_policy(0), algo(reg="dpok"), CPU, seed=0)
    msg = str(info.value)
    assert "dpok" in msg
    for name in ("bc", "none", "kl", "pl"):
        assert name in msg
