"""Min-max normalisation to [-1, 1], fitted on the data and saved with the model.

Shapes: D feature dim of a key. For ``point_cloud`` the first ``point_channels`` channels
are normalised: xyz (3), or xyz and colour (6) for an encoder that reads colour (DP3
normalises its coloured clouds per channel the same way); channels beyond them pass
through.

    x_n = (x - min) * 2 / range - 1,   range = max(max - min, eps)

A constant dimension maps to -1 and back to its value exactly. The statistics are
buffers, so they live in the policy's state_dict and a checkpoint alone can act.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

EPS = 1e-4


class MinMaxNormalizer(nn.Module):
    """Per-key, per-dimension min-max scaling. ``dims`` maps key -> D."""

    def __init__(self, dims: dict[str, int]):
        super().__init__()
        self.dims = dict(dims)
        for key, d in self.dims.items():
            self.register_buffer(f"{key}__min", torch.zeros(d))
            self.register_buffer(f"{key}__scale", torch.ones(d))

    @classmethod
    def fit(cls, arrays: dict[str, np.ndarray | list[np.ndarray]], point_channels: int = 3) -> "MinMaxNormalizer":
        """``arrays[key]`` is (..., D), or a list of such parts (read one at a time);
        for point_cloud the first ``point_channels`` channels count (3: xyz, 6: xyz + rgb)."""
        if point_channels not in (3, 6):
            raise ValueError(f"point_channels must be 3 or 6, got {point_channels}")
        stats = {}
        for key, parts in arrays.items():
            lo = hi = None
            for a in parts if isinstance(parts, list) else [parts]:
                a = np.asarray(a)
                if key == "point_cloud":
                    if a.shape[-1] < point_channels:
                        raise ValueError(f"point_cloud has {a.shape[-1]} channels; {point_channels} asked for")
                    a = a[..., :point_channels]
                flat = a.reshape(-1, a.shape[-1])
                if flat.shape[0] == 0:
                    continue
                mn, mx = flat.min(0).astype(np.float64), flat.max(0).astype(np.float64)
                lo = mn if lo is None else np.minimum(lo, mn)
                hi = mx if hi is None else np.maximum(hi, mx)
            if lo is None:
                raise ValueError(f"no data to fit the normaliser for '{key}'")
            stats[key] = (lo, hi)
        norm = cls({k: len(lo) for k, (lo, _) in stats.items()})
        for key, (lo, hi) in stats.items():
            getattr(norm, f"{key}__min").copy_(torch.as_tensor(lo, dtype=torch.float32))
            getattr(norm, f"{key}__scale").copy_(torch.as_tensor(2.0 / np.maximum(hi - lo, EPS), dtype=torch.float32))
        return norm

    def _stats(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in self.dims:
            raise KeyError(f"the normaliser has no statistics for '{key}' (it has {sorted(self.dims)})")
        return getattr(self, f"{key}__min"), getattr(self, f"{key}__scale")

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        lo, scale = self._stats(key)
        d = lo.shape[0]
        if key == "point_cloud" and x.shape[-1] > d:
            return torch.cat([(x[..., :d] - lo) * scale - 1.0, x[..., d:]], dim=-1)
        return (x - lo) * scale - 1.0

    def unnormalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        lo, scale = self._stats(key)
        d = lo.shape[0]
        if key == "point_cloud" and x.shape[-1] > d:
            return torch.cat([(x[..., :d] + 1.0) / scale + lo, x[..., d:]], dim=-1)
        return (x + 1.0) / scale + lo
