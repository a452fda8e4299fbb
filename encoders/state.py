"""An MLP on the low-dimensional simulator state (the state-based SODP setting).

Shapes:
    B   batch (the policy folds its To observed steps into it)
    Ds  state dim (39 on Meta-World)
    H   hidden width
    F   feature dim: out_channels (64 by default)

Linear(Ds, H), LayerNorm, ReLU, Linear(H, H), ReLU, Linear(H, out_channels).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from .base import Encoder, ShapeMeta, boolean, positive_int, vector_dim


class StateEncoder(Encoder):
    """state (B, Ds) -> (B, out_channels)."""

    keys = ("state",)

    def __init__(
        self,
        shape_meta: ShapeMeta,
        hidden: int = 256,
        out_channels: int = 64,
        use_layernorm: bool = True,
    ):
        super().__init__(shape_meta)
        hidden = positive_int("hidden", hidden)
        out_channels = positive_int("out_channels", out_channels)
        use_layernorm = boolean("use_layernorm", use_layernorm)
        dim = vector_dim(self.shape_meta, "state")
        layers: list[nn.Module] = [nn.Linear(dim, hidden)]
        if use_layernorm:
            layers.append(nn.LayerNorm(hidden))
        layers += [nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out_channels)]
        self.mlp = nn.Sequential(*layers)
        self.out_dim = out_channels

    def forward(self, obs: Mapping[str, Tensor]) -> Tensor:
        """obs["state"]: (B, Ds) -> (B, F)."""
        return self.mlp(obs["state"])
