"""The policy stack: min-max normaliser, training windows, DiffusionPolicy, checkpoints.

Everything is small (the `tiny` and `simple` U-Nets, 32-point clouds) except one case
that builds the full `paper` U-Net once and runs a batch of 1 through it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sodp3d.checkpoint import load_checkpoint, policy_from_checkpoint, save_checkpoint
from sodp3d.data.store import EpisodeWriter
from sodp3d.data.windows import WindowDataset
from sodp3d.diffusion import DDIMSampler
from sodp3d.encoders import ENCODERS, encoder_names
from sodp3d.errors import UserError
from sodp3d.normalizer import MinMaxNormalizer
from sodp3d.policy import DiffusionPolicy, PolicyConfig
from sodp3d.unet import preset_names

SHAPE_META = {"point_cloud": [32, 3], "agent_pos": [9], "state": [39], "action": [4]}
Tp, To, Ta, Da = 12, 2, 8, 4




# ----------------------------------------------------------------------------- helpers


def make_config(**overrides) -> PolicyConfig:
    kwargs = dict(shape_meta={k: list(v) for k, v in SHAPE_META.items()}, horizon=Tp, n_obs_steps=To,
                  n_action_steps=Ta, encoder="dp3", unet="tiny")
    kwargs.update(overrides)
    return PolicyConfig(**kwargs)


def random_obs(batch: int, gen: torch.Generator, n_obs: int = To, points: int = 32) -> dict[str, torch.Tensor]:
    return {
        "point_cloud": torch.rand(batch, n_obs, points, 3, generator=gen) * 2 - 0.5,
        "agent_pos": torch.randn(batch, n_obs, 9, generator=gen),
        "state": torch.randn(batch, n_obs, 39, generator=gen),
    }


def fitted_normalizer(seed: int = 0) -> tuple[MinMaxNormalizer, np.ndarray, np.ndarray]:
    """A normaliser fitted on random data whose action range is known: (norm, lo, hi)."""
    rng = np.random.default_rng(seed)
    lo = np.array([-3.0, 0.5, 10.0, -0.2], dtype=np.float32)
    hi = np.array([5.0, 0.7, 20.0, 0.2], dtype=np.float32)
    actions = rng.uniform(lo, hi, size=(200, Da)).astype(np.float32)
    actions[0], actions[1] = lo, hi
    norm = MinMaxNormalizer.fit({
        "action": actions,
        "point_cloud": rng.uniform(-1, 1, size=(20, 32, 3)).astype(np.float32),
        "agent_pos": rng.normal(size=(200, 9)).astype(np.float32),
        "state": rng.normal(size=(200, 39)).astype(np.float32),
    })
    return norm, lo, hi


def policy_normalizer(policy: DiffusionPolicy, norm: MinMaxNormalizer) -> MinMaxNormalizer:
    """``norm`` restricted to the keys this policy normalises."""
    sub = MinMaxNormalizer({k: norm.dims[k] for k in policy.normalizer.dims})
    state = {k: v for k, v in norm.state_dict().items() if k.split("__")[0] in sub.dims}
    sub.load_state_dict(state, strict=True)
    return sub


# ----------------------------------------------------------------------------- 1. normaliser


def test_normalizer_maps_min_max_to_unit_interval_and_back():
    rng = np.random.default_rng(0)
    lo = np.array([-5.0, 0.0, 2.5, -0.01, 100.0], dtype=np.float32)
    hi = np.array([5.0, 1.0, 7.5, 0.01, 300.0], dtype=np.float32)
    x = rng.uniform(lo, hi, size=(500, 5)).astype(np.float32)
    x[17], x[301] = lo, hi  # the extremes are in the data
    norm = MinMaxNormalizer.fit({"agent_pos": x})
    assert norm.dims == {"agent_pos": 5}

    n_lo = norm.normalize("agent_pos", torch.as_tensor(lo))
    n_hi = norm.normalize("agent_pos", torch.as_tensor(hi))
    assert torch.equal(n_lo, torch.full((5,), -1.0))
    torch.testing.assert_close(n_hi, torch.ones(5), atol=1e-6, rtol=0)

    xt = torch.as_tensor(x)
    xn = norm.normalize("agent_pos", xt)
    assert xn.min() >= -1.0 - 1e-6 and xn.max() <= 1.0 + 1e-6
    # per dimension, the data's min and max hit -1 and +1
    torch.testing.assert_close(xn.amin(0), torch.full((5,), -1.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(xn.amax(0), torch.ones(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(norm.unnormalize("agent_pos", xn), xt, atol=1e-5, rtol=1e-5)


def test_normalizer_constant_dimension_maps_to_minus_one_and_back_exactly():
    x = np.random.default_rng(1).normal(size=(50, 3)).astype(np.float32)
    x[:, 1] = 0.123456
    norm = MinMaxNormalizer.fit({"state": x})
    xn = norm.normalize("state", torch.as_tensor(x))
    assert torch.equal(xn[:, 1], torch.full((50,), -1.0))
    assert torch.isfinite(xn).all()
    back = norm.unnormalize("state", xn)
    assert torch.equal(back[:, 1], torch.as_tensor(x[:, 1]))


def test_normalizer_point_cloud_normalises_only_xyz():
    rng = np.random.default_rng(2)
    cloud = rng.uniform(-2, 3, size=(4, 64, 6)).astype(np.float32)
    cloud[..., 3:] = rng.uniform(0, 1, size=(4, 64, 3))  # rgb
    cloud[..., 3:] += 50.0  # out of the xyz range: must not enter the statistics
    norm = MinMaxNormalizer.fit({"point_cloud": cloud})
    assert norm.dims == {"point_cloud": 3}
    xyz_lo = cloud[..., :3].reshape(-1, 3).min(0)
    torch.testing.assert_close(norm.point_cloud__min, torch.as_tensor(xyz_lo))

    ct = torch.as_tensor(cloud)
    out = norm.normalize("point_cloud", ct)
    assert out.shape == ct.shape
    assert torch.equal(out[..., 3:], ct[..., 3:])  # colour passes through untouched
    torch.testing.assert_close(out[..., :3].reshape(-1, 3).amin(0), torch.full((3,), -1.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[..., :3].reshape(-1, 3).amax(0), torch.ones(3), atol=1e-6, rtol=0)
    back = norm.unnormalize("point_cloud", out)
    assert torch.equal(back[..., 3:], ct[..., 3:])
    torch.testing.assert_close(back, ct, atol=1e-5, rtol=1e-5)
    # an xyz-only cloud is normalised the same way as the xyz of the 6-channel one
    torch.testing.assert_close(norm.normalize("point_cloud", ct[..., :3]), out[..., :3])


def test_normalizer_fit_on_parts_equals_fit_on_concatenation():
    rng = np.random.default_rng(3)
    parts = [rng.normal(loc=i, scale=i + 1, size=(n, 4)).astype(np.float32) for i, n in enumerate([7, 1, 30, 12])]
    clouds = [rng.uniform(-i, i + 1, size=(n, 16, 3)).astype(np.float32) for i, n in enumerate([2, 5, 3])]
    a = MinMaxNormalizer.fit({"action": parts, "point_cloud": clouds})
    b = MinMaxNormalizer.fit({"action": np.concatenate(parts), "point_cloud": np.concatenate(clouds)})
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb) == {"action__min", "action__scale", "point_cloud__min", "point_cloud__scale"}
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_normalizer_fit_without_data_fails():
    with pytest.raises(ValueError, match="action"):
        MinMaxNormalizer.fit({"action": [np.zeros((0, 4), np.float32)]})


def test_normalizer_state_dict_round_trip(tmp_path):
    norm, _, _ = fitted_normalizer()
    path = tmp_path / "norm.pt"
    torch.save(norm.state_dict(), path)
    fresh = MinMaxNormalizer(norm.dims)
    x = torch.randn(5, 4)
    assert not torch.allclose(fresh.normalize("action", x), norm.normalize("action", x))
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    for k in norm.dims:
        x = torch.randn(3, 32, norm.dims[k]) if k == "point_cloud" else torch.randn(3, norm.dims[k])
        assert torch.equal(fresh.normalize(k, x), norm.normalize(k, x))
        assert torch.equal(fresh.unnormalize(k, x), norm.unnormalize(k, x))


def test_normalizer_unknown_key_is_a_readable_error():
    norm = MinMaxNormalizer({"action": 2})
    with pytest.raises(KeyError, match="agent_pos"):
        norm.normalize("agent_pos", torch.zeros(2))


# ----------------------------------------------------------------------------- 2. windows

EPISODE_LENGTHS = (5, 9)


def write_dataset(path: Path, lengths=EPISODE_LENGTHS, action_dim: int = 2, keys=None, offset: int = 0) -> Path:
    """Episodes whose every per-step value encodes the global step index t (+ offset):
    agent_pos = [t, -t], point_cloud = t everywhere, state = t, action = t * [1, 10, ...]."""
    writer = EpisodeWriter.create(path, attrs={"source": "test"})
    start = 0
    for e, n in enumerate(lengths):
        t = np.arange(start, start + n, dtype=np.float32) + offset
        episode = {
            "point_cloud": np.broadcast_to(t[:, None, None], (n, 16, 3)).copy(),
            "agent_pos": np.stack([t, -t], axis=1),
            "state": np.broadcast_to(t[:, None], (n, 3)).copy(),
            "action": t[:, None] * (10.0 ** np.arange(action_dim, dtype=np.float32))[None],
            "reward": np.ones(n, np.float32),
            "success": np.zeros(n, bool),
        }
        if keys is not None:
            episode = {k: v for k, v in episode.items() if k in keys}
        writer.append_episode(episode, task=f"task{e}", info={"success": False})
        start += n
    return path


def expected_windows(lengths, horizon, n_obs, n_action, offset=0):
    """Independent enumeration: per window the global step indices of its Tp steps."""
    out, e0 = [], 0
    for n in lengths:
        e1 = e0 + n
        first = e0 - (n_obs - 1)
        last = max(e1 - horizon + (n_action - 1), first)
        for s in range(first, last + 1):
            out.append(np.clip(np.arange(s, s + horizon), e0, e1 - 1) + offset)
        e0 = e1
    return np.array(out)


HORIZONS = [(4, 2, 2), (12, 2, 8), (8, 3, 3), (6, 1, 1), (16, 2, 4)]  # (Tp, To, Ta); the last two hit short episodes


@pytest.mark.parametrize("memory_fraction", [0.5, 0.0], ids=["in-memory", "from-zarr"])
@pytest.mark.parametrize("tp,to,ta", HORIZONS)
def test_windows_count_padding_and_content(tmp_path, tp, to, ta, memory_fraction):
    path = write_dataset(tmp_path / "d.zarr")
    ds = WindowDataset([str(path)], ["point_cloud", "agent_pos", "state"], tp, to, ta, memory_fraction=memory_fraction)
    assert ds.in_memory is (memory_fraction > 0)
    assert ds.n_steps == sum(EPISODE_LENGTHS)

    # closed form: per episode (len - Tp + Ta - 1) - (-(To - 1)) + 1, at least one window
    count = sum(max(n - tp + ta - 1, -(to - 1)) - (-(to - 1)) + 1 for n in EPISODE_LENGTHS)
    assert len(ds) == count

    steps = expected_windows(EPISODE_LENGTHS, tp, to, ta)
    assert len(steps) == count
    b = ds.get(np.arange(len(ds)))
    assert b["obs"]["point_cloud"].shape == (count, to, 16, 3)
    assert b["obs"]["agent_pos"].shape == (count, to, 2)
    assert b["obs"]["state"].shape == (count, to, 3)
    assert b["action"].shape == (count, tp, 2)
    assert all(v.dtype == np.float32 for v in [*b["obs"].values(), b["action"]])
    np.testing.assert_array_equal(b["action"][..., 0], steps)
    np.testing.assert_array_equal(b["action"][..., 1], 10 * steps)
    np.testing.assert_array_equal(b["obs"]["agent_pos"][..., 0], steps[:, :to])
    np.testing.assert_array_equal(b["obs"]["agent_pos"][..., 1], -steps[:, :to])
    np.testing.assert_array_equal(b["obs"]["point_cloud"], np.broadcast_to(steps[:, :to, None, None], (count, to, 16, 3)))
    np.testing.assert_array_equal(b["obs"]["state"][..., 0], steps[:, :to])

    # windows never cross episodes
    ends = np.cumsum(EPISODE_LENGTHS)
    episode_of = np.searchsorted(ends, b["action"][..., 0], side="right")
    assert (episode_of == episode_of[:, :1]).all()

    # a shuffled, repeated selection gives the same rows
    sel = np.array([count - 1, 0, 3 % count, 0, count // 2])
    b2 = ds.get(sel)
    np.testing.assert_array_equal(b2["action"], b["action"][sel])
    np.testing.assert_array_equal(b2["obs"]["agent_pos"], b["obs"]["agent_pos"][sel])


def test_windows_edge_padding_at_episode_boundaries(tmp_path):
    tp, to, ta = 6, 3, 3
    path = write_dataset(tmp_path / "d.zarr")
    ds = WindowDataset([str(path)], ["agent_pos"], tp, to, ta)
    b = ds.get(np.arange(len(ds)))
    pos, act = b["obs"]["agent_pos"][..., 0], b["action"][..., 0]
    n_first = max(EPISODE_LENGTHS[0] - tp + ta - 1, -(to - 1)) + to  # windows of episode 0
    for e, (w_first, w_last, e0, e1) in enumerate([(0, n_first - 1, 0, 5), (n_first, len(ds) - 1, 5, 14)]):
        # the first window starts To-1 steps before the episode: its first To-1 obs repeat step e0
        np.testing.assert_array_equal(pos[w_first], [e0] * (to - 1) + [e0])
        np.testing.assert_array_equal(act[w_first, : to - 1], [e0] * (to - 1))
        assert act[w_first, to - 1] == e0
        # the last window runs Ta-1 steps past the end: they repeat step e1-1
        np.testing.assert_array_equal(act[w_last, -(ta - 1):], [e1 - 1] * (ta - 1))
        assert act[w_last].max() == e1 - 1 and act[w_last].min() >= e0
        # its executed actions (To-1 .. To-2+Ta) start inside the episode
        assert act[w_last, to - 1] < e1 - 1


def test_windows_over_two_datasets_never_mix_them(tmp_path):
    a = write_dataset(tmp_path / "a.zarr", lengths=(5, 9))
    b = write_dataset(tmp_path / "b.zarr", lengths=(7,), offset=1000)
    ds = WindowDataset([str(a), str(b)], ["agent_pos"], 4, 2, 2)
    assert len(ds) == (5 - 1) + (9 - 1) + (7 - 1)
    assert ds.n_steps == 21
    out = ds.get(np.arange(len(ds)))
    expected = np.concatenate([expected_windows((5, 9), 4, 2, 2), expected_windows((7,), 4, 2, 2, offset=1000)])
    np.testing.assert_array_equal(out["action"][..., 0], expected)
    fit = ds.arrays_for_fit()
    assert set(fit) == {"agent_pos", "action"}
    np.testing.assert_array_equal(np.concatenate(fit["action"])[:, 0],
                                  np.concatenate([np.arange(14), 1000 + np.arange(7)]))


def test_windows_sample_is_reproducible(tmp_path):
    path = write_dataset(tmp_path / "d.zarr")
    ds = WindowDataset([str(path)], ["point_cloud", "agent_pos"], 4, 2, 2)
    b1 = ds.sample(16, np.random.default_rng(7))
    b2 = ds.sample(16, np.random.default_rng(7))
    b3 = ds.sample(16, np.random.default_rng(8))
    assert b1["action"].shape == (16, 4, 2) and b1["obs"]["point_cloud"].shape == (16, 2, 16, 3)
    np.testing.assert_array_equal(b1["action"], b2["action"])
    for k in b1["obs"]:
        np.testing.assert_array_equal(b1["obs"][k], b2["obs"][k])
    assert not np.array_equal(b1["action"], b3["action"])


def test_windows_missing_key_is_a_user_error(tmp_path):
    path = write_dataset(tmp_path / "d.zarr", keys={"point_cloud", "state", "action"})
    with pytest.raises(UserError, match="agent_pos") as err:
        WindowDataset([str(path)], ["point_cloud", "agent_pos"], 4, 2, 2)
    assert str(path) in str(err.value)


def test_windows_datasets_with_different_action_dims_are_a_user_error(tmp_path):
    a = write_dataset(tmp_path / "a.zarr", action_dim=2)
    b = write_dataset(tmp_path / "b.zarr", action_dim=3)
    with pytest.raises(UserError, match="action") as err:
        WindowDataset([str(a), str(b)], ["agent_pos"], 4, 2, 2)
    msg = str(err.value)
    assert "(2,)" in msg and "(3,)" in msg


def test_windows_no_paths_is_a_user_error():
    with pytest.raises(UserError, match="data="):
        WindowDataset([], ["agent_pos"], 4, 2, 2)


def test_windows_read_only_obs_keys_and_action(tmp_path):
    import zarr

    path = write_dataset(tmp_path / "d.zarr")
    reference = WindowDataset([str(path)], ["point_cloud", "agent_pos"], 4, 2, 2).get(np.arange(12))
    g = zarr.open_group(str(path), mode="r+")
    del g["data/reward"]
    del g["data/success"]
    del g["meta/episode_task"]
    del g["data/state"]  # not read by a point-cloud encoder either
    g = zarr.open_group(str(path), mode="r")
    assert set(g["data"].array_keys()) == {"point_cloud", "agent_pos", "action"}
    assert "episode_task" not in set(g["meta"].array_keys())

    for frac in (0.5, 0.0):
        ds = WindowDataset([str(path)], ["point_cloud", "agent_pos"], 4, 2, 2, memory_fraction=frac)
        assert len(ds) == 12
        out = ds.get(np.arange(12))
        np.testing.assert_array_equal(out["action"], reference["action"])
        for k in reference["obs"]:
            np.testing.assert_array_equal(out["obs"][k], reference["obs"][k])
        ds.sample(4, np.random.default_rng(0))


# ----------------------------------------------------------------------------- 3. the policy

POLICY_CASES = [(enc, preset) for enc in encoder_names() for preset in ("tiny", "simple")] + [("dp3", "paper")]


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
    assert set(policy.normalizer.dims) == {"action", *ENCODERS[encoder].keys}
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
        torch.testing.assert_close(log_prob.detach(), ref, atol=1e-5, rtol=1e-5)
        # and by hand: each step's Gaussian, averaged over the Tp * Da entries
        manual = []
        for i, (t, t_prev) in enumerate(zip(sampler.timesteps, sampler.prev_timesteps)):
            mean, std = sampler.step_distribution(model_fn, chain[:, i], t, t_prev)
            assert (std >= 0.1 - 1e-7).all()
            manual.append(torch.distributions.Normal(mean, std).log_prob(chain[:, i + 1]).mean(dim=(1, 2)))
        torch.testing.assert_close(log_prob.detach(), torch.stack(manual, 1), atol=1e-5, rtol=1e-5)
        # the chain is the one the sampler draws from the same noise, with the same log-probs
        x_s, chain_s, lp_s = sampler.sample(model_fn, (B, Tp, Da), generator=torch.Generator().manual_seed(4),
                                            return_chain=True, return_log_prob=True)
        torch.testing.assert_close(chain_s, chain)
        torch.testing.assert_close(lp_s, log_prob.detach(), atol=1e-5, rtol=1e-5)

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


# ----------------------------------------------------------------------------- 6. checkpoints


def _leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != name)


def test_checkpoint_round_trip_is_atomic(tmp_path):
    torch.manual_seed(0)
    norm, _, _ = fitted_normalizer()
    policy = DiffusionPolicy(make_config(), policy_normalizer(DiffusionPolicy(make_config()), norm))
    path = tmp_path / "ckpts" / "latest.ckpt"  # the folder is created
    payload = {"policy_config": policy.config.to_dict(), "policy": policy.state_dict(), "step": 7,
               "notes": {"a": [1, 2]}}
    save_checkpoint(path, payload)
    assert path.is_file()
    assert _leftovers(path.parent, path.name) == []
    loaded = load_checkpoint(path)
    assert loaded["format"] == "sodp3d-policy" and loaded["version"] == 1
    assert loaded["step"] == 7 and loaded["notes"] == {"a": [1, 2]}
    assert loaded["policy_config"] == policy.config.to_dict()
    assert set(loaded["policy"]) == set(policy.state_dict())
    for k, v in policy.state_dict().items():
        assert torch.equal(loaded["policy"][k], v), k

    # overwriting replaces the file, again without leftovers
    save_checkpoint(path, {**payload, "step": 8})
    assert load_checkpoint(path)["step"] == 8
    assert _leftovers(path.parent, path.name) == []

    # a save that fails half-way leaves the previous checkpoint and no temporary file
    with pytest.raises(Exception):
        save_checkpoint(path, {**payload, "step": 9, "bad": lambda: None})
    assert load_checkpoint(path)["step"] == 8
    assert _leftovers(path.parent, path.name) == []


@pytest.mark.parametrize("use_ema", [False, True])
def test_policy_from_checkpoint_acts_like_the_original(tmp_path, use_ema):
    torch.manual_seed(0)
    norm, _, _ = fitted_normalizer()
    policy = DiffusionPolicy(make_config(encoder="pointnet"),
                             policy_normalizer(DiffusionPolicy(make_config(encoder="pointnet")), norm)).eval()
    ema = DiffusionPolicy(make_config(encoder="pointnet"),
                          policy_normalizer(DiffusionPolicy(make_config(encoder="pointnet")), norm)).eval()
    path = tmp_path / "p.ckpt"
    save_checkpoint(path, {"policy_config": policy.config.to_dict(), "policy": policy.state_dict(),
                           "ema_policy": ema.state_dict()})
    restored, payload = policy_from_checkpoint(path, use_ema=use_ema)
    assert not restored.training
    assert isinstance(restored, DiffusionPolicy) and restored.config == policy.config
    reference = ema if use_ema else policy
    obs = random_obs(2, torch.Generator().manual_seed(5))
    a = reference.predict_action(obs, generator=torch.Generator().manual_seed(6))
    b = restored.predict_action(obs, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(b["action_pred"], a["action_pred"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(b["action"], a["action"], atol=1e-6, rtol=1e-6)
    other = (policy if use_ema else ema).predict_action(obs, generator=torch.Generator().manual_seed(6))
    assert not torch.allclose(other["action_pred"], a["action_pred"])  # the two weight sets differ
    for k, v in reference.normalizer.state_dict().items():
        assert torch.equal(restored.normalizer.state_dict()[k], v)


def test_policy_from_checkpoint_without_ema_uses_the_policy_weights(tmp_path):
    torch.manual_seed(0)
    policy = DiffusionPolicy(make_config(encoder="state")).eval()
    path = tmp_path / "p.ckpt"
    save_checkpoint(path, {"policy_config": policy.config.to_dict(), "policy": policy.state_dict()})
    restored, _ = policy_from_checkpoint(path)
    for k, v in policy.state_dict().items():
        assert torch.equal(restored.state_dict()[k], v)


def test_policy_from_checkpoint_with_mismatched_weights_is_a_user_error(tmp_path):
    policy = DiffusionPolicy(make_config(encoder="state"))
    config = make_config(encoder="state", unet_kwargs={"down_dims": [16, 32]}).to_dict()
    path = tmp_path / "p.ckpt"
    save_checkpoint(path, {"policy_config": config, "policy": policy.state_dict()})
    with pytest.raises(UserError, match="weights do not fit"):
        policy_from_checkpoint(path)


def _check_readable(msg: str, path: Path) -> None:
    assert str(path) in msg
    assert "\n" not in msg
    assert "Traceback" not in msg and len(msg) < 400


def test_corrupt_checkpoint_is_a_user_error(tmp_path):
    path = tmp_path / "corrupt.ckpt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    _check_readable(str(err.value), path)
    with pytest.raises(UserError):
        policy_from_checkpoint(path)


def test_any_garbage_is_a_one_line_checkpoint_error(tmp_path):
    """Random bytes make torch's unpickler fail in many ways (IndexError, KeyError, ...)."""
    rng = np.random.default_rng(0)
    for i in range(300):
        junk = tmp_path / f"junk{i}.ckpt"
        junk.write_bytes(rng.integers(0, 256, int(rng.integers(1, 512)), dtype=np.uint8).tobytes())
        with pytest.raises(UserError, match=f"junk{i}.ckpt"):
            load_checkpoint(junk)


def test_truncated_and_empty_checkpoints_are_user_errors(tmp_path):
    policy = DiffusionPolicy(make_config(encoder="state"))
    good = tmp_path / "good.ckpt"
    save_checkpoint(good, {"policy_config": policy.config.to_dict(), "policy": policy.state_dict()})
    data = good.read_bytes()
    for name, content in (("half.ckpt", data[: len(data) // 2]), ("empty.ckpt", b"")):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(UserError) as err:
            load_checkpoint(path)
        _check_readable(str(err.value), path)


def test_foreign_torch_file_is_a_user_error(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"a": 1}, path)
    with pytest.raises(UserError, match="not a sodp3d policy checkpoint") as err:
        load_checkpoint(path)
    _check_readable(str(err.value), path)
    torch.save([1, 2, 3], path)
    with pytest.raises(UserError, match="not a sodp3d policy checkpoint"):
        load_checkpoint(path)


def test_other_checkpoint_version_is_a_user_error(tmp_path):
    path = tmp_path / "v2.ckpt"
    save_checkpoint(path, {"policy": {}})
    payload = torch.load(path, weights_only=True)
    payload["version"] = 2
    torch.save(payload, path)
    with pytest.raises(UserError, match="version 2"):
        load_checkpoint(path)


def test_missing_checkpoint_is_a_user_error(tmp_path):
    for path in (tmp_path / "nope.ckpt", tmp_path):  # a missing file, a folder
        with pytest.raises(UserError, match="no checkpoint") as err:
            load_checkpoint(path)
        assert str(path) in str(err.value)
    with pytest.raises(UserError):
        policy_from_checkpoint(tmp_path / "nope.ckpt")


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
