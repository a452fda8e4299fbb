"""DiffusionPolicy: loss, gradients, actions and the denoising chain for every encoder and
U-Net preset; config validation; observation shapes; a short training lowers the loss.

Everything is small (the `tiny` and `simple` U-Nets, 32-point clouds) except one case
that builds the full `paper` U-Net once and runs a batch of 1 through it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from policy_kit import Da, Ta, To, Tp, fitted_normalizer, make_config, policy_normalizer, random_obs, write_dataset
from sodp3d.encoders import ENCODERS, encoder_names

from sodp3d.data.windows import WindowDataset
from sodp3d.diffusion import DDIMSampler
from sodp3d.errors import UserError
from sodp3d.normalizer import MinMaxNormalizer
from sodp3d.policy import DiffusionPolicy, PolicyConfig
from sodp3d.unet import preset_names

# ----------------------------------------------------------------------------- 3. the policy

POLICY_CASES = [(enc, preset) for enc in encoder_names() for preset in ("tiny", "simple")] + [("dp3", "paper")]

LOGP_TOL = 1e-4  # log-probs of one chain from batches of other sizes (see its use)


def test_policy_cases_cover_every_encoder_and_preset():
    assert {e for e, _ in POLICY_CASES} == set(ENCODERS) == set(encoder_names())
    assert {p for _, p in POLICY_CASES} == set(preset_names())


@pytest.mark.parametrize("encoder,preset", POLICY_CASES, ids=[f"{e}-{p}" for e, p in POLICY_CASES])
def test_policy_loss_gradients_actions_and_chain(encoder, preset):
    torch.manual_seed(0)
    full_norm, lo, hi = fitted_normalizer()
    probe = DiffusionPolicy(make_config(encoder=encoder, unet="tiny"))
    norm = policy_normalizer(probe, full_norm)
    del probe
    # the full U-Net (~255M parameters, ~0.3 s a forward pass on a CPU) samples with 2 DDIM steps
    S = 2 if preset == "paper" else 10
    policy = DiffusionPolicy(make_config(encoder=encoder, unet=preset, num_inference_steps=S), norm)
    assert policy.obs_keys == ENCODERS[encoder].keys
    assert set(policy.normalizer.dims) == {"action", *ENCODERS[encoder].keys} - {"image"}  # images: scaled by the encoder
    assert policy.cond_dim == To * policy.encoder.out_dim
    B = 1 if preset == "paper" else 3
    gen = torch.Generator().manual_seed(1)
    obs = random_obs(B, gen)

    # -- loss and gradients
    batch = {"obs": obs, "action": torch.as_tensor(np.random.default_rng(0).uniform(lo, hi, (B, Tp, Da)),
                                                     dtype=torch.float32)}
    loss = policy.compute_loss(batch, generator=torch.Generator().manual_seed(2))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for name, module in (("model", policy.model), ("encoder", policy.encoder)):
        params = list(module.named_parameters())
        assert params
        missing = [n for n, p in params if p.grad is None]
        assert not missing, f"{name}: no gradient for {missing[:5]}"
        assert all(torch.isfinite(p.grad).all() for _, p in params)
        assert sum(float(p.grad.abs().sum()) for _, p in params) > 0, name
    policy.zero_grad(set_to_none=True)
    # the same generator seed gives the same loss
    again = policy.compute_loss(batch, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(again, loss.detach())

    # -- acting (deterministic DDIM, eta = 0)
    policy.eval()
    out = policy.predict_action(obs, generator=torch.Generator().manual_seed(3))
    assert out["action"].shape == (B, Ta, Da)
    assert out["action_pred"].shape == (B, Tp, Da)
    assert not out["action"].requires_grad
    assert torch.equal(out["action"], out["action_pred"][:, To - 1 : To - 1 + Ta])
    lo_t, hi_t = torch.as_tensor(lo), torch.as_tensor(hi)
    tol = 1e-4 * (hi_t - lo_t)
    assert (out["action_pred"] >= lo_t - tol).all() and (out["action_pred"] <= hi_t + tol).all()
    if preset != "paper":
        again = policy.predict_action(obs, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(again["action_pred"], out["action_pred"])

    # -- chains and their log-probs (stochastic DDIM, eta = 1)
    sampler = DDIMSampler(policy.schedule, num_steps=S, eta=1.0, min_std=0.1)
    sampled = policy.sample_chain(obs, sampler=sampler, generator=torch.Generator().manual_seed(4))
    actions, chain, cond = sampled.action, sampled.chain, sampled.cond
    assert chain.shape == (B, S + 1, Tp, Da)
    assert cond.shape == (B, policy.cond_dim)
    assert actions.shape == (B, Ta, Da)
    x0 = policy.normalizer.unnormalize("action", chain[:, -1])
    torch.testing.assert_close(actions, x0[:, To - 1 : To - 1 + Ta])
    torch.testing.assert_close(cond, policy.condition(obs).detach())

    log_prob = policy.chain_log_prob(cond, chain, sampler=sampler)
    assert log_prob.shape == (B, S)
    assert torch.isfinite(log_prob).all()
    with torch.no_grad():
        model_fn = lambda x, k: policy.model(x, k, cond)  # noqa: E731
        ref = sampler.log_prob(model_fn, chain)
        # chain_log_prob runs the U-Net once on B x S rows, the references on B rows: other
        # kernels and reduction orders (a batch of 1 takes another convolution path than 2).
        # Rounding of ~1e-6 in the predicted mean moves a log-prob by up to |z| / std <= 30
        # times that (noise clamped to 3, std floored at 0.1); a wrong step, timestep or
        # condition moves it by 1e-2 or more.
        torch.testing.assert_close(log_prob.detach(), ref, atol=LOGP_TOL, rtol=0)
        # and by hand: each step's Gaussian, averaged over the Tp * Da entries
        manual = []
        for i, (t, t_prev) in enumerate(zip(sampler.timesteps, sampler.prev_timesteps)):
            mean, std = sampler.step_distribution(model_fn, chain[:, i], t, t_prev)
            assert (std >= 0.1 - 1e-7).all()
            manual.append(torch.distributions.Normal(mean, std).log_prob(chain[:, i + 1]).mean(dim=(1, 2)))
        torch.testing.assert_close(log_prob.detach(), torch.stack(manual, 1), atol=LOGP_TOL, rtol=0)
        # the chain is the one the sampler draws from the same noise, with the same log-probs
        x_s, chain_s, lp_s = sampler.sample(model_fn, (B, Tp, Da), generator=torch.Generator().manual_seed(4),
                                            return_chain=True, return_log_prob=True)
        torch.testing.assert_close(chain_s, chain)
        torch.testing.assert_close(lp_s, log_prob.detach(), atol=LOGP_TOL, rtol=0)

    # the log-probs carry gradients into the denoiser (for fine-tuning)
    if preset != "paper":
        policy.chain_log_prob(cond, chain, sampler=sampler).mean().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.model.parameters())


def test_policy_state_dict_holds_the_normalizer():
    norm, _, _ = fitted_normalizer()
    policy = DiffusionPolicy(make_config(), policy_normalizer(DiffusionPolicy(make_config()), norm))
    state = policy.state_dict()
    for key in ("action", "point_cloud", "agent_pos"):
        assert torch.equal(state[f"normalizer.{key}__min"], getattr(norm, f"{key}__min"))
        assert torch.equal(state[f"normalizer.{key}__scale"], getattr(norm, f"{key}__scale"))


def test_policy_rejects_a_normalizer_with_other_keys():
    norm = MinMaxNormalizer({"action": 4, "state": 39})
    with pytest.raises(UserError, match="normaliser"):
        DiffusionPolicy(make_config(encoder="dp3"), norm)


# ----------------------------------------------------------------------------- 4. config validation


def test_config_action_steps_bound():
    make_config(horizon=12, n_obs_steps=2, n_action_steps=11).validate()  # Tp - To + 1: allowed
    with pytest.raises(UserError) as err:
        DiffusionPolicy(make_config(horizon=12, n_obs_steps=2, n_action_steps=12))
    msg = str(err.value)
    assert "11" in msg and "n_action_steps" in msg and "horizon - n_obs_steps + 1" in msg
    with pytest.raises(UserError, match="= 9"):
        make_config(horizon=12, n_obs_steps=4, n_action_steps=10).validate()


@pytest.mark.parametrize("field", ["horizon", "n_obs_steps", "n_action_steps"])
def test_config_nonpositive_horizons(field):
    with pytest.raises(UserError, match=">= 1"):
        make_config(**{field: 0}).validate()


@pytest.mark.parametrize("field,bad,valid", [("encoder", "pointnet++", encoder_names), ("unet", "huge", preset_names)])
def test_config_unknown_name_lists_valid_names(field, bad, valid):
    with pytest.raises(UserError) as err:
        DiffusionPolicy(make_config(**{field: bad}))
    msg = str(err.value)
    assert bad in msg
    for name in valid():
        assert name in msg


@pytest.mark.parametrize("preset,horizon", [("tiny", 11), ("simple", 10), ("simple", 14)])
def test_config_horizon_must_fit_the_unet(preset, horizon):
    """A horizon the U-Net cannot down/up-sample is rejected when the policy is built,
    before any data is loaded or any step is trained."""
    n_action = min(Ta, horizon - To + 1)
    with pytest.raises(UserError, match="horizon") as err:
        DiffusionPolicy(make_config(unet=preset, horizon=horizon, n_action_steps=n_action))
    assert str(horizon) in str(err.value)


def test_unfitting_horizon_fails_readably_at_the_latest_on_first_use():
    try:
        policy = DiffusionPolicy(make_config(unet="tiny", horizon=11, n_action_steps=8))
    except UserError:
        return  # rejected up front (see test_config_horizon_must_fit_the_unet)
    obs = random_obs(1, torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match="horizon T=11"):
        policy.predict_action(obs)
    with pytest.raises(UserError, match="horizon T=11"):
        policy.compute_loss({"obs": obs, "action": torch.zeros(1, 11, Da)})


@pytest.mark.parametrize("preset,horizon", [("tiny", 4), ("tiny", 10), ("simple", 8), ("simple", 16)])
def test_config_fitting_horizons_work(preset, horizon):
    policy = DiffusionPolicy(make_config(unet=preset, horizon=horizon, n_action_steps=min(Ta, horizon - To + 1)))
    out = policy.predict_action(random_obs(1, torch.Generator().manual_seed(0)), generator=torch.Generator().manual_seed(0))
    assert out["action_pred"].shape == (1, horizon, Da)


def test_config_round_trips_through_to_dict():
    cfg = make_config(encoder_kwargs={"out_channels": 32}, unet_kwargs={"down_dims": [16, 32]})
    d = cfg.to_dict()
    assert PolicyConfig(**d) == cfg
    d["shape_meta"]["action"][0] = 99  # a deep copy
    assert cfg.shape_meta["action"] == [4]


# ----------------------------------------------------------------------------- 5. observation shapes


@pytest.fixture(scope="module")
def tiny_policy():
    torch.manual_seed(0)
    return DiffusionPolicy(make_config(encoder="dp3", unet="tiny")).eval()


@pytest.mark.parametrize(
    "key,bad,got,want",
    [
        ("point_cloud", {"points": 64}, (2, 64, 3), (2, 32, 3)),
        ("point_cloud", {"n_obs": 3}, (3, 32, 3), (2, 32, 3)),
        ("agent_pos", {"agent_pos_dim": 7}, (2, 7), (2, 9)),
    ],
)
def test_wrong_observation_shape_is_a_user_error(tiny_policy, key, bad, got, want):
    gen = torch.Generator().manual_seed(0)
    obs = random_obs(2, gen, n_obs=bad.get("n_obs", To), points=bad.get("points", 32))
    if "agent_pos_dim" in bad:
        obs["agent_pos"] = obs["agent_pos"][..., : bad["agent_pos_dim"]]
    for call in (tiny_policy.predict_action, tiny_policy.condition,
                 lambda o: tiny_policy.compute_loss({"obs": o, "action": torch.zeros(2, Tp, Da)})):
        with pytest.raises(UserError) as err:
            call(obs)
        msg = str(err.value)
        assert f"'{key}'" in msg and str(got) in msg and str(want) in msg


def test_missing_observation_key_is_a_user_error(tiny_policy):
    obs = random_obs(2, torch.Generator().manual_seed(0))
    del obs["agent_pos"]
    with pytest.raises(UserError, match="agent_pos"):
        tiny_policy.predict_action(obs)


def test_wrong_action_window_is_a_user_error(tiny_policy):
    obs = random_obs(2, torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match=r"\(12, 4\)"):
        tiny_policy.compute_loss({"obs": obs, "action": torch.zeros(2, Tp - 2, Da)})


def test_policy_accepts_numpy_windows(tmp_path):
    """A WindowDataset batch (numpy) goes straight into compute_loss."""
    path = write_dataset(tmp_path / "d.zarr")
    ds = WindowDataset([str(path)], ["state"], 4, 2, 2)
    cfg = PolicyConfig(shape_meta={k: list(v) for k, v in ds.shapes.items()}, horizon=4, n_obs_steps=2,
                       n_action_steps=2, encoder="state", unet="tiny")
    policy = DiffusionPolicy(cfg, MinMaxNormalizer.fit(ds.arrays_for_fit()))
    loss = policy.compute_loss(ds.sample(8, np.random.default_rng(0)))
    assert torch.isfinite(loss)
    out = policy.predict_action({"state": ds.get(np.arange(3))["obs"]["state"]})
    assert out["action"].shape == (3, 2, 2)
    assert (out["action_pred"][..., 0] >= -1e-3).all() and (out["action_pred"][..., 0] <= 13 + 1e-3).all()


# ----------------------------------------------------------------------------- 7. training


@pytest.mark.parametrize("encoder", ["state", "dp3"])
def test_short_training_lowers_the_loss(encoder):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    B, n_batches, steps = 32, 4, 150
    batches = []
    for _ in range(n_batches):
        pos = rng.uniform(-1, 1, size=(B, To, 9)).astype(np.float32)
        state = np.concatenate([pos, rng.uniform(-1, 1, size=(B, To, 30)).astype(np.float32)], axis=-1)
        t = np.linspace(0, 1, Tp, dtype=np.float32)[None, :, None]
        # actions: a deterministic function of the last observed agent_pos
        action = np.tanh(pos[:, -1:, :Da] * (1 + t)) + 0.5 * pos[:, -1:, Da : 2 * Da] * t
        cloud = np.broadcast_to(pos[:, :, None, :3], (B, To, 32, 3)) + rng.normal(0, 0.01, (B, To, 32, 3))
        batches.append({"obs": {"agent_pos": pos, "state": state, "point_cloud": cloud.astype(np.float32)},
                        "action": action.astype(np.float32)})
    norm = MinMaxNormalizer.fit({
        "action": [b["action"] for b in batches],
        "agent_pos": [b["obs"]["agent_pos"] for b in batches],
        "state": [b["obs"]["state"] for b in batches],
        "point_cloud": [b["obs"]["point_cloud"] for b in batches],
    })
    probe = DiffusionPolicy(make_config(encoder=encoder))
    policy = DiffusionPolicy(make_config(encoder=encoder), policy_normalizer(probe, norm))
    optim = torch.optim.AdamW(policy.parameters(), lr=1e-3)

    def eval_loss() -> float:
        with torch.no_grad():
            return float(np.mean([policy.compute_loss(b, generator=torch.Generator().manual_seed(100 + i)).item()
                                  for i, b in enumerate(batches)]))

    before = eval_loss()
    losses = []
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        loss = policy.compute_loss(batches[step % n_batches], generator=gen)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        losses.append(loss.item())
    after = eval_loss()
    assert np.isfinite(losses).all()
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert last < 0.7 * first, (first, last)
    assert after < 0.7 * before, (before, after)
