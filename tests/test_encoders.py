"""Encoders: every registered one builds, runs, trains and reads its inputs; DP3's is DP3's;
the image encoder is Diffusion Policy's (ResNet-18 with GroupNorm, spatial softmax, crops).

Shapes: B batch, N points, C point channels, Dp agent_pos dim, Ds state dim, F out_dim,
H x W x 3|4 images (48 x 48 here: ResNet-18 keeps a 2 x 2 map of a 43-pixel crop).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sodp3d.encoders import ENCODERS, build_encoder, encoder_names, encoder_options
from sodp3d.encoders.dp3 import DP3Encoder
from sodp3d.errors import UserError

B, N, DP, DS, HW = 5, 64, 9, 39, 48
SHAPE_META = {"point_cloud": (N, 3), "agent_pos": (DP,), "state": (DS,), "image": (HW, HW, 3)}
RGB_META = {**SHAPE_META, "point_cloud": (N, 6)}
POINT_ENCODERS = [n for n in encoder_names() if "point_cloud" in ENCODERS[n].keys]


def make_obs(shape_meta=SHAPE_META, batch=B, seed=0):
    """Normalised-looking observations: xyz in [-1, 1], rgb in [0, 1], the rest ~N(0, 1);
    images as stored, uint8."""
    g = torch.Generator().manual_seed(seed)
    obs = {k: torch.randn((batch, *shape), generator=g) for k, shape in shape_meta.items() if k != "image"}
    if "point_cloud" in shape_meta:
        pc = torch.rand((batch, *shape_meta["point_cloud"]), generator=g)
        pc[..., :3] = pc[..., :3] * 2 - 1
        obs["point_cloud"] = pc
    if "image" in shape_meta:
        obs["image"] = torch.randint(0, 256, (batch, *shape_meta["image"]), generator=g, dtype=torch.uint8)
    return obs


def build(name, shape_meta=SHAPE_META, **kwargs):
    torch.manual_seed(0)
    return build_encoder(name, shape_meta, **kwargs).eval()


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def linear(i, o):
    return i * o + o


def layernorm(c):
    return 2 * c


# ---------------------------------------------------------------- every registered encoder


def test_registry_names():
    assert encoder_names() == ["dp3", "image", "pointnet", "state"]
    assert POINT_ENCODERS == ["dp3", "pointnet"]


@pytest.mark.parametrize("name", encoder_names())
def test_forward_shape_and_finite(name):
    enc = build(name)
    out = enc(make_obs())
    assert out.shape == (B, enc.out_dim)
    assert torch.isfinite(out).all()
    assert set(enc.keys) <= set(SHAPE_META)
    # Only the keys it reads are needed.
    assert torch.equal(enc({k: make_obs()[k] for k in enc.keys}), out)


@pytest.mark.parametrize("name", encoder_names())
def test_gradients_reach_every_parameter(name):
    enc = build(name).train()
    out = enc(make_obs())
    # A random projection: a plain sum behind a LayerNorm would have zero gradient.
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weight).sum().backward()
    for pname, p in enc.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().max() > 0, pname


@pytest.mark.parametrize("name", encoder_names())
def test_output_depends_on_each_key_per_sample(name):
    """Changing sample 0's input changes row 0 only: every key is read, samples don't mix."""
    enc = build(name)
    obs = make_obs()
    base = enc(obs)
    for key in enc.keys:
        changed = {k: v.clone() for k, v in obs.items()}
        changed[key][0] = make_obs(seed=7)[key][0]
        out = enc(changed)
        assert not torch.allclose(out[0], base[0], atol=1e-4), key
        # Rows 1.. equal up to rounding: with gradients on, DP3 recomputes the winning points
        # in one multiply whose size depends on sample 0's winners (other blocking, ~1 ulp).
        torch.testing.assert_close(out[1:], base[1:], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", POINT_ENCODERS)
def test_one_point_changes_the_output(name):
    enc = build(name)
    obs = make_obs()
    base = enc(obs)
    obs["point_cloud"][:, 0, :3] = torch.tensor([1.0, -1.0, 1.0])  # a corner of the normalised box
    out = enc(obs)
    assert ((out - base).abs().amax(dim=1) > 1e-4).all()


@pytest.mark.parametrize("name", POINT_ENCODERS)
def test_point_order_does_not_matter(name):
    enc = build(name)
    obs = make_obs()
    base = enc(obs)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(3))
    obs["point_cloud"] = obs["point_cloud"][:, perm]
    torch.testing.assert_close(enc(obs), base, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", POINT_ENCODERS)
@pytest.mark.parametrize("shape_meta", [SHAPE_META, RGB_META], ids=["xyz", "xyzrgb"])
def test_point_count_is_free(name, shape_meta):
    """The cloud size in shape_meta sizes no layer: fewer points at inference still run."""
    enc = build(name, shape_meta)
    meta = {**shape_meta, "point_cloud": (17, shape_meta["point_cloud"][1])}
    assert enc(make_obs(meta)).shape == (B, enc.out_dim)


# ---------------------------------------------------------------- DP3, layer for layer


def linears(module):
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear)]


def layernorms(module):
    return [m.normalized_shape[0] for m in module.modules() if isinstance(m, nn.LayerNorm)]


def dp3_param_count(c=3, dp=DP, out=64, use_layernorm=True, final_norm=True):
    count = linear(c, 64) + linear(64, 128) + linear(128, 256) + linear(256, out)
    count += linear(dp, 64) + linear(64, 64)
    if use_layernorm:
        count += layernorm(64) + layernorm(128) + layernorm(256)
    if final_norm:
        count += layernorm(out)
    return count


def test_dp3_layers_are_dp3s():
    enc = build("dp3")
    assert isinstance(enc, DP3Encoder)
    assert enc.out_dim == 128
    assert linears(enc) == [(3, 64), (64, 128), (128, 256), (256, 64), (DP, 64), (64, 64)]
    assert layernorms(enc) == [64, 128, 256, 64]
    assert n_params(enc) == dp3_param_count() == 63_872
    types = [type(m) for m in enc.mlp]
    assert types == [nn.Linear, nn.LayerNorm, nn.ReLU] * 3
    assert [type(m) for m in enc.final_projection] == [nn.Linear, nn.LayerNorm]
    assert [type(m) for m in enc.agent_pos_mlp] == [nn.Linear, nn.ReLU, nn.Linear]


def test_dp3_with_colour_is_dp3s_coloured_network():
    """use_rgb=True builds DP3's PointNetEncoderXYZRGB: 6-64-128-256 (Linear, LayerNorm,
    ReLU), then a plain Linear 256-512, max-pool, projection 512-64 with its LayerNorm;
    212,032 parameters with a 9-dim agent_pos, as DP3's code counts them."""
    enc = build("dp3", RGB_META, use_rgb=True)
    assert [type(m) for m in enc.mlp] == [nn.Linear, nn.LayerNorm, nn.ReLU] * 3 + [nn.Linear]
    assert linears(enc) == [(6, 64), (64, 128), (128, 256), (256, 512), (512, 64), (DP, 64), (64, 64)]
    assert layernorms(enc) == [64, 128, 256, 64]
    assert n_params(enc) == 212_032
    obs = make_obs(RGB_META)
    m, proj, agent = enc.mlp, enc.final_projection, enc.agent_pos_mlp
    x = obs["point_cloud"]
    for i in (0, 3, 6):
        x = F.relu(F.layer_norm(F.linear(x, m[i].weight, m[i].bias), m[i + 1].normalized_shape,
                                m[i + 1].weight, m[i + 1].bias))
    x = F.linear(x, m[9].weight, m[9].bias).max(dim=1).values
    x = F.layer_norm(F.linear(x, proj[0].weight, proj[0].bias), (64,), proj[1].weight, proj[1].bias)
    a = F.linear(F.relu(F.linear(obs["agent_pos"], agent[0].weight, agent[0].bias)), agent[2].weight, agent[2].bias)
    torch.testing.assert_close(enc(obs), torch.cat([x, a], dim=-1))


def test_dp3_ablations_drop_the_layernorms():
    no_ln = build("dp3", use_layernorm=False)
    assert layernorms(no_ln) == [64]  # the projection's, which DP3 controls with final_norm
    assert [type(m) for m in no_ln.mlp] == [nn.Linear, nn.ReLU] * 3
    assert n_params(no_ln) == dp3_param_count(use_layernorm=False)
    none = build("dp3", use_layernorm=False, final_norm=False)
    assert layernorms(none) == []
    assert n_params(none) == dp3_param_count(use_layernorm=False, final_norm=False)


def test_dp3_out_channels():
    enc = build("dp3", out_channels=32)
    assert enc.out_dim == 32 + 64
    assert (256, 32) in linears(enc) and layernorms(enc)[-1] == 32
    assert n_params(enc) == dp3_param_count(out=32)
    assert enc(make_obs()).shape == (B, 96)


def test_dp3_forward_matches_a_hand_written_dp3():
    """The same weights through DP3's forward written out op by op."""
    enc = build("dp3")
    obs = make_obs()
    m, proj, agent = enc.mlp, enc.final_projection, enc.agent_pos_mlp
    x = obs["point_cloud"]
    for i in (0, 3, 6):
        x = F.relu(F.layer_norm(F.linear(x, m[i].weight, m[i].bias), m[i + 1].normalized_shape,
                                m[i + 1].weight, m[i + 1].bias))
    x = x.max(dim=1).values
    x = F.layer_norm(F.linear(x, proj[0].weight, proj[0].bias), (64,), proj[1].weight, proj[1].bias)
    a = F.linear(F.relu(F.linear(obs["agent_pos"], agent[0].weight, agent[0].bias)),
                 agent[2].weight, agent[2].bias)
    torch.testing.assert_close(enc(obs), torch.cat([x, a], dim=-1))


def _plain_dp3_pool(enc, points):
    """DP3's point branch as written: every point through the MLP with a graph, then max."""
    return enc.final_projection(enc.mlp(points).max(dim=1).values)


@pytest.mark.parametrize("kwargs", [{}, {"use_layernorm": False}, {"use_rgb": True}], ids=["dp3", "no-layernorm", "rgb"])
@pytest.mark.parametrize("duplicates", [False, True], ids=["distinct", "tied-points"])
def test_dp3_training_pass_equals_the_plain_max_pool(kwargs, duplicates):
    """Training backpropagates through each channel's winning points only; the loss and
    every gradient equal those of the plain max-pool (also when points tie: the same
    winner as max's)."""
    meta = {**SHAPE_META, "point_cloud": (512, 6 if kwargs.get("use_rgb") else 3)}
    obs = make_obs(meta, batch=6)
    if duplicates:  # half of each cloud repeats a few points: channels tie between copies
        obs["point_cloud"][:, 256:] = obs["point_cloud"][:, :8].repeat(1, 32, 1)
    enc = build("dp3", meta, **kwargs).train()
    target = torch.randn(6, enc.out_dim, generator=torch.Generator().manual_seed(1))

    def loss_and_grads(forward):
        enc.zero_grad(set_to_none=True)
        loss = ((forward() - target) ** 2).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in enc.named_parameters()}

    fast_loss, fast = loss_and_grads(lambda: enc(obs))
    plain_loss, plain = loss_and_grads(lambda: torch.cat(
        [_plain_dp3_pool(enc, obs["point_cloud"]), enc.agent_pos_mlp(obs["agent_pos"])], dim=-1))
    torch.testing.assert_close(fast_loss, plain_loss)
    assert fast.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(fast[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # and acting (no graph) takes the plain path, to the bit
        assert torch.equal(enc(obs), torch.cat([_plain_dp3_pool(enc, obs["point_cloud"]),
                                                enc.agent_pos_mlp(obs["agent_pos"])], dim=-1))


# ---------------------------------------------------------------- multi-stage PointNet, state MLP


def test_pointnet_stages():
    enc = build("pointnet")
    assert enc.out_dim == 128
    assert linears(enc) == [(3, 128)] + [(256, 128)] * 3 + [(128, 64), (DP, 64), (64, 64)]
    expected = linear(3, 128) + layernorm(128) + 3 * (linear(256, 128) + layernorm(128))
    expected += linear(128, 64) + linear(DP, 64) + linear(64, 64)
    assert n_params(enc) == expected
    two = build("pointnet", stages=2, hidden=32)
    assert linears(two) == [(3, 32), (64, 32), (32, 64), (DP, 64), (64, 64)]


def test_pointnet_later_stages_see_the_global_feature():
    """Hand-written forward: stage k>1 reads [point feature, max-pooled feature]."""
    enc = build("pointnet", stages=3, hidden=16)
    obs = make_obs()
    x = obs["point_cloud"]
    for i, stage in enumerate(enc.stages):
        if i:
            x = torch.cat([x, x.max(dim=1, keepdim=True).values.expand_as(x)], dim=-1)
        x = stage(x)
    x = enc.final_projection(x.max(dim=1).values)
    expected = torch.cat([x, enc.agent_pos_mlp(obs["agent_pos"])], dim=-1)
    torch.testing.assert_close(enc(obs), expected)


def test_state_mlp():
    enc = build("state")
    assert enc.out_dim == 64
    assert linears(enc) == [(DS, 256), (256, 256), (256, 64)]
    assert n_params(enc) == linear(DS, 256) + layernorm(256) + linear(256, 256) + linear(256, 64)
    assert build("state", out_channels=16, hidden=32).out_dim == 16


# ---------------------------------------------------------------- colour


@pytest.mark.parametrize("name", POINT_ENCODERS)
def test_use_rgb_reads_the_colours(name):
    enc = build(name, RGB_META, use_rgb=True)
    assert linears(enc)[0][0] == 6
    obs = make_obs(RGB_META)
    base = enc(obs)
    obs["point_cloud"][..., 3:] = 1 - obs["point_cloud"][..., 3:]
    assert ((enc(obs) - base).abs().amax(dim=1) > 1e-4).all()


@pytest.mark.parametrize("name", POINT_ENCODERS)
def test_without_use_rgb_colours_are_ignored(name):
    enc = build(name, RGB_META)
    assert linears(enc)[0][0] == 3
    obs = make_obs(RGB_META)
    base = enc(obs)
    obs["point_cloud"][..., 3:] = 1 - obs["point_cloud"][..., 3:]
    torch.testing.assert_close(enc(obs), base, rtol=0, atol=0)
    # The same weights on the xyz-only cloud give the same features.
    obs["point_cloud"] = obs["point_cloud"][..., :3].contiguous()
    torch.testing.assert_close(enc(obs), base)


@pytest.mark.parametrize("name", POINT_ENCODERS)
def test_use_rgb_on_an_xyz_dataset_is_a_user_error(name):
    with pytest.raises(UserError, match=r"use_rgb.*3 channels.*rgb=true.*drop encoder\.use_rgb") as err:
        build_encoder(name, SHAPE_META, use_rgb=True)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- registry errors


def test_unknown_encoder():
    with pytest.raises(UserError) as err:
        build_encoder("x", SHAPE_META)
    assert str(err.value) == "unknown encoder 'x'; valid: dp3, image, pointnet, state"


def test_missing_key():
    meta = {"point_cloud": (N, 3), "agent_pos": (DP,)}
    with pytest.raises(UserError) as err:
        build_encoder("state", meta)
    assert str(err.value) == (
        "encoder 'state' reads 'state', which the data does not have (it has: point_cloud, agent_pos)"
    )
    with pytest.raises(UserError, match=r"encoder 'dp3' reads 'agent_pos'.*\(it has: point_cloud\)"):
        build_encoder("dp3", {"point_cloud": (N, 3)})
    with pytest.raises(UserError, match="reads 'state'"):  # built directly, not through the registry
        ENCODERS["state"](meta)


@pytest.mark.parametrize("name", encoder_names())
def test_unknown_option(name):
    with pytest.raises(UserError) as err:
        build_encoder(name, SHAPE_META, use_colour=True)
    message = str(err.value)
    assert message.startswith(f"encoder '{name}' has no option 'use_colour'; valid: ")
    for option in encoder_options(name):
        assert option in message
    assert "shape_meta" not in message and "self" not in message


@pytest.mark.parametrize(
    "name, shape_meta, kwargs, pattern",
    [
        ("dp3", SHAPE_META, {"out_channels": 0}, r"encoder\.out_channels must be a positive integer"),
        ("pointnet", SHAPE_META, {"stages": 1.5}, r"encoder\.stages must be a positive integer"),
        ("dp3", SHAPE_META, {"use_rgb": "yes"}, r"encoder\.use_rgb must be true or false"),
        ("dp3", {**SHAPE_META, "point_cloud": (N, 4)}, {}, r"\(N, 3\).*\(N, 6\).*got \(64, 4\)"),
        ("state", {"state": (3, 13)}, {}, r"shape_meta\['state'\] must be \(D,\)"),
        ("state", {"state": "39"}, {}, r"tuple of positive integers"),
        ("image", SHAPE_META, {"crop_ratio": 0}, r"encoder\.crop_ratio must be in \(0, 1\]"),
        ("image", SHAPE_META, {"keypoints": -2}, r"encoder\.keypoints must be a positive integer"),
        ("image", {**SHAPE_META, "image": (HW, HW)}, {}, r"\(H, W, 3\) for rgb or \(H, W, 4\) for rgbd, got \(48, 48\)"),
        ("image", SHAPE_META, {"use_depth": True}, r"use_depth=true needs rgbd images.*image=rgbd"),
    ],
)
def test_bad_values_are_user_errors(name, shape_meta, kwargs, pattern):
    with pytest.raises(UserError, match=pattern) as err:
        build_encoder(name, shape_meta, **kwargs)
    assert "\n" not in str(err.value)


def test_shape_meta_from_yaml_lists():
    enc = build_encoder("dp3", {"point_cloud": [N, 3], "agent_pos": [DP]})
    assert enc.shape_meta == {"point_cloud": (N, 3), "agent_pos": (DP,)}


# ---------------------------------------------------------------- Diffusion Policy's image encoder

RGBD_META = {**SHAPE_META, "image": (HW, HW, 4)}


def test_image_encoder_is_dp_resnet18_with_groupnorm_and_spatial_softmax():
    from torchvision.models import resnet18

    enc = build("image")
    assert enc.out_dim == 64 + 64
    assert not [m for m in enc.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    norms = [m for m in enc.trunk.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 20 and all(m.num_groups == m.num_channels // 16 for m in norms)
    # torchvision's ResNet-18 without its classifier, then the keypoint conv, the projection and DP3's agent_pos MLP
    trunk = n_params(resnet18(weights=None)) - linear(512, 1000)
    assert n_params(enc.trunk) == trunk == 11_176_512
    assert n_params(enc) == trunk + (512 * 32 + 32) + linear(64, 64) + linear(DP, 64) + linear(64, 64) == 11_201_888
    assert enc.crop == (43, 43)  # round(0.9 * 48); 84 -> 76 as Diffusion Policy
    assert build("image", {**SHAPE_META, "image": (84, 84, 3)}).crop == (76, 76)


def test_spatial_softmax_against_closed_forms():
    from sodp3d.encoders.image import SpatialSoftmax

    H, W = 4, 5
    pool = SpatialSoftmax(8, H, W, num_kp=3)
    maps = torch.zeros(2, 3, H, W)
    maps[0, 0, 2, 4] = 1e4  # one-hot: that pixel's coordinates
    maps[0, 1, 0, 0] = 1e4
    maps[1, 2, 3, 1] = 1e4
    kp = pool.expected_coordinates(maps)
    torch.testing.assert_close(kp[0, 0], torch.tensor([1.0, -1 + 2 * 2 / 3]))  # x = right column, y = row 2 of 0..3
    torch.testing.assert_close(kp[0, 1], torch.tensor([-1.0, -1.0]))
    torch.testing.assert_close(kp[1, 2], torch.tensor([-1 + 2 * 1 / 4, 1.0]))
    torch.testing.assert_close(kp[0, 2], torch.zeros(2))  # a flat map: the centre
    # any map: the softmax-weighted mean of the pixel coordinates
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(2, 3, H, W, generator=g)
    weights = torch.softmax(maps.reshape(2, 3, -1), dim=-1).reshape(2, 3, H, W)
    xs, ys = torch.linspace(-1, 1, W), torch.linspace(-1, 1, H)
    expected = torch.stack([(weights * xs).sum((2, 3)), (weights * ys[:, None]).sum((2, 3))], dim=-1)
    torch.testing.assert_close(pool.expected_coordinates(maps), expected)
    feats = torch.randn(2, 8, H, W, generator=g)
    torch.testing.assert_close(pool(feats), pool.expected_coordinates(pool.keypoints(feats)))


def test_image_encoder_scales_uint8_itself_and_reads_the_centre_crop():
    enc = build("image")
    obs = make_obs()
    base = enc(obs)
    # uint8 and the same values as floats give the same features: the encoder divides by 255
    torch.testing.assert_close(enc({**obs, "image": obs["image"].float()}), base)
    # by hand: centre crop (rows and columns 2..44 of 48), [0, 1], ResNet trunk, keypoints, projection
    x = obs["image"][:, 2:45, 2:45].permute(0, 3, 1, 2).float() / 255
    expected = torch.cat([enc.projection(enc.pool(enc.trunk(x)).flatten(1)), enc.agent_pos_mlp(obs["agent_pos"])], -1)
    torch.testing.assert_close(base, expected)
    # pixels outside the centre crop are not seen; one inside is
    outside = obs["image"].clone()
    outside[:, :2] = 255 - outside[:, :2]
    outside[:, :, 45:] = 255 - outside[:, :, 45:]
    torch.testing.assert_close(enc({**obs, "image": outside}), base, rtol=0, atol=0)
    inside = obs["image"].clone()
    inside[:, 20:26, 20:26] = 255 - inside[:, 20:26, 20:26]
    assert ((enc({**obs, "image": inside}) - base).abs().amax(dim=1) > 1e-5).all()


def test_image_encoder_random_crops():
    """Training draws a corner per image, uniform over the positions that fit; the crop it
    reads is the one at that corner."""
    enc = build("image")
    corners = enc.draw_augmentation(4000, torch.Generator().manual_seed(0))
    assert corners.shape == (4000, 2) and corners.min() == 0 and corners.max() == HW - 43
    assert set(corners[:, 0].tolist()) == set(range(HW - 43 + 1))  # every row offset occurs
    again = enc.draw_augmentation(4000, torch.Generator().manual_seed(0))
    assert torch.equal(corners, again)
    obs = make_obs()
    at = torch.tensor([[0, 0], [5, 5], [0, 5], [5, 0], [3, 1]])
    x = torch.stack([obs["image"][i, r:r + 43, c:c + 43] for i, (r, c) in enumerate(at.tolist())])
    x = x.permute(0, 3, 1, 2).float() / 255
    expected = torch.cat([enc.image_features(x), enc.agent_pos_mlp(obs["agent_pos"])], -1)
    torch.testing.assert_close(enc(obs, at), expected)
    assert not torch.allclose(enc(obs, at), enc(obs))  # not the centre crop
    assert not hasattr(build("dp3"), "draw_augmentation")  # the point encoders draw nothing


def test_image_encoder_depth_channel():
    with_depth = build("image", RGBD_META, use_depth=True)
    assert with_depth.trunk[0].in_channels == 4
    obs = make_obs(RGBD_META)
    base = with_depth(obs)
    changed = obs["image"].clone()
    changed[..., 3] = 255 - changed[..., 3]
    assert ((with_depth({**obs, "image": changed}) - base).abs().amax(dim=1) > 1e-5).all()
    rgb_only = build("image", RGBD_META)  # rgbd data, rgb read: the depth channel is ignored
    assert rgb_only.trunk[0].in_channels == 3
    torch.testing.assert_close(rgb_only({**obs, "image": changed}), rgb_only(obs), rtol=0, atol=0)


def test_torchvision_imports_through_the_shim():
    from sodp3d.encoders.image import torchvision

    tv = torchvision()
    assert tv is torchvision()  # once
    assert hasattr(torch.ops.torchvision, "nms")  # defined by the extension, or declared by the shim
    assert tv.models.resnet18 is not None
