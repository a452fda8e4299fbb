"""Fine-tuning throughput at the demo's settings: environment steps/s of the fine-tuning
loop against two bare baselines measured in the same run.

    python benchmarks/finetune.py [--task button-press-topdown-v3] [--rounds 3] [--preset tiny]
                                  [--reg bc] [--device cpu] [--profile N] [override ...]
    python benchmarks/finetune.py --state [--envs 8 32 64]      # no camera: layouts, the loop at mt10-state's setting
    python benchmarks/finetune.py --method noise-sac            # SAC in the planner's noise space
    python benchmarks/finetune.py --method noise-sac noise_sac.aliasing=true   # ... with noise aliasing

On a GPU, the paper's settings (its U-Net, algorithm, 512 points from 128x128 depth) with
16 environments:
    python benchmarks/finetune.py --device cuda --preset paper algo=sodp finetune.num_envs=16 \
        env.metaworld.num_points=512 'env.metaworld.resolution=[128,128]'

Settings are the demo's (`sodp3d demo`'s config, overrides as there, e.g.
env.metaworld.num_points=512 or algo=sodp): 84x84 depth, 128 points, 150-step episodes,
8 environments, To=2 / Ta=8 / Tp=12, DDIM S=10 with eta=1, algo=cpu (see configs/algo/cpu.yaml).
The fine-tuning study's setting (experiment=finetune-cpu, variant gae-bc), over a longer
run whose memory must stay flat:
    python benchmarks/finetune.py --rounds 10 algo.advantage=gae

bare        one Meta-World env (no point-cloud wrapper) stepping random actions with a depth
            render on every step: the simulator with a camera, one process.
ceiling     the fine-tuner's own E environments (worker processes, chunks of Ta, clouds at
            the decision points only) stepping random chunks: what the simulator gives at
            these settings with no policy at all.
collect     one episode in each of the E environments, the policy sampling every chunk and
            keeping its chain and log-probs (sodp3d.finetune.rollouts).
loop        collect + the PPO update on that rollout (FineTuner.update), as `sodp3d
            finetune` runs them: the measure of fine-tuning speed.
evaluate    episodes acting deterministically (eta=0), as the evaluations before and after
            fine-tuning run them.
Ratios: each against bare and against ceiling. Targets: loop >= 1.5x bare, >= 0.5x ceiling.
The baselines run before every round, so all rows see the same machine load. Peak resident
memory is printed for the main process and for the E workers together, and the main
process's resident memory after the first and the last round (it must not grow).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

import mujoco  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from sodp3d.config import compose  # noqa: E402
from sodp3d.encoders import ENCODERS  # noqa: E402
from sodp3d.envs import make_env, make_vector_env, task_settings  # noqa: E402
from sodp3d.evaluate import evaluate_task  # noqa: E402
from sodp3d.finetune.ppo import FineTuner  # noqa: E402
from sodp3d.finetune.rollouts import Rollout, collect_rollout  # noqa: E402
from sodp3d.normalizer import MinMaxNormalizer  # noqa: E402
from sodp3d.policy import DiffusionPolicy, PolicyConfig  # noqa: E402
from sodp3d.runs import keep_host_memory, resolve_device  # noqa: E402

Tp, To, Ta = 12, 2, 8
TARGET_BARE, TARGET_CEILING = 1.5, 0.5


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


def ceiling_episode(vec, rng: np.random.Generator, seeds: list[int]) -> tuple[int, float]:
    """One episode in each env of ``vec`` with random chunks: (executed env steps, seconds)."""
    space = vec.single_action_space  # (Ta, Da)
    t0 = time.perf_counter()
    vec.reset(seed=seeds)
    done = np.zeros(vec.num_envs, bool)
    steps = 0
    while not done.all():
        actions = rng.uniform(space.low, space.high, (vec.num_envs, *space.shape)).astype(np.float32)
        _, _, terminated, truncated, info = vec.step(actions)
        steps += int(np.asarray(info["executed"])[~done].sum())
        done |= terminated | truncated
    return steps, time.perf_counter() - t0


def policy_for(bare: Bare, preset: str, encoder: str) -> DiffusionPolicy:
    """A policy with the env's shapes and a normaliser fitted on random arrays of those shapes."""
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
    keys = set(ENCODERS[encoder].keys) | {"action"}
    norm = MinMaxNormalizer.fit({k: v for k, v in arrays.items() if k in keys})
    torch.manual_seed(0)
    config = PolicyConfig(shape_meta=meta, horizon=Tp, n_obs_steps=To, n_action_steps=Ta, encoder=encoder, unet=preset)
    return DiffusionPolicy(config, norm)


def peak_mb(pid: int | str = "self") -> float:
    """Peak resident memory (VmHWM) of a process, MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) the processes have used so far, seconds summed over them."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / tick


def resident_mb() -> float:
    import resource

    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="button-press-topdown-v3")
    parser.add_argument("--rounds", type=int, default=3, help="collect + update rounds, one episode per env each")
    parser.add_argument("--preset", default="tiny", help="U-Net preset")
    parser.add_argument("--encoder", default="dp3")
    parser.add_argument("--reg", default="bc")
    parser.add_argument("--eval-episodes", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after the rounds, profile one update on the last rollout with torch.profiler "
                             "and print its N most expensive operators (by self CPU time) and where the time goes")
    parser.add_argument("--state", action="store_true",
                        help="state observations, no camera: the vector-env layouts at --envs environments, and the "
                             "fine-tuning loop at the study's setting (experiment=mt10-state); see state_main")
    parser.add_argument("--envs", type=int, nargs="+", default=[8, 32, 64], help="--state: numbers of environments")
    parser.add_argument("--method", default="ppo", choices=["ppo", "noise-sac"],
                        help="noise-sac: SAC in the planner's noise space at the demo's observations (noise_sac_main)")
    parser.add_argument("--chunks", type=int, default=2000, help="--method noise-sac: chunks to time after the warm-up")
    parser.add_argument("--layouts", nargs="+", default=["sync", "async", "workers"],
                        help="--state: vector-env layouts to time (workers: 2 processes)")
    parser.add_argument("overrides", nargs="*", help="demo config overrides, e.g. env.metaworld.num_points=512")
    args = parser.parse_args()
    if args.state:
        return state_main(args)
    if args.method == "noise-sac":
        return noise_sac_main(args)
    cfg = compose("demo", [f"reg={args.reg}", *args.overrides])
    env_cfg, algo, E = cfg.env, cfg.algo, int(cfg.finetune.num_envs)
    keep_host_memory()  # as `sodp3d finetune` does

    bare = Bare(args.task, env_cfg)
    vec = make_vector_env(args.task, E, env_cfg, mode="async", n_obs_steps=To, n_action_steps=Ta)
    try:
        device = resolve_device(args.device)
        policy = policy_for(bare, args.preset, args.encoder)
        ft = FineTuner(policy, algo, device, seed=0)
        rows, last = measure(args, bare, vec, ft, E)
        if args.profile:
            profile_update(ft, last, args.profile)
        workers = [p.pid for p in getattr(vec, "processes", [])]
        worker_peak = sum(peak_mb(pid) for pid in workers)
    finally:
        vec.close()
        bare.close()
    report(args, cfg, bare, rows, ft, E, worker_peak)


def measure(args, bare: Bare, vec, ft: FineTuner, E: int) -> tuple[list[dict], Rollout]:
    """One row of measures per round, and the last round's rollout (for --profile)."""
    rng = np.random.default_rng(0)
    vec.reset(seed=list(range(E)))  # the workers are up (started, GL contexts made) before timing
    workers = [p.pid for p in getattr(vec, "processes", [])]
    rows = []
    for r in range(args.rounds):
        seeds = [1000 * (r + 1) + j for j in range(E)]
        bare_steps = 300
        bare_s = bare.step(bare_steps)
        w0 = cpu_seconds(workers)
        ceil_steps, ceil_s = ceiling_episode(vec, rng, seeds)
        w1, m1 = cpu_seconds(workers), time.process_time()
        ro = collect_rollout(ft.policy, vec, ft.sampler, seeds, ft.torch_gen)
        w2, m2 = cpu_seconds(workers), time.process_time()
        ft.buffer.add(ro.trajectories)
        t = time.perf_counter()
        stats = ft.update(ro)
        upd_s = time.perf_counter() - t
        m3 = time.process_time()
        row = {"bare": bare_steps / bare_s, "ceiling": ceil_steps / ceil_s, "steps": ro.env_steps,
               "collect_s": ro.seconds, "update_s": upd_s, "grad_steps": stats["gradient_steps"],
               "critic_s": stats.get("critic_seconds", 0.0),
               "rss": resident_mb(), "ceil_steps": ceil_steps, "ceil_s": ceil_s,
               # CPU seconds: the workers in the ceiling and in collection; this process's
               # sampling (collection) and update
               "cpu_ceiling": w1 - w0, "cpu_workers": w2 - w1, "cpu_sampling": m2 - m1, "cpu_update": m3 - m2}
        if r == 0 and args.eval_episodes > 0:
            gen = torch.Generator(device=ft.device).manual_seed(0)
            t = time.perf_counter()
            ev = evaluate_task(ft.policy, args.task, args.eval_episodes, 0, E, generator=gen, vec=vec)
            row["eval"] = ev["env_steps"] / (time.perf_counter() - t)
        rows.append(row)
        print(f"round {r}: bare {row['bare']:.0f} steps/s, ceiling {row['ceiling']:.0f} steps/s; collect "
              f"{ro.env_steps} steps ({ro.size} chunks) in {ro.seconds:.2f} s; update {row['grad_steps']} "
              f"gradient steps in {upd_s:.2f} s; resident {row['rss']:.0f} MB", flush=True)
    return rows, ro


def profile_update(ft: FineTuner, rollout, top: int) -> None:
    """One more update on ``rollout`` under torch.profiler: the top operators by self CPU time,
    and the update's time split into the encoder's and U-Net's forward passes (forward hooks
    open a profiler range around each), the backward and the optimiser steps."""
    from torch.profiler import ProfilerActivity, profile, record_function

    def label(module: torch.nn.Module, name: str) -> list:
        """Forward hooks that open and close a profiler range named ``name`` around each call."""
        open_ranges: list = []

        def enter(*_):
            open_ranges.append(record_function(name))
            open_ranges[-1].__enter__()

        def leave(*_):
            open_ranges.pop().__exit__(None, None, None)

        return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]

    hooks = label(ft.policy.encoder, "forward: encoder") + label(ft.policy.model, "forward: U-Net")
    if ft.critic is not None:
        hooks += label(ft.critic.mlp, "forward: critic MLP")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ft.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        with record_function("update"):
            stats = ft.update(rollout)
    for h in hooks:
        h.remove()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48)
    print(f"\nProfile of one update ({stats['gradient_steps']} gradient steps, {rollout.size} chunks), "
          f"top {top} operators by self CPU time:\n{table}")
    events = {e.key: e for e in prof.key_averages()}
    total = events["update"].cpu_time_total if "update" in events else float("nan")
    print("| part of the update | CPU ms | share |")
    print("|---|---:|---:|")
    for name, keys in [*[(k, [k]) for k in ("forward: encoder", "forward: U-Net", "forward: critic MLP") if k in events],
                       ("backward (autograd)", [k for k in events if k.startswith("autograd::engine::evaluate_function")]),
                       ("optimiser (Adam)", [k for k in events if k.startswith("Optimizer.step#Adam")])]:
        ms = sum(events[k].cpu_time_total for k in keys) / 1e3
        print(f"| {name} | {ms:.0f} | {ms * 1e3 / total:.1%} |")
    print(f"| the whole update | {total / 1e3:.0f} | 100% |")


def report(args, cfg, bare: Bare, rows: list[dict], ft: FineTuner, E: int, worker_peak: float) -> None:
    bare_sps = float(np.mean([x["bare"] for x in rows]))
    ceil_sps = float(np.mean([x["ceiling"] for x in rows]))
    steps = sum(x["steps"] for x in rows)
    coll_sps = steps / sum(x["collect_s"] for x in rows)
    loop_sps = steps / sum(x["collect_s"] + x["update_s"] for x in rows)
    s = bare.settings
    n_params = sum(p.numel() for p in ft.policy.parameters())
    print(f"\nFine-tuning throughput, {args.task}: {E} envs, episode length {s.episode_length}, To={To} Ta={Ta} "
          f"Tp={Tp}, DDIM S={ft.sampler.num_steps} eta=1, '{args.preset}' U-Net + {args.encoder} encoder "
          f"({n_params / 1e6:.2f}M params), reg={args.reg}, p_step {ft.p_step}, batch {ft.batch_size}, "
          f"bc batch {ft.bc_batch_size}, device {ft.device}; camera {', '.join(s.cameras)} {s.height}x{s.width}, {s.num_points} points; "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}; "
          f"{len(rows)} rounds, {steps} env steps.\n")
    print("| measure | env steps/s | vs bare | vs ceiling |")
    print("|---|---:|---:|---:|")

    def line(name: str, sps: float) -> None:
        print(f"| {name} | {sps:.0f} | {sps / bare_sps:.2f} | {sps / ceil_sps:.2f} |")

    line("bare: 1 env, step + depth render every step", bare_sps)
    line(f"ceiling: the {E} envs, same chunking, random actions", ceil_sps)
    line(f"collect ({E} envs, sampling chains + log-probs)", coll_sps)
    line(f"**loop: collect + update** ({rows[-1]['grad_steps']} gradient steps per round)", loop_sps)
    if "eval" in rows[0]:
        line(f"evaluate (eta 0, {args.eval_episodes} episodes)", rows[0]["eval"])
    g = max(rows[-1]["grad_steps"], 1)
    upd = float(np.mean([x["update_s"] for x in rows]))
    upd_total = sum(x["update_s"] for x in rows)
    grad_total = sum(x["grad_steps"] for x in rows)
    critic_share = sum(x["critic_s"] for x in rows) / max(upd_total, 1e-9)
    print(f"\nupdate: {upd:.2f} s per round, {upd / g * 1e3:.0f} ms per gradient step (reg={args.reg}, "
          f"advantage={ft.advantage}); {grad_total / max(upd_total, 1e-9):.1f} gradient steps/s in the update, "
          f"{grad_total / sum(x['collect_s'] + x['update_s'] for x in rows):.1f} over the loop; "
          f"the critic's share of the update {critic_share:.1%}")
    print(f"time per 100k env steps: {1e5 / loop_sps / 60:.1f} min at the loop's rate "
          f"({steps / len(rows):.0f} env steps and {grad_total / len(rows):.0f} gradient steps per round)")
    print(f"peak resident memory: main process {peak_mb():.0f} MB, {E} env workers {worker_peak:.0f} MB together; "
          f"main process resident after round 1: {rows[0]['rss']:.0f} MB, after round {len(rows)}: {rows[-1]['rss']:.0f} MB")
    cpu_table(rows)
    print(f"at the loop's rate, 1M environment steps (the paper's budget per task) take {1e6 / loop_sps / 3600:.1f} h")
    vb, vc = loop_sps / bare_sps, loop_sps / ceil_sps
    print(f"loop {vb:.2f}x bare ({'meets' if vb >= TARGET_BARE else 'misses'} >= {TARGET_BARE}), "
          f"{vc:.2f}x ceiling ({'meets' if vc >= TARGET_CEILING else 'misses'} >= {TARGET_CEILING})")


def cpu_table(rows: list[dict]) -> None:
    """Where the CPU time goes, per 1000 env steps. With every core busy, the loop's rate is
    at most cores / (all of it); 0.5x the ceiling needs sampling + update to cost no more CPU
    time than the environments do."""
    steps, ceil_steps = sum(x["steps"] for x in rows), sum(x["ceil_steps"] for x in rows)
    per = {k: 1000 * sum(x[k] for x in rows) / steps for k in ("cpu_workers", "cpu_sampling", "cpu_update")}
    ceiling = 1000 * sum(x["cpu_ceiling"] for x in rows) / ceil_steps
    cores = os.cpu_count() or 1
    total = sum(per.values())
    print(f"\nCPU seconds per 1000 env steps ({cores} cores):")
    print("| part | CPU s / 1000 steps |")
    print("|---|---:|")
    print(f"| ceiling: the environments alone | {ceiling:.2f} |")
    print(f"| loop: environments (workers) | {per['cpu_workers']:.2f} |")
    print(f"| loop: sampling chains (this process) | {per['cpu_sampling']:.2f} |")
    print(f"| loop: update (this process) | {per['cpu_update']:.2f} |")
    print(f"| loop: all | {total:.2f} |")
    wall = 1000 * sum(x["ceil_s"] for x in rows) / ceil_steps
    print(f"sampling + update / environments: {(per['cpu_sampling'] + per['cpu_update']) / per['cpu_workers']:.2f} "
          f"(0.5x the ceiling needs <= 1 where the ceiling keeps all {cores} cores busy; it used "
          f"{ceiling / wall:.1f} of them)")


# ---------------------------------------------------------------------------------------
# --method noise-sac: SAC in the frozen planner's noise space
def noise_sac_main(args) -> None:
    """The demo's observations (clouds rendered at the decision points) and ``finetune.num_envs``
    environments, SAC acting in the noise of a frozen planner (noise_sac.* from the finetune
    config, overrides as there with a ``noise_sac.`` prefix): env steps/s of the loop, SAC
    gradient steps/s, and the shares of time in the planner (denoising and encoding), in
    SAC's gradient steps and in the environments, against bare (one env, a depth render
    every step) measured in the same run."""
    import gymnasium as gym

    from sodp3d.finetune.noise_sac import NoiseVecEnv, sac_model

    own = [o for o in args.overrides if o.startswith("noise_sac.")]
    cfg = compose("demo", [o for o in args.overrides if not o.startswith("noise_sac.")])
    c = compose("finetune", own).noise_sac
    env_cfg, E = cfg.env, int(cfg.finetune.num_envs)
    keep_host_memory()
    bare = Bare(args.task, env_cfg)
    planner = policy_for(bare, args.preset, args.encoder).eval()
    vec = make_vector_env(args.task, E, env_cfg, mode="async", n_obs_steps=To, n_action_steps=Ta,
                          autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    env = NoiseVecEnv(planner, vec, float(c.noise_bound), seed_base=0)
    aliasing = bool(c.aliasing)
    model = sac_model(env, aliasing, learning_rate=float(c.learning_rate), learning_starts=int(c.learning_starts),
                      batch_size=int(c.batch_size), gradient_steps=int(c.gradient_steps), device=args.device,
                      policy_kwargs={"net_arch": list(c.net_arch)}, seed=0)
    model._warmup_rng = np.random.default_rng(0)
    timer = {"train": 0.0, "denoise": 0.0}
    if aliasing:  # the planner's calls inside aliasing's gradient steps, timed apart
        denoise = model.denoise

        def timed_denoise(*a, **k):
            t = time.perf_counter()
            out = denoise(*a, **k)
            timer["denoise"] += time.perf_counter() - t
            return out

        model.denoise = timed_denoise
    train = model.train

    def timed_train(*a, **k):
        t = time.perf_counter()
        train(*a, **k)
        timer["train"] += time.perf_counter() - t

    model.train = timed_train
    try:
        model.learn(total_timesteps=int(c.learning_starts) + E)  # warm-up, workers up
        b = bare.step(300)
        bare_sps = 300 / b
        steps0, planner0, grads0 = env.env_steps, env.planner_seconds, model._n_updates
        timer.update(train=0.0, denoise=0.0)
        t = time.perf_counter()
        model.learn(total_timesteps=args.chunks, reset_num_timesteps=False)
        wall = time.perf_counter() - t
    finally:
        env.close()
        bare.close()
    steps, grads = env.env_steps - steps0, model._n_updates - grads0
    planner_s, train_s = env.planner_seconds - planner0, timer["train"]
    sps = steps / wall
    print(f"\nnoise-sac throughput, {args.task}: {E} envs, '{args.preset}' U-Net + {args.encoder} encoder (frozen), "
          f"DDIM S={planner.config.num_inference_steps} eta 0; SAC net_arch {list(c.net_arch)}, batch {int(c.batch_size)}, "
          f"{int(c.gradient_steps)} gradient steps per vector step{', noise aliasing' if aliasing else ''}; "
          f"{args.chunks} chunks timed; {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}.\n")
    print("| measure | value |")
    print("|---|---:|")
    print(f"| bare: 1 env, step + depth render every step | {bare_sps:.0f} env steps/s |")
    print(f"| noise-sac loop | {sps:.0f} env steps/s ({sps / bare_sps:.2f}x bare) |")
    print(f"| SAC gradient steps | {grads / wall:.1f} /s over the loop, {grads / max(train_s, 1e-9):.1f} /s in training |")
    print(f"| share of the loop: SAC's gradient steps | {train_s / wall:.0%} |")
    print(f"| share of the loop: the planner (features, denoising) | {planner_s / wall:.0%} |")
    if aliasing:
        print(f"| share of the loop: the planner inside aliasing's gradient steps (part of SAC's) | "
              f"{timer['denoise'] / wall:.0%} |")
    print(f"| share of the loop: environments and the rest | {1 - (train_s + planner_s) / wall:.0%} |")
    print(f"\n12,000 env steps (the CPU grids' budget) take {12000 / sps / 60:.1f} min at this rate")


# ---------------------------------------------------------------------------------------
# --state: fine-tuning without a camera (experiment=mt10-state)
def state_main(args) -> None:
    """State observations, no renderer. For each number of environments: the bare simulator
    (one env, random actions, no camera), each vector-env layout stepping random chunks
    (sync: one process; async: a process per env; workers: 2 processes of E/2), and, in the
    fastest layout, collect alone and the loop (collect + update) at the study's setting:
    algo=large-batch, a state-encoder planner of the ``--preset`` U-Net, 150-step episodes.
    Prints env steps/s, ratios against bare, and minutes per 1M env steps."""
    cfg = compose("finetune", ["algo=large-batch", "env.metaworld.episode_length=150", "env.metaworld.point_cloud=false",
                               *args.overrides])
    env_cfg, algo = cfg.env, cfg.algo
    R = int(algo.rollouts_per_update)
    keep_host_memory()
    device = resolve_device(args.device)
    bare_env = make_env(args.task, env_cfg, point_cloud=False)
    bare_env.reset(seed=0)
    rng = np.random.default_rng(0)

    def bare(n: int = 3000) -> float:
        space = bare_env.action_space
        t0 = time.perf_counter()
        for _ in range(n):
            _, _, terminated, truncated, _ = bare_env.step(rng.uniform(space.low, space.high).astype(np.float32))
            if terminated or truncated:
                bare_env.reset()
        return n / (time.perf_counter() - t0)

    spaces = bare_env.observation_space.spaces
    da = int(bare_env.action_space.shape[0])
    meta = {"agent_pos": list(spaces["agent_pos"].shape), "state": list(spaces["state"].shape), "action": [da]}
    norm = MinMaxNormalizer.fit({"state": rng.uniform(-1, 1, (64,) + tuple(meta["state"])).astype(np.float32),
                                 "action": rng.uniform(-1, 1, (64, da)).astype(np.float32)})
    torch.manual_seed(0)
    config = PolicyConfig(shape_meta=meta, horizon=Tp, n_obs_steps=To, n_action_steps=Ta, encoder="state",
                          unet=args.preset)
    rows = []
    for E in args.envs:
        layouts = {}
        for layout in args.layouts:
            if layout == "workers" and E % 2:
                continue
            vec = make_vector_env(args.task, E, env_cfg, mode=layout, workers=2, point_cloud=False, n_obs_steps=To,
                                  n_action_steps=Ta)
            try:
                vec.reset(seed=list(range(E)))  # workers up before timing
                b = bare()
                steps, secs = ceiling_episode(vec, rng, [100 + j for j in range(E)])
                layouts[layout] = (steps / secs, b)
                print(f"{E} envs, {layout}: random chunks {steps / secs:.0f} env steps/s (bare {b:.0f})", flush=True)
            finally:
                vec.close()
        best = max(layouts, key=lambda k: layouts[k][0] / layouts[k][1])
        vec = make_vector_env(args.task, E, env_cfg, mode=best, workers=2, point_cloud=False, n_obs_steps=To,
                              n_action_steps=Ta)
        try:
            policy = DiffusionPolicy(PolicyConfig(**config.to_dict()), norm)
            ft = FineTuner(policy, algo, device, seed=0)
            vec.reset(seed=list(range(E)))
            b = bare()
            coll_s = upd_s = 0.0
            steps = grad = 0
            for r in range(args.rounds):
                parts = [collect_rollout(ft.policy, vec, ft.sampler, [1000 * (r * R + i + 1) + j for j in range(E)],
                                         ft.torch_gen) for i in range(R)]
                ro = Rollout.concat(parts)
                ft.buffer.add(ro.trajectories)
                t = time.perf_counter()
                stats = ft.update(ro)
                upd_s += time.perf_counter() - t
                coll_s += ro.seconds
                steps += ro.env_steps
                grad += stats["gradient_steps"]
                print(f"{E} envs, {best}, round {r}: {ro.env_steps} env steps ({ro.size} chunks) in {ro.seconds:.1f} s, "
                      f"update {stats['gradient_steps']} gradient steps in {time.perf_counter() - t:.1f} s", flush=True)
        finally:
            vec.close()
        rows.append({"E": E, "layouts": layouts, "best": best, "bare": b, "collect": steps / coll_s,
                     "loop": steps / (coll_s + upd_s), "update_share": upd_s / (coll_s + upd_s),
                     "grad_per_s": grad / max(upd_s, 1e-9), "chunks": ro.size, "grad": stats["gradient_steps"]})
    bare_env.close()
    n_params = sum(p.numel() for p in policy.parameters())
    print(f"\nState-only fine-tuning throughput, {args.task}: no camera, 150-step episodes, To={To} Ta={Ta} Tp={Tp}, "
          f"'{args.preset}' U-Net + state encoder ({n_params / 1e6:.2f}M params), algo=large-batch "
          f"({R} episodes per env per update, {int(algo.update_epochs)} epochs, minibatch {int(algo.batch_size)} pairs), "
          f"device {device}; {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; {args.rounds} updates per row.\n")
    print("| envs | layout | random chunks, steps/s | vs bare |")
    print("|---:|---|---:|---:|")
    for row in rows:
        for layout, (sps, b) in row["layouts"].items():
            print(f"| {row['E']} | {layout}{' (fastest)' if layout == row['best'] else ''} | {sps:.0f} | {sps / b:.2f} |")
    print("\n| envs | layout | bare steps/s | collect steps/s | vs bare | loop steps/s | vs bare | update share | "
          "chunks / update | gradient steps/s | min per 1M env steps |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['E']} | {row['best']} | {row['bare']:.0f} | {row['collect']:.0f} | {row['collect'] / row['bare']:.2f} | "
              f"{row['loop']:.0f} | {row['loop'] / row['bare']:.2f} | {row['update_share']:.0%} | {row['chunks']} | "
              f"{row['grad_per_s']:.1f} | {1e6 / row['loop'] / 60:.0f} |")
    goal = min(1e6 / r["loop"] / 60 for r in rows)
    print(f"\nfastest: 1M env steps with updates in {goal:.0f} min ({'meets' if goal <= 30 else 'misses'} the goal of "
          "<= 30 min on 2 cores)")


if __name__ == "__main__":
    main()
