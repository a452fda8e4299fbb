"""The min-max normaliser: maps data ranges to [-1, 1] and back, exactly; fitted in parts
or at once alike; saved and loaded with the policy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from policy_kit import fitted_normalizer

from sodp3d.normalizer import MinMaxNormalizer


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


def test_normalizer_scales_colour_per_channel_when_asked():
    """point_channels=6 (an encoder that reads colour): every rgb channel maps its data
    range to [-1, 1], as DP3 normalises its coloured clouds; the round trip is exact."""
    rng = np.random.default_rng(3)
    cloud = rng.uniform(-2, 3, size=(4, 64, 6)).astype(np.float32)
    cloud[..., 3:] = rng.uniform(0.2, 0.7, size=(4, 64, 3))
    norm = MinMaxNormalizer.fit({"point_cloud": cloud}, point_channels=6)
    assert norm.dims == {"point_cloud": 6}
    out = norm.normalize("point_cloud", torch.as_tensor(cloud))
    flat = out.reshape(-1, 6)
    torch.testing.assert_close(flat.min(0).values, -torch.ones(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.max(0).values, torch.ones(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(norm.unnormalize("point_cloud", out), torch.as_tensor(cloud), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="3 channels"):
        MinMaxNormalizer.fit({"point_cloud": cloud[..., :3]}, point_channels=6)


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
