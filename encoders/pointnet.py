"""A multi-stage PointNet, as in iDP3 (Improved 3D Diffusion Policy).

Shapes:
    B   batch (the policy folds its To observed steps into it)
    N   points per cloud
    C   point channels: 3 (xyz) or 6 (xyz then rgb)
    H   hidden width per point
    Dp  agent_pos dim
    F   feature dim: out_channels + 64 (128 by default)

Stage 1 maps each point C -> H (Linear, LayerNorm, ReLU). Every later stage sees each
point's features next to the cloud's max-pooled feature, broadcast back to every point,
and maps the 2H-wide concatenation -> H (Linear, LayerNorm, ReLU), so points learn
about the whole cloud before the final max-pool -> Linear(H, out_channels). The agent_pos
branch is DP3's: Linear(Dp, 64), ReLU, Linear(64, 64).

iDP3's own module differs in details (1x1 convolutions without normalisation, and the
projection reads all stages' features concatenated); this one keeps DP3's LayerNorms
and a single projection of the last stage.
"""

from __future__ import annotations


import torch
from torch import Tensor, nn

from .base import PointCloudEncoder, ShapeMeta, boolean, point_layer, positive_int


def _stage(c_in: int, c_out: int, use_layernorm: bool) -> nn.Sequential:
    return nn.Sequential(*point_layer(c_in, c_out, use_layernorm))


class PointNetEncoder(PointCloudEncoder):
    """(point_cloud (B, N, C), agent_pos (B, Dp)) -> (B, out_channels + 64)."""

    def __init__(
        self,
        shape_meta: ShapeMeta,
        stages: int = 4,
        hidden: int = 128,
        out_channels: int = 64,
        use_layernorm: bool = True,
        use_rgb: bool = False,
    ):
        super().__init__(shape_meta, use_rgb)
        stages = positive_int("stages", stages)
        hidden = positive_int("hidden", hidden)
        out_channels = positive_int("out_channels", out_channels)
        use_layernorm = boolean("use_layernorm", use_layernorm)

        self.stages = nn.ModuleList(
            [_stage(self.in_channels, hidden, use_layernorm)]
            + [_stage(2 * hidden, hidden, use_layernorm) for _ in range(stages - 1)]
        )
        self.final_projection = nn.Linear(hidden, out_channels)
        self.add_agent_pos_branch(out_channels)

    def point_features(self, points: Tensor) -> Tensor:
        """points: (B, N, 3 or 6) -> (B, out_channels)."""
        x = points
        for i, stage in enumerate(self.stages):
            if i > 0:
                pooled = x.max(dim=1, keepdim=True).values  # (B, 1, H)
                x = torch.cat([x, pooled.expand_as(x)], dim=-1)  # (B, N, 2H)
            x = stage(x)  # (B, N, H)
        return self.final_projection(x.max(dim=1).values)  # (B, out_channels)
