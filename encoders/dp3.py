"""DP3's point-cloud encoder (3D Diffusion Policy, RSS 2024), layer for layer.

Shapes:
    B   batch (the policy folds its To observed steps into it)
    N   points per cloud
    C   point channels: 3 (xyz) or 6 (xyz then rgb)
    Dp  agent_pos dim
    F   feature dim: out_channels + 64 (128 by default)

Point branch (DP3's ``PointNetEncoderXYZ``): a per-point MLP 3-64-128-256 with
Linear, LayerNorm, ReLU at each layer, a max-pool over the points, then Linear 256-64
and LayerNorm. agent_pos branch (DP3's ``state_mlp``): Linear(Dp, 64), ReLU,
Linear(64, 64). The two features are concatenated.

Options, as DP3 names them: ``use_layernorm=False`` drops the three per-point
LayerNorms (DP3's "no LayerNorm" ablation, 73.0 vs 78.3); ``final_norm=False`` drops the
projection's LayerNorm (DP3's ``final_norm='none'``). By default only xyz is read, even
from a 6-channel cloud (colour hurt in DP3: 72.0 vs 78.3).

``use_rgb=True`` is DP3's coloured network (its ``use_pc_color``, ``PointNetEncoderXYZRGB``):
xyz+rgb through a per-point MLP 6-64-128-256 (Linear, LayerNorm, ReLU) and a fourth
Linear 256-512 without normalisation or activation, max-pool, projection 512-64 (212,032
parameters with a 9-dim agent_pos). The policy normalises the colour channels as DP3
does, each min-max to [-1, 1] over the data, like xyz.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import PointCloudEncoder, ShapeMeta, boolean, max_pool_of_winners, point_layer, positive_int

BLOCK_CHANNELS = (64, 128, 256)
RGB_WIDTH = 512  # the coloured network's last per-point width


class DP3Encoder(PointCloudEncoder):
    """(point_cloud (B, N, C), agent_pos (B, Dp)) -> (B, out_channels + 64)."""

    def __init__(
        self,
        shape_meta: ShapeMeta,
        out_channels: int = 64,
        use_layernorm: bool = True,
        final_norm: bool = True,
        use_rgb: bool = False,
    ):
        super().__init__(shape_meta, use_rgb)
        out_channels = positive_int("out_channels", out_channels)
        use_layernorm = boolean("use_layernorm", use_layernorm)
        final_norm = boolean("final_norm", final_norm)

        layers: list[nn.Module] = []
        c_in = self.in_channels
        for c_out in BLOCK_CHANNELS:
            layers.extend(point_layer(c_in, c_out, use_layernorm))
            c_in = c_out
        if self.use_rgb:  # DP3's coloured network ends in a plain Linear to 512
            layers.append(nn.Linear(c_in, RGB_WIDTH))
            c_in = RGB_WIDTH
        self.mlp = nn.Sequential(*layers)
        projection: list[nn.Module] = [nn.Linear(c_in, out_channels)]
        if final_norm:
            projection.append(nn.LayerNorm(out_channels))
        self.final_projection = nn.Sequential(*projection)
        self.add_agent_pos_branch(out_channels)

    def point_features(self, points: Tensor) -> Tensor:
        """points: (B, N, 3), or (B, N, 6) with use_rgb -> (B, out_channels)."""
        if torch.is_grad_enabled() and self.mlp[0].weight.requires_grad:
            pooled = max_pool_of_winners(self.mlp, points)  # training: backward through the winners only
        else:
            pooled = self.mlp(points).max(dim=1).values  # (B, 256)
        return self.final_projection(pooled)  # (B, out_channels)
