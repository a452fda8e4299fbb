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

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .base import Encoder, ShapeMeta, agent_pos_mlp, boolean, point_channels, point_layer, positive_int, vector_dim


def _stage(c_in: int, c_out: int, use_layernorm: bool) -> nn.Sequential:
    return nn.Sequential(*point_layer(c_in, c_out, use_layernorm))


class PointNetEncoder(Encoder):
    """(point_cloud (B, N, C), agent_pos (B, Dp)) -> (B, out_channels + 64)."""

    keys = ("point_cloud", "agent_pos")

    def __init__(
        self,
        shape_meta: ShapeMeta,
        stages: int = 4,
        hidden: int = 128,
        out_channels: int = 64,
        use_layernorm: bool = True,
        use_rgb: bool = False,
    ):
        super().__init__(shape_meta)
        stages = positive_int("stages", stages)
        hidden = positive_int("hidden", hidden)
        out_channels = positive_int("out_channels", out_channels)
        use_layernorm = boolean("use_layernorm", use_layernorm)
        self.use_rgb = boolean("use_rgb", use_rgb)
        self.in_channels = point_channels(self.shape_meta, self.use_rgb)

        self.stages = nn.ModuleList(
            [_stage(self.in_channels, hidden, use_layernorm)]
            + [_stage(2 * hidden, hidden, use_layernorm) for _ in range(stages - 1)]
        )
        self.final_projection = nn.Linear(hidden, out_channels)
        self.agent_pos_mlp = agent_pos_mlp(vector_dim(self.shape_meta, "agent_pos"))
        self.out_dim = out_channels + self.agent_pos_mlp[-1].out_features

    def forward(self, obs: Mapping[str, Tensor]) -> Tensor:
        """obs["point_cloud"]: (B, N, C), obs["agent_pos"]: (B, Dp) -> (B, F)."""
        x = obs["point_cloud"][..., : self.in_channels]  # (B, N, 3 or 6)
        for i, stage in enumerate(self.stages):
            if i > 0:
                pooled = x.max(dim=1, keepdim=True).values  # (B, 1, H)
                x = torch.cat([x, pooled.expand_as(x)], dim=-1)  # (B, N, 2H)
            x = stage(x)  # (B, N, H)
        x = self.final_projection(x.max(dim=1).values)  # (B, out_channels)
        a = self.agent_pos_mlp(obs["agent_pos"])  # (B, 64)
        return torch.cat([x, a], dim=-1)
