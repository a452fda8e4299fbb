"""Which collected chunks each gradient step of an update reads.

Two regimes, chosen by ``algo.update_epochs``:

    null     the paper's: p_step gradient steps per collected episode, each on a fresh
             random draw of chunks (without replacement within the draw);
    n >= 1   PPO's: n epochs over the collected batch, each a fresh permutation of the
             chunks cut into minibatches (the last one shorter), so every chunk is read
             exactly n times. ``algo.target_kl`` can stop the epochs early (the update
             checks it after every minibatch).

A minibatch holds whole chunks, each with all of its S' trained denoising steps, so
``batch_size`` (chunk, denoising step) pairs are batch_size // S' chunks.

Shapes: M collected chunks, B chunks per minibatch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from sodp3d.errors import UserError


def check_epochs(update_epochs, target_kl) -> None:
    if update_epochs is not None and (isinstance(update_epochs, bool) or not isinstance(update_epochs, int)
                                      or update_epochs < 1):
        raise UserError(f"algo.update_epochs must be a positive integer (PPO's epochs over each collected batch) "
                        f"or null (the paper's p_step draws), got {update_epochs!r}")
    if target_kl is not None and (isinstance(target_kl, bool) or not isinstance(target_kl, (int, float))
                                  or not target_kl > 0):
        raise UserError(f"algo.target_kl must be a positive number (stop an update's epochs past this approx KL) "
                        f"or null (off), got {target_kl!r}")


def minibatches(size: int, chunks_per_batch: int, rng: np.random.Generator, *, p_steps: int | None = None,
                epochs: int | None = None) -> Iterator[torch.Tensor]:
    """(B,) index tensors into the M = ``size`` chunks: ``p_steps`` random draws, or
    ``epochs`` passes of shuffled minibatches (exactly one of the two)."""
    B = max(1, min(chunks_per_batch, size))
    if epochs is None:
        for _ in range(int(p_steps or 0)):
            yield torch.as_tensor(rng.choice(size, size=B, replace=False))
        return
    for _ in range(int(epochs)):
        order = rng.permutation(size)
        for i in range(0, size, B):
            yield torch.as_tensor(order[i:i + B])


def steps_per_update(size: int, chunks_per_batch: int, *, p_steps: int | None = None, epochs: int | None = None) -> int:
    """How many gradient steps ``minibatches`` yields (before any early stop)."""
    if epochs is None:
        return int(p_steps or 0)
    B = max(1, min(chunks_per_batch, size))
    return int(epochs) * -(-size // B)
