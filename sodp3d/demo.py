"""``sodp3d demo``: the whole method end to end, on one machine, in one directory.

    collect   sub-optimal scripted episodes of several tasks      -> data.zarr
    pretrain  one planner on their union, reward-free              -> pretrain/
    finetune  per task: evaluate, PPO + BC, evaluate again         -> finetune/<task>/
    report    table, learning curves, a point-cloud rollout        -> results.*, curves.png, rollout.*

Every stage calls its command's own ``run(cfg)``, on that command's config with the
demo's sections merged in; a re-run (``resume=true``) continues from the last
finished work of each stage.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sodp3d.config import stage_config
from sodp3d.errors import UserError
from sodp3d.files import write_text_atomic
from sodp3d.locks import writer_lock
from sodp3d.runs import refuse_existing, resolve_device, results_table, write_config, write_results


def _stage(label: str) -> None:
    print(f"\n== {label}", flush=True)


def demo_paths(cfg: DictConfig) -> dict[str, Path]:
    run = Path(str(cfg.root)) / str(cfg.name)
    return {"run": run, "data": run / "data.zarr", "pretrain": run / "pretrain", "finetune": run / "finetune"}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Runs the four stages; returns the record (also ``results.json``). A user error before
    any data exists leaves no run directory."""
    run = demo_paths(cfg)["run"]
    with writer_lock(run, "sodp3d demo"):
        fresh = not run.exists()
        try:
            return _demo(cfg)
        except UserError:
            if fresh and run.exists() and not demo_paths(cfg)["data"].exists():
                shutil.rmtree(run)
            raise


def _demo(cfg: DictConfig) -> dict[str, Any]:
    from sodp3d import finetune, pretrain
    from sodp3d.envs import collect, resolve_tasks
    from sodp3d.plots import finetune_curves

    tasks = resolve_tasks(cfg.task)
    ft_tasks = resolve_tasks(cfg.finetune_task) if cfg.get("finetune_task") is not None else tasks
    paths = demo_paths(cfg)
    run = paths["run"]
    refuse_existing(run, run.exists() and any(run.iterdir()), bool(cfg.resume), "a demo", "another name=")
    run.mkdir(parents=True, exist_ok=True)
    write_config(run, cfg)
    timing_file = run / "seconds.json"  # per stage, summed over resumed invocations
    seconds: dict[str, float] = json.loads(timing_file.read_text()) if timing_file.exists() else {}

    def timed(stage: str, t0: float) -> None:
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - t0
        write_text_atomic(timing_file, json.dumps(seconds))

    wandb = OmegaConf.to_container(cfg.wandb, resolve=True)

    _stage(f"1/4 collect: {len(tasks)} tasks x {cfg.collect.episodes} sub-optimal episodes ({cfg.collect.source})")
    t0 = time.perf_counter()
    data = collect.run(stage_config("collect", cfg, "collect",
                                   {"task": tasks, "out": str(paths["data"]), "seed": int(cfg.seed)}))
    timed("collect", t0)
    print(collect.dataset_table(data["per_task"]))

    _stage(f"2/4 pre-train: {cfg.policy.unet} U-Net + {cfg.encoder.name} encoder, {cfg.pretrain.steps} steps, reward-free")
    t0 = time.perf_counter()
    pre = pretrain.run(stage_config("pretrain", cfg, "pretrain", {
        "data": str(paths["data"]), "out": str(paths["pretrain"]), "resume": True, "seed": int(cfg.seed),
        "device": str(cfg.device), "wandb": wandb}, groups=("encoder", "policy")))
    timed("pretrain", t0)
    print(f"pre-trained {pre['steps']} steps ({pre['params'] / 1e6:.2f}M parameters)")

    _stage(f"3/4 fine-tune (reg={cfg.reg}) on {', '.join(ft_tasks)}: evaluate, PPO + {cfg.reg}, evaluate again")
    t0 = time.perf_counter()
    ft_cfg = stage_config("finetune", cfg, "finetune", {
        "ckpt": str(paths["pretrain"]), "task": ft_tasks, "out": str(paths["finetune"]), "resume": True,
        "seed": int(cfg.seed), "device": str(cfg.device), "reg": str(cfg.reg), "init": "pretrained", "wandb": wandb},
        groups=("algo",))
    ft = finetune.run(ft_cfg)
    timed("finetune", t0)

    _stage("4/4 results, learning curves and a point-cloud rollout")
    t0 = time.perf_counter()
    results = dict(ft)
    results.update({"demo": str(cfg.name), "run": str(run), "pretrain_tasks": tasks, "pretrain_steps": pre["steps"],
                    "dataset": {"episodes": data["episodes"], "steps": data["total_steps"], "per_task": data["per_task"]}})
    files = {"curves": finetune_curves(ft["tasks"], run / "curves.png",
                                       title=f"fine-tuning (reg={cfg.reg}), {cfg.name}")}
    files.update(_rollout(cfg, paths, ft_tasks[0]))
    from sodp3d.viz import dataset_figure

    files["dataset"], _ = dataset_figure(paths["data"], run / "dataset.png", episodes=min(2 * len(tasks), 6))
    timed("report", t0)
    results["seconds"] = seconds
    results["files"] = {k: str(v) for k, v in files.items()}
    write_results(run, results, demo_table(results))  # kind "finetune": report reads it as one
    return results


def render(record: dict[str, Any]) -> str:
    return (f"\n{demo_table(record)}\n\neverything is in {record['run']}/: results.md, results.json, curves.png, "
            "rollout.gif, rollout.mp4, rollout.html, dataset.png, config.yaml, data.zarr, pretrain/, finetune/")


def _rollout(cfg: DictConfig, paths: dict[str, Path], task: str) -> dict[str, Path]:
    """The fine-tuned policy's episode on the first fine-tuned task, as GIF, MP4 and HTML."""
    from sodp3d.checkpoint import acting_env_config, policy_from_checkpoint
    from sodp3d.viz import record_rollout, write_rollout

    ft_dir = paths["finetune"] / task if (paths["finetune"] / task).is_dir() else paths["finetune"]
    policy, payload = policy_from_checkpoint(ft_dir / "checkpoints" / "latest.ckpt", device=resolve_device(str(cfg.device)))
    record = record_rollout(policy, task, acting_env_config(cfg.env, payload), int(cfg.viz.seed))
    return {f"rollout_{kind}": path for kind, path in write_rollout(record, paths["run"] / "rollout").items()}


def demo_table(results: dict[str, Any]) -> str:
    """The fine-tuning table without the run columns (one regulariser, one budget), and the time."""
    lines = [results_table(results, run_columns=False)]
    s = results.get("seconds", {})
    if s:
        lines += ["", "Time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in s.items())
                  + f"; {sum(s.values()) / 60:.1f} min in all."]
    return "\n".join(lines)
