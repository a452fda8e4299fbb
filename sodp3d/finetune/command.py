"""``sodp3d finetune``: task-guided fine-tuning of a pre-trained planner, task by task.

Per task: evaluate the pre-trained policy, fill the target buffer with N_init of its
rollouts, then alternate rollouts (sodp3d.finetune.rollouts) and PPO updates with the
regulariser (sodp3d.finetune.ppo) until the env-step budget is spent, evaluating along
the way and at the end. Every update ends in an atomic checkpoint; ``resume=true``
continues a killed run, and a finished task is not redone.

The record (results.json) holds per task the success and mean return before and after
fine-tuning at each evaluation eta, with the learning curve; ``sodp3d report`` reads it.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from sodp3d.checkpoint import load_checkpoint, refuse_other_method, save_checkpoint
from sodp3d.data.store import WORLD_FRAME
from sodp3d.errors import UserError
from sodp3d.files import last_good, reraise_write_failure
from sodp3d.locks import writer_lock
from sodp3d.policy import DiffusionPolicy, PolicyConfig
from sodp3d.runs import RunLogger, keep_host_memory, refuse_existing, resolve_device, results_table, write_results

from .evaluations import eval_etas, eval_value, new_state, record_evaluation, task_summary
from .ppo import FineTuner, check_algo
from .rollouts import Rollout, collect_rollout

METRIC = "final evaluation, success rate over {episodes} episodes (DDIM eta = {eta:g}), before and after fine-tuning"

def _initial_policy(cfg: DictConfig, pretrained: DiffusionPolicy, device: torch.device) -> DiffusionPolicy:
    """The policy to fine-tune, from the pre-trained one (left untouched) and cfg.init."""
    init = str(cfg.init)
    if init == "pretrained":
        return copy.deepcopy(pretrained)
    if init == "scratch":
        torch.manual_seed(int(cfg.seed))
        fresh = DiffusionPolicy(PolicyConfig(**pretrained.config.to_dict()))
        fresh.normalizer.load_state_dict(pretrained.normalizer.state_dict())  # data statistics only
        return fresh.to(device)
    raise UserError(f"unknown init '{init}'; valid: pretrained, scratch")


def finetune_task(cfg: DictConfig, task: str, run: Path, device: torch.device,
                  pretrained: DiffusionPolicy, cloud_frame: str = WORLD_FRAME) -> dict[str, Any]:
    """Fine-tune one task from ``pretrained`` (not modified; the KL regulariser's
    reference); returns its summary (pre-trained and fine-tuned success). ``cloud_frame``:
    the pre-trained checkpoint's, carried into the fine-tuned ones."""
    from tqdm import tqdm

    from sodp3d.envs import make_vector_env
    from sodp3d.evaluate import check_policy_fits

    policy = _initial_policy(cfg, pretrained, device)
    check_policy_fits(policy, task, cfg.env)
    algo = cfg.algo
    ft = FineTuner(policy, algo, device, int(cfg.seed), reference=pretrained)
    ckpt = run / "checkpoints" / "latest.ckpt"
    state = new_state()
    if ckpt.exists():
        refuse_existing(run, True, bool(cfg.resume), "a fine-tuning run")
        payload = load_checkpoint(ckpt, map_location=device)
        refuse_other_method(payload, "ppo", ckpt)
        ft.load(payload)
        state = payload["finetune_state"]
    etas = eval_etas(cfg)
    # One DDIM sampler per evaluation eta; eta = 1 is the sampler fine-tuning optimises.
    samplers = [policy.ddim(e, float(algo.min_std)) for e in etas]

    def summary(final: float | None) -> dict[str, Any]:
        return task_summary(state, task, ft.reg_name, str(cfg.init), etas, ft.updates, final)

    done = eval_value(state, "final", etas[0])
    if done is not None and state["env_steps"] >= int(cfg.env_steps):
        return summary(done)  # a finished run: nothing to do
    run.mkdir(parents=True, exist_ok=True)
    logger = RunLogger(run, cfg, f"{run.parent.name}-{task}")
    E = int(cfg.num_envs)
    vec = make_vector_env(task, E, cfg.env, mode=str(cfg.get("vector_env", "auto")), workers=cfg.get("env_workers"),
                          point_cloud=policy.reads_camera, n_obs_steps=policy.config.n_obs_steps,
                          n_action_steps=policy.config.n_action_steps)
    budget = int(cfg.env_steps)
    seed_base = int(cfg.seed) * 1_000_003

    saved = {"at": f"env step {state['env_steps']}" if ckpt.exists() else None}

    def save() -> None:
        save_checkpoint(ckpt, {"policy_config": policy.config.to_dict(), "task": task, "cloud_frame": cloud_frame,
                               "method": "ppo",
                               "train_config": OmegaConf.to_container(cfg, resolve=True),
                               "finetune_state": state, **ft.state()}, last_good=saved["at"])
        saved["at"] = f"env step {state['env_steps']}"

    def run_eval(tag: str) -> float:
        return record_evaluation(state, ft.policy, task, cfg, etas, samplers, vec, logger, tag)

    bar = tqdm(total=budget, initial=min(state["env_steps"], budget), desc=f"finetune {task} ({ft.reg_name})",
               unit="step", dynamic_ncols=True)
    try:
        if state["pretrained_eval"] is None:
            if int(cfg.eval.episodes) > 0:
                state["pretrained_eval"] = run_eval("initial")
            # N_init rollouts of the initial model fill the target buffer (eq. 13).
            n_init = int(algo.n_init)
            filled = 0
            while filled < n_init:
                seeds = [seed_base + 10_000_000 + filled + j for j in range(E)]
                ro = collect_rollout(ft.policy, vec, ft.sampler, seeds, ft.torch_gen)
                ft.buffer.add(ro.trajectories[: n_init - filled])
                filled += min(E, n_init - filled)
            save()
        last_eval = state["evals"][-1]["env_steps"] if state["evals"] else 0
        per_update = int(algo.get("rollouts_per_update", 1))  # episodes per environment in one update's batch
        while state["env_steps"] < budget:
            parts: list = []
            while len(parts) < per_update and state["env_steps"] + sum(p.env_steps for p in parts) < budget:
                seeds = [seed_base + (ft.updates * per_update + len(parts)) * E + j for j in range(E)]
                parts.append(collect_rollout(ft.policy, vec, ft.sampler, seeds, ft.torch_gen))
                ft.buffer.add(parts[-1].trajectories)
            ro = Rollout.concat(parts)
            t_upd = time.perf_counter()
            try:
                stats = ft.update(ro)
            except FloatingPointError as e:
                raise UserError(f"fine-tuning stopped: {e}; the last good checkpoint is {ckpt}") from None
            upd_s = time.perf_counter() - t_upd
            state["env_steps"] += ro.env_steps
            entry = {
                "update": ft.updates, "env_steps": state["env_steps"],
                "success_rate": float(np.mean([t.success for t in ro.trajectories])),
                "mean_chunk_reward": float(ro.reward.mean()),
                "mean_return": float(np.mean([t.ret for t in ro.trajectories])),
                "target_buffer": len(ft.buffer), "episodes": len(ro.trajectories), "chunks": ro.size,
                "env_steps_per_s": ro.env_steps / max(ro.seconds, 1e-9),
                "steps_per_s_with_update": ro.env_steps / max(ro.seconds + upd_s, 1e-9), **stats,
            }
            state["history"].append(entry)
            logger.log(entry, state["env_steps"])
            bar.update(min(ro.env_steps, budget - bar.n))
            bar.set_postfix(success=f"{entry['success_rate']:.2f}", kl=f"{entry['approx_kl']:.1e}",
                            clip=f"{entry['clip_fraction']:.2f}")
            every = int(cfg.eval.every_env_steps)
            # The last update's model is the final evaluation's, on the same resets: no periodic one there.
            if (int(cfg.eval.episodes) > 0 and every > 0 and state["env_steps"] - last_eval >= every
                    and state["env_steps"] < budget):
                run_eval("periodic")
                last_eval = state["env_steps"]
            save()
        final = run_eval("final") if int(cfg.eval.episodes) > 0 else None
        save()
    except OSError as e:  # a log line or another file of the run could not be written
        reraise_write_failure(e, run, last_good(saved["at"], ckpt))
    finally:
        bar.close()
        vec.close()
        logger.close()
    return summary(final)


def _noise_sac(*args, **kwargs) -> dict[str, Any]:
    from .noise_sac import finetune_task as noise_sac_task

    return noise_sac_task(*args, **kwargs)


# ``method=``: how a task is fine-tuned from the pre-trained planner. Each is
# (cfg, task, run dir, device, pre-trained policy, cloud frame) -> the task's summary.
METHODS = {
    "ppo": finetune_task,       # PPO over the denoising chain + a regulariser (the paper's; this module)
    "noise-sac": _noise_sac,    # SAC in the frozen planner's noise space (sodp3d/finetune/noise_sac.py)
}


def help_text() -> str:
    """The methods and the keys each reads, with their defaults (for --help)."""
    from sodp3d.config import compose

    cfg = compose("finetune", [])
    algo = ", ".join(f"{k}={v}" for k, v in cfg.algo.items() if not isinstance(v, (dict, DictConfig)))
    sac = ", ".join(f"{k}={v}" for k, v in cfg.noise_sac.items())
    import textwrap

    def item(name: str, text: str) -> str:
        return textwrap.fill(text, 100, initial_indent=f"  {name:<11}", subsequent_indent=" " * 13)

    return "\n".join([
        "Methods (method=<name>):",
        item("ppo", "PPO over the denoising chain plus a regulariser (the paper's); reads algo.* (algo=sodp by "
                    f"default; algo=cpu, algo=large-batch): {algo}"),
        item("noise-sac", "SAC (stable-baselines3) in the frozen planner's noise space: the planner denoises SAC's "
                          f"x_S at eta 0; reads noise_sac.*: {sac}"),
        "Both read task, env_steps, num_envs, vector_env, env_workers, eval.*, seed and resume.",
    ])


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tunes every task of ``cfg.task`` from ``cfg.ckpt``; returns the results record
    (also written to ``<out>/results.json``, with its table in ``results.md``)."""
    from omegaconf import open_dict

    from sodp3d.checkpoint import acting_env_config, checkpoint_path, policy_from_payload, refuse_foreign_frame
    from sodp3d.envs import resolve_tasks
    from sodp3d.envs.settings import require_images
    from sodp3d.envs.vector import resolve_mode

    if cfg.get("ckpt") in (None, "???"):
        raise UserError("no checkpoint; pass ckpt=<pre-trained checkpoint or run dir>")
    if cfg.get("out") in (None, "???"):
        raise UserError("no run directory; pass out=<run dir>")
    tasks = resolve_tasks(cfg.task if cfg.get("task") != "???" else None)
    for key in ("env_steps", "num_envs"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] <= 0:
            raise UserError(f"{key} must be a positive integer, got {cfg[key]!r}")
    resolve_mode(str(cfg.get("vector_env", "auto")), int(cfg.num_envs), cfg.get("env_workers"), renders=True)
    method = str(cfg.get("method", "ppo"))
    if method not in METHODS:
        raise UserError(f"unknown method={method}; valid: {', '.join(METHODS)}")
    if method == "noise-sac":
        from .noise_sac import check_noise_sac

        check_noise_sac(cfg.noise_sac)
        if str(cfg.init) != "pretrained":
            raise UserError("method=noise-sac steers the pre-trained planner; it takes init=pretrained only")
    check_algo(cfg.algo)
    etas = eval_etas(cfg)
    device = resolve_device(str(cfg.device))
    keep_host_memory()
    # One read of the pre-trained checkpoint: its policy, and the observation settings it
    # was trained with (plus the user's changes) to act with.
    payload = load_checkpoint(checkpoint_path(cfg.ckpt))
    refuse_foreign_frame(payload, bool(cfg.get("allow_foreign_frame", False)), str(checkpoint_path(cfg.ckpt)))
    pretrained = policy_from_payload(payload, device, use_ema=True, source=str(checkpoint_path(cfg.ckpt)))
    check_algo(cfg.algo, pretrained.config.num_inference_steps)
    cloud_frame = str(payload.get("cloud_frame") or WORLD_FRAME)
    with open_dict(cfg):
        cfg.env = acting_env_config(cfg.env, payload)
    del payload
    out = Path(str(cfg.out))
    for task in tasks:  # every task's observations checked before any task's run is written
        require_images(pretrained, task, cfg.env)
    with writer_lock(out, "sodp3d finetune"):
        summaries = []
        for task in tasks:
            run = out / task if len(tasks) > 1 else out
            summaries.append(METHODS[method](cfg, task, run, device, pretrained, cloud_frame))
        record = results_record(cfg, summaries, pretrained.config, etas)
        write_results(out, record, results_table(record))
    return record


def render(record: dict[str, Any]) -> str:
    return f"\n{results_table(record)}\n\nwrote {record['out']}/results.md and results.json"


def results_record(cfg: DictConfig, summaries: list[dict[str, Any]], pc: PolicyConfig,
                   etas: list[float]) -> dict[str, Any]:
    """What ``sodp3d report`` reads: the run's variant (seed, regulariser, init, encoder,
    U-Net) and per task the success before and after fine-tuning at each evaluation eta,
    with the learning curve."""
    return {
        "kind": "finetune",
        "metric": METRIC.format(episodes=int(cfg.eval.episodes), eta=etas[0]),
        "eval_etas": etas,
        "eval_episodes": int(cfg.eval.episodes),
        "seed": int(cfg.seed), "reg": str(cfg.algo.reg) if str(cfg.get("method", "ppo")) == "ppo" else "noise-sac",
        "method": str(cfg.get("method", "ppo")), "init": str(cfg.init), "variant": cfg.get("variant"),
        "ppo_weight": float(cfg.algo.get("ppo_weight", 1.0)),
        "advantage": str(cfg.algo.get("advantage", "reward")),
        "encoder": pc.encoder, "unet": pc.unet, "ckpt": str(cfg.ckpt),
        "env_steps": int(cfg.env_steps),
        "out": str(cfg.out),
        "tasks": summaries,
    }
