"""The conditional 1-D U-Net and its preset registry."""

import pytest
import torch

from sodp3d.errors import UserError
from sodp3d.unet import (UNET_PRESETS, ConditionalResidualBlock1D, ConditionalUnet1D, SinusoidalPosEmb, build_unet,
                         count_parameters, preset_names)

Da, G = 4, 256




@pytest.fixture(scope="module")
def paper():
    """The full DP3 U-Net (~255M parameters): built once for this module."""
    torch.manual_seed(0)
    return build_unet("paper", Da, G)


def test_preset_registry():
    assert preset_names() == ["paper", "simple", "tiny"]
    assert set(UNET_PRESETS) == set(preset_names())


@pytest.mark.parametrize("preset", ["simple", "tiny"])
@pytest.mark.parametrize("horizon", [4, 12, 16])
def test_small_presets_map_actions_to_actions(preset, horizon):
    torch.manual_seed(0)
    net = build_unet(preset, Da, G)
    batch = 3 if preset == "tiny" else 2
    out = net(torch.randn(batch, horizon, Da), torch.tensor([0, 50, 99][:batch]), torch.randn(batch, G))
    assert out.shape == (batch, horizon, Da) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_paper_preset(paper):
    n = count_parameters(paper)
    print(f"paper U-Net (Da={Da}, G={G}): {n:,} parameters")
    assert 240e6 < n < 270e6  # DP3 reports ~255M for its full model
    with torch.no_grad():
        out = paper(torch.randn(1, 12, Da), 10, torch.randn(1, G))  # 12 = 3 * 2**2: allowed
    assert out.shape == (1, 12, Da)
    with pytest.raises(UserError, match=r"horizon T=6 is not divisible by 2\*\*2=4 .* 3 levels"):
        paper(torch.randn(1, 6, Da), 10, torch.randn(1, G))


def test_horizon_check_depends_on_levels():
    tiny = build_unet("tiny", Da, G)  # 2 levels: multiples of 2
    assert tiny.horizon_multiple == 2
    tiny.check_horizon(6)
    with pytest.raises(UserError, match="multiple of 2"):
        tiny(torch.randn(1, 5, Da), 0, torch.randn(1, G))
    assert build_unet("simple", Da, G).horizon_multiple == 4


def test_parameter_counts_of_small_presets():
    counts = {p: count_parameters(build_unet(p, Da, G)) for p in ("simple", "tiny")}
    print(counts)
    assert counts["tiny"] < 1e6
    # Simple DP3 (DP3's code): one block per stage and one middle block; 4 action dims and
    # a 256-dim condition give exactly this many parameters.
    simple = build_unet("simple", 4, 256)
    assert len(simple.mid_blocks) == 1
    assert count_parameters(simple) == 7_375_236
    assert count_parameters(build_unet("simple", 4, 256, mid_blocks=2)) == 9_147_780  # the old, wider one


def test_timestep_as_int_or_tensor():
    torch.manual_seed(0)
    net = build_unet("tiny", Da, G).eval()
    x, cond = torch.randn(3, 8, Da), torch.randn(3, G)
    ref = net(x, torch.tensor([7, 7, 7]), cond)
    torch.testing.assert_close(net(x, 7, cond), ref)
    torch.testing.assert_close(net(x, torch.tensor(7), cond), ref)
    torch.testing.assert_close(net(x, torch.tensor([7]), cond), ref)
    with pytest.raises(UserError, match="timestep"):
        net(x, torch.tensor([1, 2]), cond)


def test_condition_and_timestep_matter():
    torch.manual_seed(0)
    net = build_unet("tiny", Da, G)
    x, cond = torch.randn(3, 8, Da), torch.randn(3, G)
    out = net(x, 10, cond)
    assert not torch.allclose(net(x, 10, cond + 0.5 * torch.randn(3, G)), out, atol=1e-5)
    assert not torch.allclose(net(x, 60, cond), out, atol=1e-5)
    # each sample sees only its own condition
    cond2 = cond.clone()
    cond2[0] += 1.0
    out2 = net(x, 10, cond2)
    assert not torch.allclose(out2[0], out[0], atol=1e-5)
    torch.testing.assert_close(out2[1:], out[1:])


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = build_unet("tiny", Da, G)
    out = net(torch.randn(3, 8, Da), torch.tensor([1, 40, 90]), torch.randn(3, G))
    (out ** 2).mean().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


def test_up_path_concatenates_the_down_stage_skips():
    torch.manual_seed(0)
    net = build_unet("simple", Da, G)  # 3 levels: skips of stages 2 and 1 are concatenated
    seen = {}
    for name, mod in [("down1", net.down_stages[1][-1]), ("down2", net.down_stages[2][-1]),
                      ("up0", net.up_stages[0][0]), ("up1", net.up_stages[1][0])]:
        mod.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, (args[0], out)))
    net(torch.randn(2, 8, Da), 3, torch.randn(2, G))
    torch.testing.assert_close(seen["up0"][0][:, 384:], seen["down2"][1])  # (B, 384, T/4)
    torch.testing.assert_close(seen["up1"][0][:, 256:], seen["down1"][1])  # (B, 256, T/2)
    assert seen["up1"][1].shape == (2, 128, 4)


def test_building_blocks():
    emb = SinusoidalPosEmb(16)(torch.tensor([0, 5]))
    assert emb.shape == (2, 16)
    torch.testing.assert_close(emb[0], torch.cat([torch.zeros(8), torch.ones(8)]))  # sin(0), cos(0)
    block = ConditionalResidualBlock1D(8, 16, cond_dim=5, kernel_size=5, n_groups=8)
    assert block(torch.randn(2, 8, 12), torch.randn(2, 5)).shape == (2, 16, 12)
    # FiLM: zero the conditioning layer and the block no longer depends on cond
    with torch.no_grad():
        block.cond_encoder[1].weight.zero_()
    x = torch.randn(2, 8, 12)
    torch.testing.assert_close(block(x, torch.randn(2, 5)), block(x, torch.randn(2, 5)))
    # FiLM is out = scale * h + bias with the first 16 outputs the scales, the last 16 the biases
    with torch.no_grad():
        block.cond_encoder[1].bias.copy_(torch.cat([torch.full((16,), 2.0), torch.full((16,), 0.5)]))
    expected = block.blocks[1](2.0 * block.blocks[0](x) + 0.5) + block.residual_conv(x)
    torch.testing.assert_close(block(x, torch.randn(2, 5)), expected)


def test_overrides_and_unknown_names():
    net = build_unet("tiny", Da, 10, down_dims=[16, 32, 64], kernel_size=3)
    assert isinstance(net, ConditionalUnet1D)
    assert net.down_dims == (16, 32, 64) and net.kernel_size == 3 and net.horizon_multiple == 4
    assert net(torch.randn(2, 8, Da), 3, torch.randn(2, 10)).shape == (2, 8, Da)
    with pytest.raises(UserError, match="unknown U-Net preset 'huge'; valid presets: paper, simple, tiny"):
        build_unet("huge", Da, G)
    with pytest.raises(UserError, match="unknown U-Net option.*down_dim.*valid options"):
        build_unet("tiny", Da, G, down_dim=(8, 16))
    with pytest.raises(UserError, match="n_groups"):
        build_unet("tiny", Da, G, n_groups=5)
    with pytest.raises(UserError, match="kernel_size"):
        build_unet("tiny", Da, G, kernel_size=4)


def test_bad_input_shapes():
    net = build_unet("tiny", Da, G)
    with pytest.raises(UserError, match=r"expected \(B, T, 4\)"):
        net(torch.randn(2, 8, Da + 1), 0, torch.randn(2, G))
    with pytest.raises(UserError, match="global_cond"):
        net(torch.randn(2, 8, Da), 0, torch.randn(2, G - 1))


def test_no_global_condition():
    net = build_unet("tiny", Da, 0)
    assert net(torch.randn(2, 8, Da), 0).shape == (2, 8, Da)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_unet_on_cuda():
    net = build_unet("tiny", Da, G).cuda()
    out = net(torch.randn(2, 8, Da, device="cuda"), 5, torch.randn(2, G, device="cuda"))
    assert out.device.type == "cuda" and out.shape == (2, 8, Da)
