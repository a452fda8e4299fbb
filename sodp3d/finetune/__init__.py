"""Task-guided fine-tuning: PPO over the denoising chain plus a behaviour-cloning regulariser.

    rollouts.py       episodes in parallel envs; each chunk's chain, log-probs and reward
    buffer.py         the target buffer of proficient trajectories (BC's data)
    regularisers.py   bc | none | kl | pl, a registry chosen by reg=
    advantages.py     the PPO weights: chunk reward (the paper) | GAE (DPPO); reward-signal R^2
    critic.py         V(obs) behind GAE
    epochs.py         which chunks each gradient step reads: p_step draws | PPO epochs
    ppo.py            the PPO update, top to bottom, with every diagnostic
    command.py        ``sodp3d finetune``: tasks, evaluations, checkpoints, the record
"""

from .command import render, run

__all__ = ["run", "render"]
