"""Min-max normalisation to [-1, 1], fitted on the data and saved with the model.

Shapes: D feature dim of a key; for ``point_cloud`` only xyz (3) is normalised, colour
channels (in [0, 1]) pass through.

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
    def fit(cls, arrays: dict[str, np.ndarray | list[np.ndarray]]) -> "MinMaxNormalizer":
        """``arrays[key]`` is (..., D), or a list of such parts (read one at a time);
        for point_cloud only the first 3 channels count."""
        stats = {}
        for key, parts in arrays.items():
            lo = hi = None
            for a in parts if isinstance(parts, list) else [parts]:
                a = np.asarray(a)
                if key == "point_cloud":
                    a = a[..., :3]
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
        if key == "point_cloud" and x.shape[-1] > 3:
            return torch.cat([(x[..., :3] - lo) * scale - 1.0, x[..., 3:]], dim=-1)
        return (x - lo) * scale - 1.0

    def unnormalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        lo, scale = self._stats(key)
        if key == "point_cloud" and x.shape[-1] > 3:
            return torch.cat([(x[..., :3] + 1.0) / scale + lo, x[..., 3:]], dim=-1)
        return (x + 1.0) / scale + lo
