"""How much one fine-tuning update moves a pre-trained policy, across settings.

Collects rollouts of the checkpoint's policy on one task once, then, from the same
starting weights and the same rollouts, runs one update per setting and measures on the
whole collected batch what the update did: approx KL and clip fraction of the new
log-probs against the old ones (overall and per denoising step), the update's own
minibatch diagnostics and each loss term's gradient norm, and what share of the chunk
rewards' variance the chunk's position and its observation explain.

    .venv/bin/python scripts/probe_update.py --ckpt RUN --task basketball-v3 \
        --grid lr=1e-5,3e-5,1e-4,3e-4,1e-3 p_step=2,10,30 --base reg=bc

Each --grid key varies alone around --base (algo keys, dotted for nested ones such as
critic.features=policy,own; `algo=cpu` is the starting point).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--task", required=True)
    ap.add_argument("--num-envs", type=int, default=8)
    ap.add_argument("--rollouts", type=int, default=1, help="rollouts of num_envs episodes collected once")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base", nargs="*", default=[], help="algo overrides every setting shares, key=value")
    ap.add_argument("--grid", nargs="*", default=["lr=1e-5,3e-5,1e-4,3e-4,1e-3"],
                    help="key=v1,v2,...: each value of each key alone, around --base")
    ap.add_argument("--env", nargs="*", default=[],
                    help="env overrides over the checkpoint's own observation settings, e.g. env.metaworld.episode_length=200")
    args = ap.parse_args()

    from omegaconf import OmegaConf, open_dict

    from sodp3d.checkpoint import acting_env_config, checkpoint_path, load_checkpoint, policy_from_payload
    from sodp3d.config import compose
    from sodp3d.envs import make_vector_env
    from sodp3d.finetune.ppo import FineTuner
    from sodp3d.finetune.rollouts import Rollout, collect_rollout

    torch.manual_seed(args.seed)
    cfg = compose("finetune", ["algo=cpu", f"ckpt={args.ckpt}", f"task={args.task}", "out=unused", *args.env])
    for kv in args.base:
        key, value = kv.split("=", 1)
        OmegaConf.update(cfg.algo, key, _value(value), merge=False)
    payload = load_checkpoint(checkpoint_path(args.ckpt))
    pretrained = policy_from_payload(payload, "cpu")
    with open_dict(cfg):
        cfg.env = acting_env_config(cfg.env, payload)
    pc = pretrained.config
    vec = make_vector_env(args.task, args.num_envs, cfg.env, mode="auto",
                          n_obs_steps=pc.n_obs_steps, n_action_steps=pc.n_action_steps)
    base = FineTuner(copy.deepcopy(pretrained), cfg.algo, torch.device("cpu"), args.seed)
    t0 = time.perf_counter()
    parts = [collect_rollout(base.policy, vec, base.sampler, [args.seed * 1000 + r * args.num_envs + e
                                                               for e in range(args.num_envs)], base.torch_gen)
             for r in range(args.rollouts)]
    vec.close()
    ro = Rollout(obs={k: torch.cat([p.obs[k] for p in parts]) for k in parts[0].obs},
                 chains=torch.cat([p.chains for p in parts]), old_logp=torch.cat([p.old_logp for p in parts]),
                 reward=torch.cat([p.reward for p in parts]), trajectories=[t for p in parts for t in p.trajectories],
                 executed=torch.cat([p.executed for p in parts]))
    wins = np.mean([t.success for t in ro.trajectories])
    print(f"collected {len(ro.trajectories)} episodes ({ro.size} chunks, success {wins:.0%}) in "
          f"{time.perf_counter() - t0:.0f} s\n")

    settings = [("base", {})]
    for item in args.grid:
        key, values = item.split("=", 1)
        for v in values.split(","):
            settings.append((f"{key}={v}", {key: _value(v)}))
    cols = ["setting", "grad steps", "KL after (batch)", "clip frac after", "KL per step (first .. last)",
            "mean minibatch KL", "|g| L_Imp", "|g| L_reg", "value EV", "R2 pos", "R2 obs", "s"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for name, over in settings:
        algo = OmegaConf.merge(cfg.algo, {"grad_terms": True})
        for key, value in over.items():  # dotted keys reach nested settings: critic.features=own
            OmegaConf.update(algo, key, value, merge=False)
        ft = FineTuner(copy.deepcopy(pretrained), algo, torch.device("cpu"), args.seed)
        ft.buffer.add(ro.trajectories)
        t1 = time.perf_counter()
        if ft.critic is not None:  # let the critic see the batch first, as its warm-up would
            for _ in range(int(algo.critic.warmup_updates)):
                ft.update(ro)
        stats = ft.update(ro)
        sec = time.perf_counter() - t1
        F = ft.policy.config.frozen_steps
        with torch.no_grad():
            ft.policy.eval()
            new = torch.cat([ft.policy.chain_log_prob(ft.policy.condition({k: v[i:i + 256] for k, v in ro.obs.items()}),
                                                      ro.chains[i:i + 256], ft.sampler) for i in range(0, ro.size, 256)])
        log_ratio = new - ro.old_logp[:, F:]
        ratio = log_ratio.exp()
        kl = ((ratio - 1) - log_ratio)
        per_step = kl.mean(0).tolist()
        clip_frac = float(((ratio - 1).abs() > float(algo.clip)).float().mean())
        print(f"| {name} | {stats['gradient_steps']} | {float(kl.mean()):.2e} | {clip_frac:.1%} | "
              f"{per_step[0]:.1e} .. {per_step[-1]:.1e} | {stats['approx_kl']:.1e} | "
              f"{stats.get('grad_norm_imp', 0):.3f} | {stats.get('grad_norm_reg', 0):.3f} | "
              f"{stats.get('value_explained_variance', float('nan')):.2f} | {stats.get('reward_r2_position', float('nan')):.2f} | "
              f"{stats.get('reward_r2_obs', float('nan')):.2f} | {sec:.0f} |", flush=True)


def _value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"null": None, "true": True, "false": False}.get(v, v)


if __name__ == "__main__":
    main()
