"""DPPO's pieces beside the paper's update: GAE over chunk steps against hand-computed
numbers, the critic, the epochs regime, the frozen early denoising steps, and the sign
of an update's effect on the log-probabilities of chains with positive and negative
advantage. A tiny state-only policy, no environments."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from finetune_kit import (
    CPU,
    S,
    Ta,
    To,
    algo,
    chunk_log_probs,
    const_obs,
    make_policy,
    params,
    random_obs,
    sample_rollout,
    trajectory,
)

from sodp3d.errors import UserError
from sodp3d.finetune.advantages import RunningReturnScale, gae, rollout_gae, standardise
from sodp3d.finetune.critic import Critic
from sodp3d.finetune.epochs import minibatches, steps_per_update
from sodp3d.finetune.ppo import FineTuner
from sodp3d.finetune.rollouts import Rollout

# ----------------------------------------------------------------------------- GAE


def test_gae_matches_a_hand_computed_episode_cut_by_the_time_limit():
    # Three chunks; the episode hit its time limit after 2 of the last chunk's Ta = 3 steps.
    r, v = [1.0, 2.0, 3.0], [0.5, 1.0, 1.5]
    v_final, gamma, lam = 4.0, 0.9, 0.8
    g_last = gamma ** (2 / 3)
    d2 = 3.0 + g_last * v_final - 1.5  # bootstraps: a time limit is not a terminal state
    d1 = 2.0 + gamma * 1.5 - 1.0
    d0 = 1.0 + gamma * 1.0 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    disc = torch.tensor([gamma, gamma, g_last], dtype=torch.float64)
    adv, ret = gae(torch.tensor(r), torch.tensor(v), v_final, disc, lam)
    assert adv.tolist() == pytest.approx([a0, a1, a2], rel=1e-6)
    assert ret.tolist() == pytest.approx([a0 + 0.5, a1 + 1.0, a2 + 1.5], rel=1e-6)


def _rollout(rewards_per_episode, executed_per_episode, terminated):
    trajs, rewards, executed = [], [], []
    for rs, ex, term in zip(rewards_per_episode, executed_per_episode, terminated):
        starts = np.concatenate([[0], np.cumsum(ex)[:-1]])
        t = trajectory(np.zeros((sum(ex), 2)), starts)
        t.final_obs, t.terminated = {"state": np.zeros((To, 3), np.float32)}, term
        trajs.append(t)
        rewards += rs
        executed += ex
    M = len(rewards)
    return Rollout(obs={"state": torch.zeros(M, To, 3)}, chains=torch.zeros(M, S + 1, 4, 2),
                   old_logp=torch.zeros(M, S), reward=torch.tensor(rewards), trajectories=trajs,
                   executed=torch.tensor(executed))


def test_rollout_gae_per_episode_time_limit_bootstraps_and_a_terminal_does_not():
    ro = _rollout([[1.0, 1.0], [2.0, 0.0, 5.0]], [[Ta, Ta], [Ta, Ta, 1]], [False, True])
    values = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    final = torch.tensor([10.0, 10.0])
    gamma, lam = 0.9, 0.5
    adv, ret = rollout_gae(ro, values, final, Ta, gamma, lam)
    # episode 0 (time limit): bootstraps V = 10 after its last full chunk
    d1 = 1.0 + gamma * 10.0 - 0.2
    d0 = 1.0 + gamma * 0.2 - 0.1
    assert adv[:2].tolist() == pytest.approx([d0 + gamma * lam * d1, d1], rel=1e-6)
    # episode 1 (terminal, inside its last chunk): no bootstrap, whatever V(final) says
    e2 = 5.0 - 0.5
    e1 = 0.0 + gamma * 0.5 - 0.4 + gamma * lam * e2
    e0 = 2.0 + gamma * 0.4 - 0.3 + gamma * lam * e1
    assert adv[2:].tolist() == pytest.approx([e0, e1, e2], rel=1e-6)
    assert ret.tolist() == pytest.approx((adv + values).tolist(), rel=1e-6)
    # the reward scale divides rewards, not values
    adv_s, _ = rollout_gae(ro, values, final, Ta, gamma, lam, reward_scale=2.0)
    assert float(adv_s[-1]) == pytest.approx(2.5 - 0.5)


def test_running_return_scale_is_the_std_of_discounted_returns():
    ro = _rollout([[1.0, 2.0, 3.0]], [[Ta, Ta, Ta]], [False])
    scale = RunningReturnScale(0.5)
    scale.update(ro)
    running = [1.0, 1.0 * 0.5 + 2.0, (1.0 * 0.5 + 2.0) * 0.5 + 3.0]
    assert scale.scale == pytest.approx(float(np.std(running)), rel=1e-6)


def test_standardised_advantages_have_mean_0_and_std_1():
    x = torch.randn(257, generator=torch.Generator().manual_seed(0)) * 7 + 3
    z = standardise(x)
    assert abs(float(z.mean())) < 1e-6 and float(z.std()) == pytest.approx(1.0, abs=1e-5)


# ----------------------------------------------------------------------------- critic and epochs


@pytest.mark.parametrize("features", ["policy", "own"])
def test_a_critic_fitted_on_a_fixed_batch_lowers_its_value_loss(features):
    policy = make_policy(0)
    ft = FineTuner(policy, algo(advantage="gae", critic={"features": features, "hidden": 32, "layers": 2, "lr": 3e-3,
                                                          "warmup_updates": 0}, gamma=0.9, gae_lambda=0.9), CPU, seed=0)
    gen = torch.Generator().manual_seed(0)
    obs = random_obs(64, gen)
    target = obs["state"][:, -1].sum(1)  # a value that the observation determines
    before = params(policy)
    first = ft._critic_step(obs, target)
    for _ in range(150):
        last = ft._critic_step(obs, target)
    assert last < 0.2 * first, (first, last)
    # the value loss never moves the policy (features=policy is detached; own is a copy)
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())


@pytest.mark.parametrize("reg", ["bc", "none", "kl"])
def test_the_critic_reads_the_policy_steps_features_without_another_encoder_pass(reg):
    # features=policy: each gradient step encodes its chunks once (the policy step's pass,
    # which also encodes the BC windows; kl's term reads the same encoding), and the
    # critic's value loss reads those features.
    policy = make_policy(0)
    ft = FineTuner(policy, algo(reg=reg, advantage="gae", p_step=3, reward_signal=False, gamma=0.9, gae_lambda=0.9,
                                critic={"features": "policy", "hidden": 16, "layers": 1, "lr": 1e-3,
                                        "warmup_updates": 0}), CPU, seed=0)
    ro = _signed_rollout(ft)
    shape = _rollout([[0.0] * 24] * 2, [[Ta] * 24] * 2, [False, False])  # two episodes of 24 chunks
    ro.trajectories, ro.executed = shape.trajectories, shape.executed
    ft.buffer.add([trajectory(np.zeros((6, 2)), [0, 3], success=True)])
    seen: list[torch.Tensor] = []
    hook = policy.encoder.register_forward_hook(lambda m, args, out: seen.append(out))
    read: list[torch.Tensor] = []
    mlp_hook = ft.critic.mlp.register_forward_pre_hook(lambda m, args: read.append(args[0]))
    try:
        stats = ft.update(ro, episodes=2)
    finally:
        hook.remove()
        mlp_hook.remove()
    steps = stats["gradient_steps"]
    assert steps == 6
    # the values of the rollout and of the final observations: two passes without gradients;
    # then exactly one pass per gradient step
    assert len(seen) == 2 + steps
    step_feats = [f.detach().reshape(-1, policy.cond_dim) for f in seen[2:]]
    for fed, feats in zip(read[-steps:], step_feats):
        assert not fed.requires_grad
        assert torch.equal(fed, feats[: fed.shape[0]])  # the chunks come first in the step's batch


def test_epochs_read_every_chunk_exactly_n_times():
    rng = np.random.default_rng(0)
    seen = np.concatenate([b.numpy() for b in minibatches(23, 5, rng, epochs=3)])
    assert np.bincount(seen).tolist() == [3] * 23
    assert steps_per_update(23, 5, epochs=3) == 15 == len(list(minibatches(23, 5, rng, epochs=3)))
    assert steps_per_update(23, 5, p_steps=7) == 7


def _signed_rollout(ft, n=48):
    """Chains sampled in two situations (two observations): weight +1 for those of the first
    half, -1 for the second."""
    gen = torch.Generator().manual_seed(3)
    obs = torch.cat([torch.full((n // 2, To, 3), 0.6), torch.full((n - n // 2, To, 3), -0.6)])
    ro, _ = sample_rollout(ft, {"state": obs}, gen)
    ro.reward = torch.cat([torch.ones(n // 2), -torch.ones(n - n // 2)])
    return ro


def test_one_update_raises_log_probs_of_positive_and_lowers_negative_advantage():
    policy = make_policy(0)
    ft = FineTuner(policy, algo(reg="none", update_epochs=4, batch_size=16 * S, lr=3e-4, clip=0.5,
                                normalize_reward=False, reward_signal=False), CPU, seed=0)
    ro = _signed_rollout(ft)
    with torch.no_grad():
        before = chunk_log_probs(policy, ft.sampler, ro.obs, ro.chains).mean(1)
    stats = ft.update(ro)
    with torch.no_grad():
        after = chunk_log_probs(policy, ft.sampler, ro.obs, ro.chains).mean(1)
    delta = after - before
    assert stats["gradient_steps"] == 4 * 3
    assert float(delta[:24].mean()) > 0 > float(delta[24:].mean()), delta
    assert (delta[:24] > 0).float().mean() > 0.6 and (delta[24:] < 0).float().mean() > 0.6


def test_target_kl_stops_the_epochs_early():
    policy = make_policy(0)
    ft = FineTuner(policy, algo(reg="none", update_epochs=10, batch_size=8 * S, lr=1e-2, clip=10.0,
                                target_kl=1e-6, reward_signal=False), CPU, seed=0)
    stats = ft.update(_signed_rollout(ft))
    assert stats["early_stop"] == 1.0 and stats["gradient_steps"] < stats["planned_gradient_steps"] == 60


# ----------------------------------------------------------------------------- frozen early steps


def test_frozen_steps_get_no_gradient_and_stay_bit_identical():
    policy = make_policy(0)
    ft = FineTuner(policy, algo(reg="bc", ft_denoising_steps=3, lr=1e-2, reward_signal=False), CPU, seed=0)
    assert policy.config.frozen_steps == S - 3 and policy.prefix is not None
    prefix_before = {k: v.clone() for k, v in policy.prefix.state_dict().items()}
    main_before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    ro = _signed_rollout(ft)
    assert chunk_log_probs(policy, ft.sampler, ro.obs, ro.chains).shape == (48, 3)  # only the trained steps
    ft.buffer.add([trajectory(np.zeros((6, 2)), [0, 3], success=True)])
    ft.update(ro)
    assert all(p.grad is None for p in policy.prefix.parameters())
    assert all(torch.equal(prefix_before[k], v) for k, v in policy.prefix.state_dict().items())
    assert not all(torch.equal(main_before[k], v) for k, v in policy.model.state_dict().items())
    # sampling: the first S - 3 steps come from the frozen copy, the rest from the trained network.
    # The same draws through the frozen copy alone give the same first S - 3 steps, and other last ones.
    obs = const_obs(4)
    chain = policy.sample_chain(obs, ft.sampler, torch.Generator().manual_seed(1)).chain
    with torch.no_grad():
        cond_prefix = policy.condition(obs, encoder=policy.prefix["encoder"])
        _, frozen_chain = ft.sampler.sample(lambda x, k: policy.prefix["model"](x, k, cond_prefix), chain[:, 0].shape,
                                            generator=torch.Generator().manual_seed(1), return_chain=True)
    F = S - 3
    assert torch.equal(chain[:, : F + 1], frozen_chain[:, : F + 1])
    assert not torch.allclose(chain[:, F + 1:], frozen_chain[:, F + 1:])


def test_all_steps_trained_samples_the_same_chain_as_before():
    policy = make_policy(0)
    obs = const_obs(5)
    sampler = policy.ddim(1.0, 0.1)
    before = policy.sample_chain(obs, sampler, torch.Generator().manual_seed(7), log_prob=True)
    ft = FineTuner(policy, algo(ft_denoising_steps=S), CPU, seed=0)
    assert policy.prefix is None and policy.config.frozen_steps == 0
    after = policy.sample_chain(obs, ft.sampler, torch.Generator().manual_seed(7), log_prob=True)
    assert torch.equal(before.chain, after.chain) and torch.equal(before.log_prob, after.log_prob)


def test_a_policy_with_frozen_steps_survives_a_state_dict_round_trip():
    from sodp3d.policy import DiffusionPolicy, PolicyConfig

    policy = make_policy(0)
    FineTuner(policy, algo(ft_denoising_steps=4), CPU, seed=0)
    rebuilt = DiffusionPolicy(PolicyConfig(**policy.config.to_dict()))
    rebuilt.load_state_dict(policy.state_dict(), strict=True)
    obs = const_obs(3)
    a = policy.predict_action(obs, generator=torch.Generator().manual_seed(0))["action"]
    b = rebuilt.predict_action(obs, generator=torch.Generator().manual_seed(0))["action"]
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad,needle", [
    ({"advantage": "foo"}, "valid: reward, gae"),
    ({"ft_denoising_steps": 0}, "ft_denoising_steps"),
    ({"ft_denoising_steps": S + 1}, f"[1, {S}]"),
    ({"update_epochs": 0}, "update_epochs"),
    ({"target_kl": -0.1}, "target_kl"),
    ({"gamma": 1.5}, "gamma"),
])
def test_bad_settings_are_one_line(bad, needle):
    with pytest.raises(UserError) as e:
        FineTuner(make_policy(0), algo(**bad), CPU, seed=0)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_reward_signal_tells_position_and_observation_apart():
    from sodp3d.finetune.advantages import reward_signal

    rng = np.random.default_rng(0)
    M = 400
    pos = torch.as_tensor(rng.integers(0, 10, M))
    feats = torch.as_tensor(rng.normal(size=(M, 6)))
    noise = torch.as_tensor(rng.normal(size=M)) * 0.1
    by_position = reward_signal(pos.double() + noise, pos, feats, rng)
    assert by_position["reward_r2_position"] > 0.95 and by_position["reward_r2_obs"] > 0.9
    by_obs = reward_signal(feats[:, 0] + noise, pos, feats, rng)
    assert by_obs["reward_r2_position"] < 0.1 and by_obs["reward_r2_obs"] > 0.95
    pure_noise = reward_signal(noise, pos, feats, rng)
    assert pure_noise["reward_r2_position"] < 0.1 and pure_noise["reward_r2_obs"] < 0.1
