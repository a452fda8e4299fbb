"""``sodp3d eval``: success rate and return of a policy on tasks, in parallel environments.

Protocol (the paper's): ``episodes`` episodes per task and seed, success = the episode
succeeded at any step, DDIM with the policy's eta (0 by default: deterministic). The
metric is the *final* evaluation of one checkpoint; fine-tuning may also report DP3's
"average of the top-5 evaluations during training", always labelled as such.

Environments step in lockstep batches of ``num_envs``; env j of batch b in seed s is
reset with seed s * 100000 + b * num_envs + j, so results are reproducible and every
episode has its own goal.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sodp3d.errors import UserError

METRIC_FINAL = ("final evaluation: success rate over {episodes} episodes per task and seed (DDIM eta = {eta:g}), "
                "mean (std) across seeds")
METRIC_TOP_K = ("DP3-style: per task, the average of the {k} best of {n} evaluations made during training "
                "({episodes} episodes each; std across those evaluations); optimistic, not a final evaluation")


def check_policy_fits(policy, task: str, env_cfg) -> None:
    from sodp3d.envs import make_env, task_settings
    from sodp3d.envs.settings import require_images

    require_images(policy, task, env_cfg)
    env = make_env(task, env_cfg, point_cloud=policy.reads_camera)
    try:
        spaces = env.observation_space.spaces
        meta = policy.config.shape_meta
        if tuple(meta["action"]) != tuple(env.action_space.shape):
            raise UserError(
                f"the checkpoint acts with {meta['action'][0]} action dims; {task} needs {env.action_space.shape[0]}"
            )
        for k in policy.obs_keys:
            if k not in spaces:
                suite = task_settings(task, env_cfg).suite
                raise UserError(f"the checkpoint reads '{k}', which the env settings of {task} do not give "
                                f"(env.{suite}.point_cloud=false); act with env.{suite}.point_cloud=true")
            if tuple(meta[k]) != tuple(spaces[k].shape):
                raise UserError(
                    f"the checkpoint reads '{k}' of shape {tuple(meta[k])}; {task} gives {tuple(spaces[k].shape)} "
                    "(check env settings such as num_points or rgb)"
                )
    finally:
        env.close()


def evaluate_task(
    policy,
    task: str,
    episodes: int,
    seed: int,
    num_envs: int,
    env_cfg=None,
    generator: torch.Generator | None = None,
    progress=None,
    vec=None,
    sampler=None,
) -> dict[str, Any]:
    """Run ``episodes`` episodes of ``task``; returns per-episode success and return.

    ``vec``: an open vector env of this task with the policy's chunking (the fine-tuner
    passes its own); otherwise one of min(num_envs, episodes) envs is made and closed.
    ``sampler``: a DDIM sampler to act with instead of the policy's (another eta).
    An own vector env is laid out as ``vector_env=auto`` says (sodp3d.envs.vector), and
    renders only when the policy reads a cloud or an image.
    """
    from sodp3d.envs import make_vector_env

    own = vec is None
    if own:
        To, Ta = policy.config.n_obs_steps, policy.config.n_action_steps
        n = max(1, min(num_envs, episodes))
        vec = make_vector_env(task, n, env_cfg, mode="auto", point_cloud=policy.reads_camera, n_obs_steps=To,
                              n_action_steps=Ta)
    n = vec.num_envs
    successes: list[bool] = []
    returns: list[float] = []
    steps = 0
    try:
        batch = 0
        while len(successes) < episodes:
            seeds = [seed * 100000 + batch * n + j for j in range(n)]
            obs, _ = vec.reset(seed=seeds)
            done = np.zeros(n, bool)
            ok = np.zeros(n, bool)
            ret = np.zeros(n)
            while not done.all():
                action = policy.predict_action({k: obs[k] for k in policy.obs_keys}, generator=generator,
                                               sampler=sampler)["action"]
                obs, reward, terminated, truncated, info = vec.step(action.cpu().numpy())
                live = ~done
                ret[live] += reward[live]
                ok[live] |= np.asarray(info["success"], bool)[live]
                steps += int(np.asarray(info["executed"])[live].sum())
                done |= terminated | truncated
            take = min(n, episodes - len(successes))
            successes.extend(ok[:take].tolist())
            returns.extend(ret[:take].tolist())
            if progress is not None:
                progress.update(take)
            batch += 1
    finally:
        if own:
            vec.close()
    return {"task": task, "seed": seed, "success": successes, "return": returns, "env_steps": steps}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(statistics.pstdev(values)) if len(values) > 1 else 0.0


def evaluate(policy, tasks: list[str], episodes: int, seeds: list[int], num_envs: int, env_cfg=None,
             sampler=None) -> dict[str, Any]:
    from tqdm import tqdm

    if episodes <= 0:
        raise UserError(f"episodes must be a positive integer, got {episodes}")
    if not seeds:
        raise UserError("seeds must name at least one seed")
    for task in tasks:
        check_policy_fits(policy, task, env_cfg)
    t0 = time.perf_counter()
    per_task = []
    bar = tqdm(total=len(tasks) * len(seeds) * episodes, desc="eval", unit="ep", dynamic_ncols=True)
    env_steps = 0
    try:
        for task in tasks:
            runs = []
            for s in seeds:
                gen = torch.Generator(device=policy.device).manual_seed(int(s))
                r = evaluate_task(policy, task, episodes, int(s), num_envs, env_cfg, gen, bar, sampler=sampler)
                env_steps += r["env_steps"]
                runs.append(r)
            rates = [float(np.mean(r["success"])) for r in runs]
            rets = [float(np.mean(r["return"])) for r in runs]
            sr, sr_std = _mean_std(rates)
            mr, mr_std = _mean_std(rets)
            per_task.append({"task": task, "success_rate": sr, "success_rate_std": sr_std, "mean_return": mr,
                             "mean_return_std": mr_std, "per_seed_success_rate": rates, "per_seed_mean_return": rets,
                             "episodes": episodes})
    finally:
        bar.close()
    per_seed_avg = [float(np.mean([t["per_seed_success_rate"][i] for t in per_task])) for i in range(len(seeds))]
    avg, avg_std = _mean_std(per_seed_avg)
    seconds = time.perf_counter() - t0
    eta = policy.sampler.eta if sampler is None else sampler.eta
    return {
        "metric": METRIC_FINAL.format(episodes=episodes, eta=eta),
        "eta": eta,
        "seeds": list(seeds),
        "tasks": per_task,
        "average": {"success_rate": avg, "success_rate_std": avg_std, "tasks": len(per_task)},
        "env_steps": env_steps,
        "seconds": seconds,
    }


def results_markdown(results: dict[str, Any], title: str = "Evaluation") -> str:
    lines = [f"## {title}", "", f"Metric: {results['metric']}.", "",
             "| task | success % | mean return |", "|---|---:|---:|"]
    for t in results["tasks"]:
        lines.append(f"| {t['task']} | {100 * t['success_rate']:.1f} ({100 * t['success_rate_std']:.1f}) "
                     f"| {t['mean_return']:.1f} ({t['mean_return_std']:.1f}) |")
    a = results["average"]
    lines.append(f"| **average** | **{100 * a['success_rate']:.1f}** ({100 * a['success_rate_std']:.1f}) | |")
    if results["seeds"]:
        lines += ["", f"Seeds {results['seeds']}; {results['env_steps']} env steps in {results['seconds']:.0f} s."]
    return "\n".join(lines)


def top_k_average(history: list[dict[str, Any]], k: int = 5) -> dict[str, Any]:
    """DP3's metric from periodic evaluations: per task, the mean of its k best success rates.

    ``history`` holds one entry per evaluation: {"step": int, "tasks": [{"task", "success_rate",
    "mean_return", "episodes"}...]} as written to a run's evals.jsonl.
    """
    if not history:
        raise UserError("no evaluations were recorded during training (evals.jsonl is empty or missing); "
                        "use metric=final, or pre-train with eval.every > 0 and eval.task set")
    per_task: dict[str, list[tuple[float, float]]] = {}
    for entry in history:
        for t in entry["tasks"]:
            per_task.setdefault(t["task"], []).append((float(t["success_rate"]), float(t["mean_return"])))
    rows = []
    for task, values in per_task.items():
        best = sorted(values, reverse=True)[:k]
        sr, sr_std = _mean_std([b[0] for b in best])
        mr, mr_std = _mean_std([b[1] for b in best])
        rows.append({"task": task, "success_rate": sr, "success_rate_std": sr_std, "mean_return": mr,
                     "mean_return_std": mr_std, "per_seed_success_rate": [sr], "episodes": history[0]["tasks"][0]["episodes"]})
    avg = float(np.mean([r["success_rate"] for r in rows]))
    return {
        "metric": METRIC_TOP_K.format(k=min(k, len(history)), n=len(history), episodes=rows[0]["episodes"]),
        "seeds": [],
        "tasks": rows,
        "average": {"success_rate": avg, "success_rate_std": 0.0, "tasks": len(rows)},
        "env_steps": 0,
        "seconds": 0.0,
    }


def read_history(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------
# The command
TITLES = {"final": "Evaluation", "top5": "Evaluation (DP3 top-5)"}


def run(cfg) -> dict[str, Any]:
    """Evaluates ``cfg.ckpt`` (metric=final), or summarises its run's periodic evaluations
    (metric=top5); returns the record, also written to ``<out>/results.json``."""
    from omegaconf import OmegaConf

    from sodp3d.checkpoint import acting_env_config, checkpoint_path, policy_from_checkpoint, refuse_foreign_frame
    from sodp3d.envs import resolve_tasks
    from sodp3d.runs import resolve_device, write_results

    if cfg.get("ckpt") in (None, "???"):
        raise UserError("no checkpoint; pass ckpt=<file or run dir>")
    ckpt = checkpoint_path(cfg.ckpt)
    if str(cfg.metric) not in TITLES:
        raise UserError(f"unknown metric '{cfg.metric}'; valid: {', '.join(TITLES)}")
    if cfg.metric == "top5":
        run_dir = ckpt.parent.parent
        results = top_k_average(read_history(run_dir / "evals.jsonl"), 5)
        results["checkpoint"] = str(ckpt)
        out = Path(str(cfg.out)) if cfg.get("out") else run_dir / "eval-top5"
    else:
        tasks = resolve_tasks(cfg.task if cfg.get("task") != "???" else None)
        seeds = OmegaConf.to_container(cfg.seeds) if not isinstance(cfg.seeds, int) else [cfg.seeds]
        if not isinstance(cfg.episodes, int) or not isinstance(cfg.num_envs, int) or cfg.num_envs <= 0:
            raise UserError(f"episodes and num_envs must be positive integers, got {cfg.episodes!r}, {cfg.num_envs!r}")
        policy, payload = policy_from_checkpoint(ckpt, device=resolve_device(str(cfg.device)), use_ema=bool(cfg.use_ema))
        refuse_foreign_frame(payload, bool(cfg.get("allow_foreign_frame", False)), str(ckpt))
        sampler = None if cfg.get("eta") is None else policy.ddim(float(cfg.eta), float(cfg.min_std))
        results = evaluate(policy, tasks, cfg.episodes, [int(s) for s in seeds], cfg.num_envs,
                           acting_env_config(cfg.env, payload), sampler=sampler)
        results.update({"kind": "eval", "checkpoint": str(ckpt), "encoder": policy.config.encoder,
                        "unet": policy.config.unet})
        out = Path(str(cfg.out)) if cfg.get("out") else ckpt.parent.parent / "eval"
    results.update({"protocol": str(cfg.metric), "out": str(out)})
    write_results(out, results, results_markdown(results, TITLES[str(cfg.metric)]))
    return results


def render(record: dict[str, Any]) -> str:
    out = Path(record["out"])
    return (f"\n{results_markdown(record, TITLES[record['protocol']])}\n\n"
            f"wrote {out / 'results.json'} and {out / 'results.md'}")

