"""The PPO update over the denoising chain, without environments, on a tiny state-only policy.

The headline case is a bandit with a known answer: a policy pre-trained on bimodal data
(every action +0.5 or every action -0.5) is fine-tuned with a reward that favours one
mode, and the mean reward of fresh samples must rise from ~0. Then the clipped loss
against its closed form, and the guard that keeps the weights when a rollout is not finite.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from finetune_kit import (
    CPU,
    MODE,
    OBS,
    Da,
    Ds,
    S,
    Ta,
    To,
    Tp,
    algo,
    assert_same_params,
    chunk_log_probs,
    const_obs,
    make_policy,
    mode_reward,
    params,
    random_obs,
    sample_rollout,
    trajectory,
)

from sodp3d.finetune.ppo import FineTuner, ppo_loss
from sodp3d.finetune.rollouts import Rollout
from sodp3d.policy import DiffusionPolicy

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

def test_ppo_alone_at_the_large_batch_setting_raises_reward_and_starts_at_ratio_one(pretrained_state):
    """algo=large-batch's regime (PPO epochs over the whole batch in shuffled minibatches,
    clip 0.01) with no regulariser: the first minibatch's ratios are 1 (one epoch, one
    minibatch: the statistics of that step alone), and over a few updates the bandit's
    reward rises instead of collapsing (the update's sign)."""
    import yaml
    from pathlib import Path

    preset = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "algo" / "large-batch.yaml").read_text())
    policy = pretrained_policy(pretrained_state)
    gen = torch.Generator().manual_seed(1)
    reward = mode_reward(+1)
    first = FineTuner(copy.deepcopy(policy), algo(reg="none", update_epochs=1, batch_size=256 * S, clip=preset["clip"],
                                                  lr=preset["lr"]), CPU, seed=0)
    ro, _ = sample_rollout(first, const_obs(256), gen, reward)
    stats = first.update(ro, episodes=1)
    assert stats["gradient_steps"] == 1 and abs(stats["ratio_min"] - 1) < 1e-4 and abs(stats["ratio_max"] - 1) < 1e-4

    # (lr 1e-3 instead of the preset's 1e-4: four updates instead of the hundred of a 1M-step run)
    ft = FineTuner(policy, algo(reg="none", update_epochs=preset["update_epochs"], batch_size=32 * S,
                                clip=preset["clip"], lr=1e-3), CPU, seed=0)
    start = float(sample_rollout(ft, const_obs(256), gen, reward)[0].reward.mean())
    for _ in range(4):
        ro, _ = sample_rollout(ft, const_obs(256), gen, reward)  # 256 chunks: 8 minibatches of 32, 3 epochs
        assert ft.update(ro, episodes=1)["gradient_steps"] == 3 * 8
    end = float(sample_rollout(ft, const_obs(256), gen, reward)[0].reward.mean())
    assert end > start + 0.3, f"mean reward {start:.2f} -> {end:.2f}"


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
    # Sampling ran the U-Net on 32 rows per step, these on 320 and 80: other kernels and
    # reduction orders, so the same chain's log-probs agree to rounding (~1e-6, up to 30x
    # that through the floored std), not bit for bit; a ratio off by a real change is >= 1e-2.
    torch.testing.assert_close(new, ro.old_logp, atol=1e-4, rtol=0)
    torch.testing.assert_close(sub, ro.old_logp[5:13], atol=1e-4, rtol=0)
    _, stats = ppo_loss(new, ro.old_logp, ft.weights(ro.reward), ft.clip)
    assert abs(stats["approx_kl"]) < 1e-6  # (r - 1) - log r of ratios 1 +- 1e-4: at most 5e-9 each, plus fp32's exp
    assert stats["clip_fraction"] == 0
    assert abs(stats["ratio_min"] - 1) < 1e-4 and abs(stats["ratio_max"] - 1) < 1e-4

    # Through update(): one gradient step, whose statistics are taken before the step.
    first = ft.update(ro, episodes=1)
    assert first["gradient_steps"] == 1
    assert abs(first["approx_kl"]) < 1e-6 and first["clip_fraction"] == 0
    assert abs(first["ratio_min"] - 1) < 1e-4 and abs(first["ratio_max"] - 1) < 1e-4
    # ... and the ratios are recomputed: after that step they move away from 1.
    second = ft.update(ro, episodes=1)
    assert second["ratio_max"] - second["ratio_min"] > 1e-4, second


@pytest.mark.parametrize("ppo_weight", [0.0, 1.0])
def test_ppo_weight_switches_the_ppo_term(ppo_weight):
    """ppo_weight = 0 (the BC-only control) with no regulariser leaves the weights where
    they are; the paper's ppo_weight = 1 moves them on the same rollout."""
    policy = make_policy(1)
    ft = FineTuner(policy, algo(p_step=1, batch_size=8 * S, ppo_weight=ppo_weight), CPU, seed=0)
    gen = torch.Generator().manual_seed(2)
    ro, _ = sample_rollout(ft, random_obs(32, gen), gen)
    before = params(policy)
    stats = ft.update(ro, episodes=1)
    assert stats["loss_imp"] != 0  # the term is computed (and logged) either way
    if ppo_weight == 0:
        assert_same_params(before, policy)
    else:
        assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())


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


def _update_raises_and_keeps_the_weights(ft: FineTuner, ro: Rollout) -> None:
    before = params(ft.policy)
    with pytest.raises(FloatingPointError):
        ft.update(ro, episodes=1)
    assert_same_params(before, ft.policy)


@pytest.mark.parametrize("what", ["reward_nan", "obs_inf", "chain_nan"])
def test_non_finite_rollout_raises_and_keeps_the_weights(what):
    policy = make_policy(7)
    ft = FineTuner(policy, algo(p_step=3, batch_size=8 * S), CPU, seed=0)
    gen = torch.Generator().manual_seed(5)
    ro, _ = sample_rollout(ft, random_obs(16, gen), gen)
    _poison(ro, what)
    _update_raises_and_keeps_the_weights(ft, ro)


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
    _update_raises_and_keeps_the_weights(ft, ro)


ENCODER_KEYS = {"dp3": ("point_cloud", "agent_pos"), "state": ("state",)}  # what each normaliser fits


@pytest.mark.parametrize("reg", ["bc", "pl"])
@pytest.mark.parametrize("encoder", ["dp3", "state"])
def test_one_pass_for_the_ppo_and_bc_terms_equals_two(encoder, reg):
    """The update's shared pass (one encoder call over the PPO chunks' and the BC windows'
    observations, one U-Net call over both; PL's loss reads the chunks' own observations,
    encoded once) gives the separate passes' log-probs, loss and gradients, with the same
    draws of noise and diffusion steps."""
    from sodp3d.normalizer import MinMaxNormalizer
    from sodp3d.policy import PolicyConfig

    gen = torch.Generator().manual_seed(0)
    meta = {"point_cloud": [64, 3], "agent_pos": [4], "state": [Ds], "action": [Da]}
    kwargs = {} if encoder == "dp3" else {"hidden": 32, "out_channels": 16}
    torch.manual_seed(0)
    config = PolicyConfig(shape_meta=meta, horizon=Tp, n_obs_steps=To, n_action_steps=Ta, encoder=encoder,
                          encoder_kwargs=kwargs, unet="tiny")
    fit = {k: torch.rand(32, *v, generator=gen).numpy() * 2 - 1 for k, v in meta.items()}
    policy = DiffusionPolicy(config, MinMaxNormalizer.fit({k: fit[k] for k in (*ENCODER_KEYS[encoder], "action")}))
    sampler = policy.ddim(1.0, 0.1)

    def obs(n):
        return {k: torch.rand(n, To, *meta[k], generator=gen) * 2 - 1 for k in policy.obs_keys}

    ppo_obs = obs(5)
    with torch.no_grad():
        chains = policy.sample_chain(ppo_obs, sampler, gen).chain
    if reg == "bc":  # windows of the target buffer
        batch = {"obs": obs(7), "action": torch.rand(7, Tp, Da, generator=gen) * 2 - 1}
    else:  # the chunks' own samples, as PLRegulariser.denoising_batch gives them
        batch = {"obs": ppo_obs, "action": policy.normalizer.unnormalize("action", chains[:, -1])}
    weights = torch.randn(5, 1, generator=gen)

    def run(shared: bool):
        policy.zero_grad(set_to_none=True)
        g = torch.Generator().manual_seed(7)
        if shared:
            logp, loss, _ = policy.chain_log_prob_and_loss(ppo_obs, chains, batch, sampler, g)
        else:
            logp = policy.chain_log_prob(policy.condition(ppo_obs), chains, sampler)
            loss = policy.compute_loss(batch, generator=g)
        ((logp * weights).mean() + loss).backward()
        return logp.detach(), loss.detach(), {n: p.grad.clone() for n, p in policy.named_parameters()}

    logp_1, loss_1, grads_1 = run(shared=True)
    logp_2, loss_2, grads_2 = run(shared=False)
    # One pass runs the U-Net on 57 rows, the other on 50 and 7: other kernels and reduction
    # orders. Log-probs agree to rounding amplified by the floored std (see test_policy); a
    # gradient entry's rounding is bounded by the terms it sums, not by the entry, so the
    # bound is relative to the largest gradient entry of the model. A term missing from one
    # pass changes them by order 1.
    torch.testing.assert_close(logp_1, logp_2, atol=1e-4, rtol=0)
    torch.testing.assert_close(loss_1, loss_2, atol=0, rtol=1e-5)
    assert grads_1.keys() == grads_2.keys()
    scale = max(float(g.abs().max()) for g in grads_2.values())
    for name in grads_2:
        torch.testing.assert_close(grads_1[name], grads_2[name], rtol=1e-4, atol=1e-5 * scale, msg=name)

