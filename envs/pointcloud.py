"""Point-cloud post-processing: crop to a workspace box, sample a fixed number of points.

Shapes: M points in, N points out, C channels (3 for xyz, 6 with RGB).

Sampling:
  * ``fps``: farthest point sampling on xyz (fpsample's bucket QuickFPS: exact FPS;
    its start point is chosen from the cloud itself, so the same cloud always gives
    the same points).
  * ``uniform``: a uniform random subset, drawn with the given generator.
Padding when fewer than N points survive the crop: the surviving points are repeated
cyclically (0, 1, ..., M-1, 0, 1, ...) up to N, so the cloud keeps its shape and no
invented coordinates appear; each padded observation is counted. An empty crop is an
error, because no repetition can fill it.
"""

from __future__ import annotations

from dataclasses import dataclass

import fpsample
import numpy as np

SAMPLING_METHODS = ("fps", "uniform")


@dataclass(frozen=True)
class CropBox:
    """Axis-aligned box in world coordinates; +-inf leaves a side open (Adroit: floor only)."""

    low: tuple[float, float, float]
    high: tuple[float, float, float]

    def __post_init__(self):
        if len(self.low) != 3 or len(self.high) != 3:
            raise ValueError(f"crop box needs 3 lows and 3 highs, got {self.low} / {self.high}")
        if any(lo >= hi for lo, hi in zip(self.low, self.high)):
            raise ValueError(f"crop box is empty: low {list(self.low)} is not below high {list(self.high)}")

    def mask(self, xyz: np.ndarray) -> np.ndarray:
        low = np.asarray(self.low, dtype=xyz.dtype)
        high = np.asarray(self.high, dtype=xyz.dtype)
        return np.all((xyz >= low) & (xyz <= high), axis=1)

    def as_list(self) -> list[list[float | None]]:
        """[[low], [high]] with None for an open side (plain JSON has no infinity)."""
        return [[float(v) if np.isfinite(v) else None for v in side] for side in (self.low, self.high)]


def crop(points: np.ndarray, box: CropBox | None) -> np.ndarray:
    """Keep the points (M, C) whose xyz lies in ``box``."""
    if box is None:
        return points
    return points[box.mask(points[:, :3])]


def sample(points: np.ndarray, n: int, method: str = "fps", rng: np.random.Generator | None = None) -> tuple[np.ndarray, bool]:
    """Select exactly ``n`` points from (M, C); returns (points (n, C), padded?)."""
    m = points.shape[0]
    if m == 0:
        raise ValueError("no points to sample from")
    if m <= n:
        if m == n:
            return points, False
        return points[np.arange(n) % m], True
    if method == "fps":
        xyz = np.ascontiguousarray(points[:, :3], dtype=np.float32)
        height = 3 if m < 2048 else 5  # bucket size 2**h, as QuickFPS suggests
        idx = fpsample.bucket_fps_kdline_sampling(xyz, n, h=height, start_idx=0)
    elif method == "uniform":
        rng = rng if rng is not None else np.random.default_rng(0)
        idx = np.sort(rng.choice(m, size=n, replace=False))
    else:
        raise ValueError(f"unknown sampling method '{method}'; valid: {', '.join(SAMPLING_METHODS)}")
    return points[idx], False
