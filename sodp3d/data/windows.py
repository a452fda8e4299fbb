"""Training windows from episode datasets: To observations and Tp actions per sample.

Shapes: B batch, To observed steps, Tp predicted steps (the horizon), N points, C
channels, Dp / Ds / Da agent_pos / state / action dims.

A window starts at step s of an episode [e0, e1) and covers steps s .. s+Tp-1. Starts
run from e0 - (To - 1) to e1 - Tp + (Ta - 1), as DP3's sampler, and steps outside the
episode repeat its first or last step (edge padding); that is the same as clipping
each step's index into [e0, e1 - 1], so a whole batch is one vectorised gather.
Observations are the first To steps of the window; actions all Tp.

Windows are float32, except ``image``: uint8 (H, W, C), as stored; the image encoder
scales it. Only observation keys the encoder reads and ``action`` are loaded:
pre-training never touches rewards, task names or success flags. The arrays are held in memory when they
fit (under ``memory_fraction`` of the available RAM) and read from zarr otherwise. A NaN
or infinite value in them is refused on opening, with a UserError naming the array, the
episode and the step (otherwise training would start and diverge at its first step).
"""

from __future__ import annotations

import copy

from collections.abc import Sequence
from typing import Any

import numpy as np

from sodp3d.data.store import EpisodeDataset
from sodp3d.errors import UserError


def _available_memory() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover
        return 8 << 30


def _take(array: Any, index: np.ndarray) -> np.ndarray:
    """array[index] for numpy or zarr arrays (index of any shape, into axis 0)."""
    if isinstance(array, np.ndarray):
        return array[index]
    unique, inverse = np.unique(index, return_inverse=True)
    rows = np.asarray(array.oindex[unique])
    return rows[inverse.reshape(index.shape)]


def _dtype(key: str) -> type:
    """Windows are float32, except images: uint8, turned into floats by the image encoder."""
    return np.uint8 if key == "image" else np.float32


def _itemsize(key: str) -> int:
    return np.dtype(_dtype(key)).itemsize


def _suite(data: EpisodeDataset) -> str:
    suites = {t.get("suite") for t in (data.attrs.get("tasks") or {}).values() if isinstance(t, dict)}
    return suites.pop() if len(suites) == 1 and None not in suites else "<suite>"


class WindowDataset:
    """Windows over the union of one or more datasets."""

    def __init__(
        self,
        paths: Sequence[str],
        obs_keys: Sequence[str],
        horizon: int,
        n_obs_steps: int,
        n_action_steps: int,
        memory_fraction: float = 0.5,
    ):
        if not paths:
            raise UserError("no dataset given; pass data=<path.zarr>[,<path.zarr>...]")
        self.obs_keys = list(obs_keys)
        self.horizon, self.n_obs_steps, self.n_action_steps = int(horizon), int(n_obs_steps), int(n_action_steps)
        keys = self.obs_keys + ["action"]
        self.sources: list[dict[str, Any]] = []
        shapes: dict[str, tuple] | None = None
        for path in paths:
            data = EpisodeDataset(path)
            missing = [k for k in keys if k not in data.keys]
            if "image" in missing:
                raise UserError(f"{path} has no 'image' observations; record them with "
                                f"`sodp3d collect ... env.{_suite(data)}.image=rgb` (or rgbd)")
            if "point_cloud" in missing and "point_cloud" not in data.attrs.get("observations", ["point_cloud"]):
                raise UserError(f"{path} holds no point_cloud, which this policy's encoder reads: it was collected "
                                f"without a camera (env.{_suite(data)}.point_cloud=false); pre-train encoder=state on it, "
                                "or collect with point_cloud=true")
            if missing:
                raise UserError(f"{path} lacks {', '.join(missing)}, which this policy needs; it has: {', '.join(data.keys)}")
            if data.n_episodes == 0:
                raise UserError(f"{path} holds no episodes")
            arrays = {k: data.array(k) for k in keys}
            these = {k: tuple(arrays[k].shape[1:]) for k in keys}
            if shapes is None:
                shapes = these
            elif these != shapes:
                diff = ", ".join(f"{k} {shapes[k]} vs {these[k]}" for k in keys if these[k] != shapes[k])
                raise UserError(f"datasets differ in per-step shapes ({diff}): {paths[0]} and {path} cannot be mixed")
            self.sources.append({"path": str(path), "data": data, "arrays": arrays})
        self.shapes: dict[str, tuple] = shapes or {}
        need = sum(int(np.prod(s["arrays"][k].shape[1:])) * _itemsize(k) * s["data"].n_steps
                   for s in self.sources for k in keys)
        self.in_memory = need <= memory_fraction * _available_memory()
        for s in self.sources:
            n = s["data"].n_steps
            if self.in_memory:
                s["arrays"] = {k: np.asarray(a[:n], dtype=_dtype(k)) for k, a in s["arrays"].items()}
            for k, a in s["arrays"].items():  # a NaN would only show as a nan loss at step 0
                s["data"].refuse_non_finite(k, a)
        self._build_index()

    def _build_index(self) -> None:
        To, Tp, Ta = self.n_obs_steps, self.horizon, self.n_action_steps
        rows = []
        for src_id, s in enumerate(self.sources):
            ends = s["data"].episode_ends
            starts = np.concatenate([[0], ends[:-1]])
            for e0, e1 in zip(starts, ends):
                first, last = e0 - (To - 1), e1 - Tp + (Ta - 1)
                last = max(last, first)  # an episode shorter than the window still gives one
                w = np.arange(first, last + 1)
                rows.append(np.stack([np.full_like(w, src_id), w, np.full_like(w, e0), np.full_like(w, e1)], axis=1))
        self.index = np.concatenate(rows).astype(np.int64)

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def subset(self, windows: np.ndarray) -> "WindowDataset":
        """A view of the same arrays holding only ``windows`` (positions in the index): one
        side of a train / validation split."""
        view = copy.copy(self)
        view.index = self.index[np.asarray(windows, dtype=np.int64)]
        return view

    @property
    def n_steps(self) -> int:
        return sum(s["data"].n_steps for s in self.sources)

    def arrays_for_fit(self) -> dict[str, list]:
        """What the normaliser is fitted on: every step of every dataset, per key a list of
        parts of at most ``chunk`` steps (so nothing large is copied)."""
        chunk = 20_000
        out: dict[str, list] = {}
        for k in self.obs_keys + ["action"]:
            out[k] = [
                s["arrays"][k][i : min(i + chunk, s["data"].n_steps)]
                for s in self.sources
                for i in range(0, s["data"].n_steps, chunk)
            ]
        return out

    def get(self, windows: np.ndarray) -> dict[str, Any]:
        """Windows by position in the index: {'obs': {k: (B, To, ...)}, 'action': (B, Tp, Da)}."""
        rows = self.index[np.asarray(windows)]
        steps = np.arange(self.horizon)
        out_obs: dict[str, list] = {k: [] for k in self.obs_keys}
        actions, order = [], []
        for src_id in np.unique(rows[:, 0]):
            sel = np.nonzero(rows[:, 0] == src_id)[0]
            r = rows[sel]
            idx = np.clip(r[:, 1:2] + steps[None], r[:, 2:3], r[:, 3:4] - 1)
            arrays = self.sources[src_id]["arrays"]
            for k in self.obs_keys:
                out_obs[k].append(_take(arrays[k], idx[:, : self.n_obs_steps]))
            actions.append(_take(arrays["action"], idx))
            order.append(sel)
        inverse = np.argsort(np.concatenate(order))
        return {
            "obs": {k: np.concatenate(v)[inverse].astype(_dtype(k)) for k, v in out_obs.items()},
            "action": np.concatenate(actions)[inverse].astype(np.float32),
        }

    def sample(self, batch_size: int, rng: np.random.Generator) -> dict[str, Any]:
        return self.get(rng.integers(0, len(self), size=batch_size))
