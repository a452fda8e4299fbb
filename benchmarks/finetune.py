"""Fine-tuning throughput: environment steps/s of collection (and of collection plus the
PPO update) against bare environment-plus-render steps/s, measured in the same run.

    python benchmarks/finetune.py [--task reach-v3] [--num-envs 8] [--episode-length 100] [--rounds 2]

bare        one Meta-World env (no point-cloud wrapper) stepping with random actions and a
            depth render (mujoco.Renderer at the task's camera(s) and resolution) on every
            step: the cost of simply running the simulator with a camera.
collect     finetune.collect: one episode in each of E asynchronous envs (To=2, Ta=8,
            point clouds), a tiny DP3 policy sampling every chunk with DDIM (S=10, eta=1)
            and keeping the chains and log-probs.
+ update    the same plus FineTuner.update on that rollout (p_step=1 per episode, so E
            gradient steps, batch 64 (chunk, denoising step) pairs, the BC regulariser).
Ratio = fine-tuning env steps/s / bare env steps/s; target >= 0.5 (CPU, tiny policy, 8 envs).
The bare baseline runs before every round, so both see the same machine load.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

os.environ.setdefault("MUJOCO_GL", "egl")

import mujoco  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from sodp3d.encoders import ENCODERS  # noqa: E402
from sodp3d.envs import default_env_config, make_env, make_vector_env, suite_of, task_settings  # noqa: E402
from sodp3d.finetune.ppo import FineTuner  # noqa: E402
from sodp3d.finetune.rollouts import collect_rollout  # noqa: E402
from sodp3d.normalizer import MinMaxNormalizer  # noqa: E402
from sodp3d.policy import DiffusionPolicy, PolicyConfig  # noqa: E402

Tp, To, Ta = 12, 2, 8
TARGET = 0.5


def env_config(task: str, episode_length: int):
    cfg = default_env_config()
    OmegaConf.update(cfg, f"{suite_of(task)}.episode_length", int(episode_length), merge=True)
    return cfg


class Bare:
    """One env without the point-cloud wrapper, a depth render of each task camera per step."""

    def __init__(self, task: str, env_cfg, seed: int = 0):
        self.settings = s = task_settings(task, env_cfg)
        self.env = make_env(task, env_cfg, point_cloud=False)
        self.env.reset(seed=seed)
        base = self.env.unwrapped
        self.model, self.data = base.model, base.data
        self.model.vis.global_.offwidth = max(self.model.vis.global_.offwidth, s.width)
        self.model.vis.global_.offheight = max(self.model.vis.global_.offheight, s.height)
        self.renderer = mujoco.Renderer(self.model, s.height, s.width)
        self.renderer.enable_depth_rendering()
        self.rng = np.random.default_rng(seed)
        self.step(5)  # warm-up (first render)

    def step(self, n: int) -> float:
        """Run n steps; returns the seconds they took."""
        space = self.env.action_space
        t0 = time.perf_counter()
        for _ in range(n):
            _, _, terminated, truncated, _ = self.env.step(self.rng.uniform(space.low, space.high).astype(np.float32))
            for cam in self.settings.cameras:
                self.renderer.update_scene(self.data, camera=cam)
                self.renderer.render()
            if terminated or truncated:
                self.env.reset()
        return time.perf_counter() - t0

    def close(self) -> None:
        self.renderer.close()
        self.env.close()


def tiny_policy(bare: Bare, preset: str) -> DiffusionPolicy:
    """A DP3 policy with the env's shapes and a normaliser fitted on random arrays of those shapes."""
    s = bare.settings
    spaces = bare.env.observation_space.spaces
    da = int(bare.env.action_space.shape[0])
    meta = {"point_cloud": [s.num_points, s.channels], "agent_pos": list(spaces["agent_pos"].shape),
            "state": list(spaces["state"].shape), "action": [da]}
    rng = np.random.default_rng(0)
    arrays = {
        "point_cloud": rng.uniform(-0.7, 0.7, (4, s.num_points, 3)).astype(np.float32),
        "agent_pos": rng.uniform(-1, 1, (64,) + tuple(meta["agent_pos"])).astype(np.float32),
        "state": rng.uniform(-1, 1, (64,) + tuple(meta["state"])).astype(np.float32),
        "action": rng.uniform(-1, 1, (64, da)).astype(np.float32),
    }
    # the normaliser holds the keys the encoder reads (dp3: point_cloud, agent_pos) and the action
    keys = set(ENCODERS["dp3"].keys) | {"action"}
    norm = MinMaxNormalizer.fit({k: v for k, v in arrays.items() if k in keys})
    torch.manual_seed(0)
    config = PolicyConfig(shape_meta=meta, horizon=Tp, n_obs_steps=To, n_action_steps=Ta, encoder="dp3", unet=preset)
    return DiffusionPolicy(config, norm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="reach-v3")
    parser.add_argument("--num-envs", type=int, default=8)
    parser.add_argument("--episode-length", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2, help="collect(+update) rounds, one episode per env each")
    parser.add_argument("--bare-steps", type=int, default=300, help="bare env steps measured before each round")
    parser.add_argument("--preset", default="tiny", help="U-Net preset")
    parser.add_argument("--reg", default="bc")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in the main process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    E = args.num_envs
    env_cfg = env_config(args.task, args.episode_length)

    bare = Bare(args.task, env_cfg)
    try:
        rows, policy, ft, startup = run(args, bare, env_cfg, E)
    finally:
        bare.close()
    report(args, bare, rows, policy, ft, startup, E)


def run(args, bare: Bare, env_cfg, E: int):
    """The timed rounds: (rows, policy, fine-tuner, vector-env start-up seconds)."""
    policy = tiny_policy(bare, args.preset)
    algo = dict(reg=args.reg, reg_weight=1.0, p_step=1, batch_size=64, bc_batch_size=64, lr=1e-5, lr_decay=0.999,
                clip=0.01, normalize_reward=True, eta=1.0, min_std=0.1, grad_clip=1.0, n_init=0, buffer_capacity=50,
                top_n=10)
    ft = FineTuner(policy, algo, torch.device("cpu"), seed=0)
    # the same update without a regulariser, on a copy, to show what the regulariser costs
    ft_none = FineTuner(copy.deepcopy(policy), {**algo, "reg": "none"}, torch.device("cpu"), seed=0)

    t0 = time.perf_counter()
    vec = make_vector_env(args.task, E, env_cfg, asynchronous=E > 1, n_obs_steps=To, n_action_steps=Ta)
    rows = []
    try:
        vec.reset(seed=list(range(E)))  # the workers are up (spawned, GL contexts made) before timing
        startup = time.perf_counter() - t0
        for r in range(args.rounds):
            bare_s = bare.step(args.bare_steps)
            ro = collect_rollout(ft.policy, vec, ft.sampler, [1000 * (r + 1) + j for j in range(E)], ft.torch_gen)
            ft.buffer.add(ro.trajectories)
            t_upd = time.perf_counter()
            stats = ft.update(ro)
            upd_s = time.perf_counter() - t_upd
            t_upd = time.perf_counter()
            ft_none.update(ro)
            none_s = time.perf_counter() - t_upd
            rows.append({"bare_steps": args.bare_steps, "bare_s": bare_s, "steps": ro.env_steps, "chunks": ro.size,
                         "collect_s": ro.seconds, "update_s": upd_s, "none_s": none_s,
                         "grad_steps": stats["gradient_steps"]})
            print(f"round {r}: bare {args.bare_steps / bare_s:.0f} steps/s; collect {ro.env_steps} steps "
                  f"({ro.size} chunks) in {ro.seconds:.2f} s; update {stats['gradient_steps']} gradient steps "
                  f"in {upd_s:.2f} s (reg=none: {none_s:.2f} s)", flush=True)
    finally:
        vec.close()
    return rows, policy, ft, startup


def report(args, bare: Bare, rows: list[dict], policy: DiffusionPolicy, ft: FineTuner, startup: float, E: int) -> None:
    bare_sps = sum(x["bare_steps"] for x in rows) / sum(x["bare_s"] for x in rows)
    steps = sum(x["steps"] for x in rows)
    coll_sps = steps / sum(x["collect_s"] for x in rows)
    full_sps = steps / sum(x["collect_s"] + x["update_s"] for x in rows)
    none_sps = steps / sum(x["collect_s"] + x["none_s"] for x in rows)
    s = bare.settings
    n_params = sum(p.numel() for p in policy.parameters())
    print(f"\nFine-tuning throughput, {args.task}: {E} async envs, episode length {args.episode_length}, "
          f"To={To} Ta={Ta} Tp={Tp}, DDIM S={ft.sampler.num_steps} eta=1, '{args.preset}' U-Net + DP3 encoder "
          f"({n_params / 1e6:.2f}M params), reg={args.reg}; camera {', '.join(s.cameras)} {s.height}x{s.width}, "
          f"{s.num_points} points; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"{args.rounds} rounds, {steps} env steps; vector env start-up {startup:.1f} s (not timed).\n")
    print("| measure | env steps/s | ratio vs bare |")
    print("|---|---:|---:|")
    print(f"| bare: 1 env, step + depth render every step | {bare_sps:.0f} | 1.00 |")
    print(f"| (a) fine-tuning collection ({E} envs) | {coll_sps:.0f} | **{coll_sps / bare_sps:.2f}** |")
    print(f"| (b) collection + update (p_step=1, batch 64, {rows[-1]['grad_steps']} gradient steps) "
          f"| {full_sps:.0f} | **{full_sps / bare_sps:.2f}** |")
    if args.reg != "none":
        print(f"| (b) without the regulariser (reg=none), for comparison | {none_sps:.0f} "
              f"| {none_sps / bare_sps:.2f} |")
    g = max(rows[-1]["grad_steps"], 1)
    upd = sum(x["update_s"] for x in rows) / len(rows)
    upd_none = sum(x["none_s"] for x in rows) / len(rows)
    print(f"\nupdate: {upd:.2f} s per round, {upd / g * 1e3:.0f} ms per gradient step with reg={args.reg} "
          f"(bc_batch_size {ft.bc_batch_size}), {upd_none / g * 1e3:.0f} ms with reg=none")
    worst = full_sps / bare_sps
    print(f"ratio (b) {worst:.2f}: {'meets' if worst >= TARGET else 'misses'} the >= {TARGET} target")


if __name__ == "__main__":
    main()
