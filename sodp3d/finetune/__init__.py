"""Task-guided fine-tuning: PPO over the denoising chain plus a behaviour-cloning regulariser
(method=ppo, the paper's), or SAC in the frozen planner's noise space (method=noise-sac).

    rollouts.py       episodes in parallel envs; each chunk's chain, log-probs and reward
    buffer.py         the target buffer of proficient trajectories (BC's data)
    regularisers.py   bc | none | kl | pl, a registry chosen by reg=
    advantages.py     the PPO weights: chunk reward (the paper) | GAE (DPPO); reward-signal R^2
    critic.py         V(obs) behind GAE
    epochs.py         which chunks each gradient step reads: p_step draws | PPO epochs
    ppo.py            the PPO update, top to bottom, with every diagnostic
    evaluations.py    the evaluations a run records (initial, periodic, final) and the task's summary
    noise_sac.py      method=noise-sac: SAC in the frozen planner's noise space (DSRL)
    steering.py       the planner steered by a noise policy: how a noise-sac checkpoint acts
    command.py        ``sodp3d finetune``: methods, tasks, checkpoints, the record
"""

from .command import help_text, render, run

__all__ = ["run", "render", "help_text"]
