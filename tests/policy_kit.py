"""Shared pieces of the policy-stack tests: shapes, a tiny config, random observations and
a normaliser with a known action range. Not a test file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sodp3d.data.store import EpisodeWriter
from sodp3d.normalizer import MinMaxNormalizer
from sodp3d.policy import DiffusionPolicy, PolicyConfig

SHAPE_META = {"point_cloud": [32, 3], "agent_pos": [9], "state": [39], "image": [48, 48, 3], "action": [4]}
Tp, To, Ta, Da = 12, 2, 8, 4


def make_config(**overrides) -> PolicyConfig:
    kwargs = dict(shape_meta={k: list(v) for k, v in SHAPE_META.items()}, horizon=Tp, n_obs_steps=To,
                  n_action_steps=Ta, encoder="dp3", unet="tiny")
    kwargs.update(overrides)
    return PolicyConfig(**kwargs)


def random_obs(batch: int, gen: torch.Generator, n_obs: int = To, points: int = 32) -> dict[str, torch.Tensor]:
    return {
        "point_cloud": torch.rand(batch, n_obs, points, 3, generator=gen) * 2 - 0.5,
        "agent_pos": torch.randn(batch, n_obs, 9, generator=gen),
        "state": torch.randn(batch, n_obs, 39, generator=gen),
        "image": torch.randint(0, 256, (batch, n_obs, 48, 48, 3), generator=gen, dtype=torch.uint8),
    }


def fitted_normalizer(seed: int = 0) -> tuple[MinMaxNormalizer, np.ndarray, np.ndarray]:
    """A normaliser fitted on random data whose action range is known: (norm, lo, hi)."""
    rng = np.random.default_rng(seed)
    lo = np.array([-3.0, 0.5, 10.0, -0.2], dtype=np.float32)
    hi = np.array([5.0, 0.7, 20.0, 0.2], dtype=np.float32)
    actions = rng.uniform(lo, hi, size=(200, Da)).astype(np.float32)
    actions[0], actions[1] = lo, hi
    norm = MinMaxNormalizer.fit({
        "action": actions,
        "point_cloud": rng.uniform(-1, 1, size=(20, 32, 3)).astype(np.float32),
        "agent_pos": rng.normal(size=(200, 9)).astype(np.float32),
        "state": rng.normal(size=(200, 39)).astype(np.float32),
    })
    return norm, lo, hi


def policy_normalizer(policy: DiffusionPolicy, norm: MinMaxNormalizer) -> MinMaxNormalizer:
    """``norm`` restricted to the keys this policy normalises."""
    sub = MinMaxNormalizer({k: norm.dims[k] for k in policy.normalizer.dims})
    state = {k: v for k, v in norm.state_dict().items() if k.split("__")[0] in sub.dims}
    sub.load_state_dict(state, strict=True)
    return sub


EPISODE_LENGTHS = (5, 9)


def write_dataset(path: Path, lengths=EPISODE_LENGTHS, action_dim: int = 2, keys=None, offset: int = 0) -> Path:
    """Episodes whose every per-step value encodes the global step index t (+ offset):
    agent_pos = [t, -t], point_cloud = t everywhere, state = t, action = t * [1, 10, ...]."""
    writer = EpisodeWriter.create(path, attrs={"source": "test"})
    start = 0
    for e, n in enumerate(lengths):
        t = np.arange(start, start + n, dtype=np.float32) + offset
        episode = {
            "point_cloud": np.broadcast_to(t[:, None, None], (n, 16, 3)).copy(),
            "agent_pos": np.stack([t, -t], axis=1),
            "state": np.broadcast_to(t[:, None], (n, 3)).copy(),
            "action": t[:, None] * (10.0 ** np.arange(action_dim, dtype=np.float32))[None],
            "reward": np.ones(n, np.float32),
            "success": np.zeros(n, bool),
        }
        if keys is not None:
            episode = {k: v for k, v in episode.items() if k in keys}
        writer.append_episode(episode, task=f"task{e}", info={"success": False})
        start += n
    return path
