"""The fine-tuner's pieces without environments: PPO over the denoising chain, the
regularisers, the target buffer and the NaN guard, on a tiny state-only policy.

Rollouts are built by hand: sample chains for a batch of observations and define the
chunk reward in the test. The headline case is a bandit with a known answer: a policy
pre-trained on bimodal data (every action +0.5 or every action -0.5) is fine-tuned with a
reward that favours one mode, and the mean reward of fresh samples must rise from ~0.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from sodp3d.errors import UserError
from sodp3d.finetune import (
    REGULARISERS,
    BCRegulariser,
    FineTuner,
    Rollout,
    TargetBuffer,
    Trajectory,
    action_windows,
    chunk_log_probs,
    ppo_loss,
)
from sodp3d.normalizer import MinMaxNormalizer
from sodp3d.policy import DiffusionPolicy, PolicyConfig

Tp, To, Ta, Da, Ds = 4, 2, 3, 2, 3
S = 10  # DDIM steps (PolicyConfig default)
CPU = torch.device("cpu")
OBS = torch.tensor([0.1, -0.2, 0.3])  # the bandit's constant observation
MODE = 0.5  # the two modes: every action +MODE or every action -MODE




# ----------------------------------------------------------------------------- helpers


def make_policy(seed: int = 0) -> DiffusionPolicy:
    torch.manual_seed(seed)
    config = PolicyConfig(shape_meta={"state": [Ds], "action": [Da]}, horizon=Tp, n_obs_steps=To, n_action_steps=Ta,
                          encoder="state", encoder_kwargs={"hidden": 32, "out_channels": 16}, unet="tiny")
    rng = np.random.default_rng(seed)
    # Actions span [-1, 1] so that the modes +-0.5 sit inside the sampler's x0 clip.
    norm = MinMaxNormalizer.fit({"state": rng.uniform(-1, 1, (16, Ds)).astype(np.float32),
                                 "action": np.array([[-1.0] * Da, [1.0] * Da], np.float32)})
    return DiffusionPolicy(config, norm)


def algo(**overrides) -> dict:
    a = dict(reg="none", reg_weight=1.0, p_step=1, batch_size=64 * S, bc_batch_size=32, lr=1e-3, lr_decay=1.0,
             clip=0.2, normalize_reward=True, eta=1.0, min_std=0.1, grad_clip=1.0, n_init=0, buffer_capacity=10,
             top_n=3)
    a.update(overrides)
    return a


def const_obs(n: int) -> dict[str, torch.Tensor]:
    return {"state": OBS.expand(n, To, Ds).clone()}


def random_obs(n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"state": torch.rand(n, To, Ds, generator=gen) * 2 - 1}


def sample_rollout(ft: FineTuner, obs: dict[str, torch.Tensor], gen: torch.Generator, reward_fn=None):
    """(Rollout, unnormalised x0 (M, Tp, Da)) as collect() would record them; reward_fn(x0) -> (M,)."""
    policy = ft.policy
    policy.eval()
    with torch.no_grad():
        cond = policy.condition(obs)
        n = cond.shape[0]
        _, chain, logp = ft.sampler.sample(policy.denoiser(cond), (n, Tp, Da), generator=gen, return_chain=True,
                                           return_log_prob=True, device=cond.device)
    x0 = policy.normalizer.unnormalize("action", chain[:, -1])
    reward = reward_fn(x0) if reward_fn is not None else torch.randn(n, generator=gen)
    return Rollout(obs=obs, chains=chain, old_logp=logp, reward=reward.float()), x0


def mode_reward(sign: int):
    """+1 when the chunk's mean action has the favoured sign, else -1."""
    return lambda x0: torch.where(sign * x0.mean(dim=(1, 2)) > 0, 1.0, -1.0)


def params(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}


def assert_same_params(before: dict, policy: torch.nn.Module) -> None:
    after = policy.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"parameters changed: {changed[:5]}"


def trajectory(actions: np.ndarray, starts, ret: float = 0.0, success: bool = False, obs_value=None):
    """A Trajectory with distinct per-chunk observations (chunk i sees state i / 10)."""
    C = len(starts)
    if obs_value is None:
        obs = np.arange(C, dtype=np.float32)[:, None, None] / 10 + np.zeros((C, To, Ds), np.float32)
    else:
        obs = np.full((C, To, Ds), obs_value, np.float32)
    return Trajectory(obs={"state": obs}, actions=np.asarray(actions, np.float32),
                      chunk_starts=np.asarray(starts, np.int64),
                      ret=float(ret), success=bool(success))


# ----------------------------------------------------------------------------- the bandit


@pytest.fixture(scope="module")
def pretrained_state() -> dict:
    """The tiny policy pre-trained (plain AdamW on compute_loss) on the bimodal data."""
    policy = make_policy(0)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(250):
        sign = torch.randint(0, 2, (64, 1, 1), generator=gen).float() * 2 - 1
        batch = {"obs": const_obs(64), "action": (MODE * sign).expand(64, Tp, Da)}
        loss = policy.compute_loss(batch, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return copy.deepcopy(policy.state_dict())


def pretrained_policy(state: dict) -> DiffusionPolicy:
    policy = make_policy(0)
    policy.load_state_dict(state)
    return policy


def test_pretrained_policy_samples_both_modes(pretrained_state):
    ft = FineTuner(pretrained_policy(pretrained_state), algo(), CPU, seed=0)
    _, x0 = sample_rollout(ft, const_obs(256), torch.Generator().manual_seed(1))
    m = x0.mean(dim=(1, 2))
    positive = float((m > 0).float().mean())
    near_mode = float(((m.abs() - MODE).abs() < 0.2).float().mean())
    assert 0.25 < positive < 0.75, f"the pre-trained policy is not bimodal: {positive:.2f} of samples positive"
    assert near_mode > 0.8, f"only {near_mode:.2f} of samples lie near a mode (+-{MODE})"


@pytest.mark.parametrize("reg,sign", [("none", +1), ("none", -1), ("bc", +1)])
def test_bandit_finetuning_raises_reward(pretrained_state, reg, sign):
    policy = pretrained_policy(pretrained_state)
    ft = FineTuner(policy, algo(reg=reg, p_step=5, lr=1e-3, clip=0.2), CPU, seed=0)
    if reg == "bc":
        # The target buffer holds a proficient trajectory of the favoured mode: BC pulls the same way.
        C = 8
        ft.buffer.add([trajectory(np.full((C * Ta, Da), sign * MODE), np.arange(C) * Ta, ret=C, success=True,
                                  obs_value=OBS.numpy()) for _ in range(2)])
    gen = torch.Generator().manual_seed(1)
    reward = mode_reward(sign)
    before, _ = sample_rollout(ft, const_obs(256), gen, reward)
    start = float(before.reward.mean())
    assert abs(start) < 0.5, f"pre-trained mean reward {start:.2f} is not ~0 (not bimodal)"
    history = []
    for _ in range(4):
        ro, _ = sample_rollout(ft, const_obs(64), gen, reward)
        history.append(float(ro.reward.mean()))
        stats = ft.update(ro, episodes=1)
        assert stats["gradient_steps"] == 5
        if reg == "bc":
            assert stats["loss_bc"] > 0
    after, _ = sample_rollout(ft, const_obs(256), gen, reward)
    end = float(after.reward.mean())
    assert end > 0.5 and end > start + 0.4, f"mean reward {start:.2f} -> {end:.2f} (rounds: {history})"


# ----------------------------------------------------------------------------- PPO


def test_first_update_has_ratio_one():
    policy = make_policy(1)
    ft = FineTuner(policy, algo(p_step=1, batch_size=8 * S, clip=0.01), CPU, seed=0)
    gen = torch.Generator().manual_seed(2)
    ro, _ = sample_rollout(ft, random_obs(32, gen), gen)
    assert ro.old_logp.shape == (32, S)
    policy.train()  # as update() does
    with torch.no_grad():
        new = chunk_log_probs(policy, ft.sampler, ro.obs, ro.chains)
        # a minibatch (other batch size) gives the same values
        sub = chunk_log_probs(policy, ft.sampler, {k: v[5:13] for k, v in ro.obs.items()}, ro.chains[5:13])
    torch.testing.assert_close(new, ro.old_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(sub, ro.old_logp[5:13], atol=1e-5, rtol=0)
    _, stats = ppo_loss(new, ro.old_logp, ft.weights(ro.reward), ft.clip)
    assert abs(stats["approx_kl"]) < 1e-8
    assert stats["clip_fraction"] == 0
    assert abs(stats["ratio_min"] - 1) < 1e-5 and abs(stats["ratio_max"] - 1) < 1e-5

    # Through update(): one gradient step, whose statistics are taken before the step.
    first = ft.update(ro, episodes=1)
    assert first["gradient_steps"] == 1
    assert abs(first["approx_kl"]) < 1e-8 and first["clip_fraction"] == 0
    assert abs(first["ratio_min"] - 1) < 1e-5 and abs(first["ratio_max"] - 1) < 1e-5
    # ... and the ratios are recomputed: after that step they move away from 1.
    second = ft.update(ro, episodes=1)
    assert second["ratio_max"] - second["ratio_min"] > 1e-4, second


def test_ppo_loss_closed_form_and_gradients():
    e = 0.1
    log_rho = torch.tensor([[0.5, -0.5, 0.05], [0.5, -0.5, -0.05]])  # rho ~ 1.65, 0.61, 1.05 / 0.95
    old = torch.tensor([[0.3, -1.0, 2.0], [1.0, 0.0, -0.7]])
    new = (old + log_rho).requires_grad_(True)
    A = torch.tensor([2.0, -3.0])  # a positive and a negative weight
    loss, stats = ppo_loss(new, old, A, e)

    rho = log_rho.exp()
    by_hand = -torch.min(rho * A[:, None], rho.clamp(1 - e, 1 + e) * A[:, None]).mean()
    torch.testing.assert_close(loss.detach(), by_hand, atol=1e-6, rtol=1e-6)
    # Written out: rows are (A = 2, A = -3); columns rho = e^0.5 (> 1 + e), e^-0.5 (< 1 - e), inside.
    r = np.exp(0.5), np.exp(-0.5), np.exp(0.05), np.exp(-0.05)
    terms = [2 * (1 + e), 2 * r[1], 2 * r[2],          # A > 0: min(rho A, clip A)
             -3 * r[0], -3 * (1 - e), -3 * r[3]]       # A < 0: min picks rho A above, clip A below
    assert float(loss.detach()) == pytest.approx(-np.mean(terms), rel=1e-5)

    assert stats["ratio_min"] == pytest.approx(float(rho.min()), rel=1e-6)
    assert stats["ratio_max"] == pytest.approx(float(rho.max()), rel=1e-6)
    assert stats["clip_fraction"] == pytest.approx(4 / 6)
    assert stats["approx_kl"] == pytest.approx(float(((rho - 1) - log_rho).mean()), rel=1e-5)

    loss.backward()
    g = new.grad
    n = log_rho.numel()
    # A > 0, rho > 1 + e: the clipped term is chosen, no gradient.
    assert g[0, 0] == 0
    # A < 0, rho > 1 + e: min picks rho * A (not the clipped term): gradient -rho A / n != 0.
    assert float(g[1, 0]) == pytest.approx(3 * r[0] / n, rel=1e-5) and g[1, 0] != 0
    # A > 0, rho < 1 - e: unclipped term chosen; A < 0, rho < 1 - e: clipped, no gradient.
    assert float(g[0, 1]) == pytest.approx(-2 * r[1] / n, rel=1e-5)
    assert g[1, 1] == 0
    # Inside the clip range both are live.
    assert float(g[0, 2]) == pytest.approx(-2 * r[2] / n, rel=1e-5)
    assert float(g[1, 2]) == pytest.approx(3 * r[3] / n, rel=1e-5)


# ----------------------------------------------------------------------------- BC and the buffer


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
    reg = ft.regulariser.loss(None, None, None)
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


# ----------------------------------------------------------------------------- regularisers


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


# ----------------------------------------------------------------------------- NaN guard


def _poison(ro: Rollout, what: str) -> None:
    if what == "reward_nan":
        ro.reward[3] = float("nan")
    elif what == "obs_inf":
        ro.obs["state"][:, 0, 1] = float("inf")
    elif what == "chain_nan":
        ro.chains[:, 4] = float("nan")
    else:
        raise ValueError(what)


@pytest.mark.parametrize("what", ["reward_nan", "obs_inf", "chain_nan"])
def test_non_finite_rollout_raises_and_keeps_the_weights(what):
    policy = make_policy(7)
    ft = FineTuner(policy, algo(p_step=3, batch_size=8 * S), CPU, seed=0)
    gen = torch.Generator().manual_seed(5)
    ro, _ = sample_rollout(ft, random_obs(16, gen), gen)
    _poison(ro, what)
    before = params(policy)
    with pytest.raises(FloatingPointError):
        ft.update(ro, episodes=1)
    assert_same_params(before, policy)


@pytest.mark.parametrize("what", ["one_obs_inf", "one_reward_nan_unnormalised"])
def test_one_poisoned_chunk_raises_before_any_step(what):
    policy = make_policy(7)
    ft = FineTuner(policy, algo(p_step=10, batch_size=4 * S, normalize_reward=False), CPU, seed=0)
    gen = torch.Generator().manual_seed(5)
    ro, _ = sample_rollout(ft, random_obs(32, gen), gen)
    # poison a chunk that the first minibatch does not draw (replaying the tuner's rng)
    replay = np.random.default_rng()
    replay.bit_generator.state = copy.deepcopy(ft.rng.bit_generator.state)
    first = set(replay.integers(0, ro.size, size=4).tolist())
    later = [int(i) for i in replay.integers(0, ro.size, size=4 * 9) if int(i) not in first]
    assert later, "pick another seed: every later minibatch repeats the first"
    bad = later[0]
    if what == "one_obs_inf":
        ro.obs["state"][bad, 1, 0] = float("inf")
    else:
        ro.reward[bad] = float("nan")
    before = params(policy)
    with pytest.raises(FloatingPointError):
        ft.update(ro, episodes=1)
    assert_same_params(before, policy)
