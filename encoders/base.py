"""The encoder interface and the checks and pieces the encoders share.

Shapes:
    B   batch (the policy folds its To observed steps into it: B = batch * To)
    N   points per cloud
    C   point channels: 3 (xyz) or 6 (xyz then rgb in [0, 1])
    Dp  agent_pos dim
    Ds  state dim
    F   feature dim (an encoder's out_dim)

An encoder reads the observation keys named in its ``keys`` and returns one feature
vector per sample. Its constructor takes ``shape_meta`` (obs key -> per-step shape, the
task's shape contract) first and its options as keyword arguments with defaults; the
registry in ``__init__.py`` reads that signature to reject unknown options.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from sodp3d.errors import UserError

ShapeMeta = Mapping[str, tuple[int, ...]]


class Encoder(nn.Module):
    """Observation dict -> feature vector.

    Class attribute ``keys``: the observation keys read. Instance attribute ``out_dim``:
    the feature size F. ``shape_meta`` keeps the per-step shapes of the keys read.
    """

    keys: tuple[str, ...] = ()
    out_dim: int

    def __init__(self, shape_meta: ShapeMeta):
        super().__init__()
        shape_meta = normalise_shape_meta(shape_meta)
        missing = missing_keys(self.keys, shape_meta)
        if missing:
            raise UserError(missing_keys_message(type(self).__name__, missing, shape_meta))
        self.shape_meta: dict[str, tuple[int, ...]] = {k: shape_meta[k] for k in self.keys}

    def forward(self, obs: Mapping[str, Tensor]) -> Tensor:
        """obs[k]: (B, *shape_meta[k]) for k in keys (other keys are ignored) -> (B, F)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"keys={self.keys}, out_dim={self.out_dim}"


class PointCloudEncoder(Encoder):
    """A point branch next to DP3's agent_pos MLP, concatenated:
    (point_cloud (B, N, C), agent_pos (B, Dp)) -> (B, point features + 64).

    Subclasses build their point branch, then call ``add_agent_pos_branch`` (after it, so
    parameters are created, and seeded, in the same order as DP3's), and implement
    ``point_features``.
    """

    keys = ("point_cloud", "agent_pos")

    def __init__(self, shape_meta: ShapeMeta, use_rgb: bool):
        super().__init__(shape_meta)
        self.use_rgb = boolean("use_rgb", use_rgb)
        self.in_channels = point_channels(self.shape_meta, self.use_rgb)

    def add_agent_pos_branch(self, point_dim: int) -> None:
        self.agent_pos_mlp = agent_pos_mlp(vector_dim(self.shape_meta, "agent_pos"))
        self.out_dim = point_dim + self.agent_pos_mlp[-1].out_features

    def point_features(self, points: Tensor) -> Tensor:
        """points: (B, N, in_channels) -> (B, point features)."""
        raise NotImplementedError

    def forward(self, obs: Mapping[str, Tensor]) -> Tensor:
        """obs["point_cloud"]: (B, N, C), obs["agent_pos"]: (B, Dp) -> (B, F)."""
        x = self.point_features(obs["point_cloud"][..., : self.in_channels])  # xyz, or xyz+rgb
        return torch.cat([x, self.agent_pos_mlp(obs["agent_pos"])], dim=-1)


# ---------------------------------------------------------------------------- checks


def normalise_shape_meta(shape_meta: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Shapes as tuples of ints (yaml gives lists); anything else is a UserError."""
    if not isinstance(shape_meta, Mapping):
        raise UserError(f"shape_meta must map observation keys to shapes, got {type(shape_meta).__name__}")
    out = {}
    for key, shape in shape_meta.items():
        try:
            dims = tuple(int(d) for d in shape)
            ok = all(d == s for d, s in zip(dims, shape)) and all(d > 0 for d in dims)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise UserError(f"shape_meta[{key!r}] must be a tuple of positive integers, got {shape!r}")
        out[str(key)] = dims
    return out


def missing_keys(keys: tuple[str, ...], shape_meta: Mapping[str, Any]) -> list[str]:
    return [k for k in keys if k not in shape_meta]


def missing_keys_message(name: str, missing: list[str], shape_meta: Mapping[str, Any]) -> str:
    reads = ", ".join(repr(k) for k in missing)
    has = ", ".join(shape_meta) or "nothing"
    return f"encoder {name!r} reads {reads}, which the data does not have (it has: {has})"


def positive_int(option: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"encoder.{option} must be a positive integer, got {value!r}")
    return value


def boolean(option: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"encoder.{option} must be true or false, got {value!r}")
    return value


def vector_dim(shape_meta: ShapeMeta, key: str) -> int:
    """The size D of a per-step vector observation of shape (D,)."""
    shape = shape_meta[key]
    if len(shape) != 1:
        raise UserError(f"shape_meta[{key!r}] must be (D,) for a vector observation, got {shape}")
    return shape[0]


def point_channels(shape_meta: ShapeMeta, use_rgb: bool) -> int:
    """Channels the point MLP takes: 6 with use_rgb (needs an (N, 6) cloud), else 3.

    Without use_rgb an (N, 6) cloud is accepted and its colours are ignored.
    """
    shape = shape_meta["point_cloud"]
    if len(shape) != 2 or shape[1] not in (3, 6):
        raise UserError(
            f"shape_meta['point_cloud'] must be (N, 3) for xyz or (N, 6) for xyz+rgb, got {shape}"
        )
    if use_rgb and shape[1] != 6:
        raise UserError(
            f"encoder.use_rgb=true needs point_cloud with 6 channels (xyz+rgb), but the dataset's "
            f"clouds have {shape[1]} channels; collect with env.<suite>.rgb=true "
            f"(e.g. env.metaworld.rgb=true) or drop encoder.use_rgb"
        )
    return 6 if use_rgb else 3


# ---------------------------------------------------------------------------- layers


def agent_pos_mlp(dim: int, hidden: int = 64, out: int = 64) -> nn.Sequential:
    """DP3's state MLP: Linear(Dp, 64), ReLU, Linear(64, 64). (B, Dp) -> (B, 64)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, out))


def point_layer(c_in: int, c_out: int, use_layernorm: bool = True) -> list[nn.Module]:
    """One per-point layer of a point encoder: Linear, optional LayerNorm, ReLU.

    The ReLU works in place: neither Linear's nor LayerNorm's backward reads its own
    output, so overwriting it saves a (points x channels) tensor per layer."""
    layers: list[nn.Module] = [nn.Linear(c_in, c_out)]
    if use_layernorm:
        layers.append(nn.LayerNorm(c_out))
    layers.append(nn.ReLU(inplace=True))
    return layers


def max_pool_of_winners(mlp: nn.Module, points: Tensor) -> Tensor:
    """max over points of a per-point ``mlp``: (B, N, C) -> (B, F), with a cheaper backward.

    The gradient of a max-pool reaches only each channel's winning point, so only those
    points need a graph: all N points go through ``mlp`` without one (to find the
    winners, the same indices ``max`` picks), then the winners (typically a fifth to a
    half of the cloud) go through it again with gradients, and the pooled feature is read
    from them. Values equal ``mlp(points).max(1).values`` and gradients equal its
    backward, to float rounding (the matrix products see fewer rows). ``mlp`` must treat
    every point on its own (DP3's Linear / LayerNorm / ReLU stack does)."""
    B, N = points.shape[:2]
    with torch.no_grad():
        winner = mlp(points).max(dim=1).indices  # (B, F): the point that wins each channel
    active = torch.zeros(B, N, dtype=torch.bool, device=points.device)
    active.scatter_(1, winner, True)
    row = (active.view(-1).cumsum(0) - 1).view(B, N)  # each active point's row among the winners
    features = mlp(points[active])  # (M, F), M = active points in the batch
    return features.gather(0, row.gather(1, winner))  # (B, F)
