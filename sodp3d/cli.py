"""The ``sodp3d`` command: ``sodp3d <command> [key=value ...]`` (Hydra overrides).

User errors print one line and exit with status 2; no traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sodp3d.errors import UserError


@dataclass(frozen=True)
class Command:
    name: str
    summary: str
    run: Callable
    usage: str


def _run_collect(cfg) -> int:
    from sodp3d.data.store import EpisodeDataset
    from sodp3d.envs.collect import collect

    result = collect(cfg)
    data = EpisodeDataset(result["out"])
    print(f"\n{data.n_episodes} episodes, {data.n_steps} steps in {result['out']} "
          f"({result['new_episodes']} new, {result['skipped']} already there; "
          f"{result['steps'] / max(result['seconds'], 1e-9):.0f} steps/s)")
    print(format_table(data.summary()))
    return 0


def _run_pretrain(cfg) -> int:
    from sodp3d.pretrain import pretrain

    r = pretrain(cfg)
    print(f"\npre-trained {r['steps']} steps ({r['params'] / 1e6:.2f}M parameters, {r['windows']} windows) "
          f"in {r['seconds']:.0f} s; checkpoint: {r['checkpoint']}")
    return 0


def _run_eval(cfg) -> int:
    from pathlib import Path

    from omegaconf import OmegaConf

    from sodp3d.checkpoint import acting_env_config, checkpoint_path, policy_from_checkpoint
    from sodp3d.envs import resolve_tasks
    from sodp3d.evaluate import evaluate, results_markdown, write_results
    from sodp3d.pretrain import resolve_device

    if cfg.get("ckpt") in (None, "???"):
        raise UserError("no checkpoint; pass ckpt=<file or run dir>")
    ckpt = checkpoint_path(cfg.ckpt)
    if str(cfg.metric) not in ("final", "top5"):
        raise UserError(f"unknown metric '{cfg.metric}'; valid: final, top5")
    if cfg.metric == "top5":
        from sodp3d.evaluate import read_history, top_k_average

        run = ckpt.parent.parent
        results = top_k_average(read_history(run / "evals.jsonl"), 5)
        results["checkpoint"] = str(ckpt)
        js, md = write_results(results, Path(str(cfg.out)) if cfg.get("out") else run / "eval-top5", "Evaluation (DP3 top-5)")
        print("\n" + results_markdown(results, "Evaluation (DP3 top-5)"))
        print(f"\nwrote {js} and {md}")
        return 0
    tasks = resolve_tasks(cfg.task if cfg.get("task") != "???" else None)
    seeds = OmegaConf.to_container(cfg.seeds) if not isinstance(cfg.seeds, int) else [cfg.seeds]
    if not isinstance(cfg.episodes, int) or not isinstance(cfg.num_envs, int) or cfg.num_envs <= 0:
        raise UserError(f"episodes and num_envs must be positive integers, got {cfg.episodes!r}, {cfg.num_envs!r}")
    policy, payload = policy_from_checkpoint(ckpt, device=resolve_device(str(cfg.device)), use_ema=bool(cfg.use_ema))
    sampler = None if cfg.get("eta") is None else policy.ddim(float(cfg.eta), float(cfg.min_std))
    results = evaluate(policy, tasks, cfg.episodes, [int(s) for s in seeds], cfg.num_envs,
                       acting_env_config(cfg.env, payload), sampler=sampler)
    results.update({"kind": "eval", "checkpoint": str(ckpt), "encoder": policy.config.encoder,
                    "unet": policy.config.unet})
    out = Path(str(cfg.out)) if cfg.get("out") else ckpt.parent.parent / "eval"
    js, md = write_results(results, out)
    print("\n" + results_markdown(results))
    print(f"\nwrote {js} and {md}")
    return 0


def _run_finetune(cfg) -> int:
    from sodp3d.finetune import finetune

    r = finetune(cfg)
    print("\n" + r["table"])
    print(f"\nwrote {r['out']}/results.md and results.json")
    return 0


def _run_demo(cfg) -> int:
    from sodp3d.demo import demo

    r = demo(cfg)
    print("\n" + r["table"])
    print(f"\neverything is in {r['run']}/: results.md, results.json, curves.png, rollout.gif, rollout.html, "
          "dataset.png, config.yaml, data.zarr, pretrain/, finetune/")
    return 0


def _run_viz(cfg) -> int:
    from sodp3d.viz import viz

    r = viz(cfg)
    if r["kind"] == "data":
        print("| episode | task | steps | success | return |\n|---:|---|---:|---|---:|")
        for row in r["rows"]:
            ok = "-" if row["success"] is None else ("yes" if row["success"] else "no")
            ret = "-" if row["return"] is None else f"{row['return']:.1f}"
            print(f"| {row['episode']} | {row['task']} | {row['steps']} | {ok} | {ret} |")
    else:
        print("| task | seed | steps | success | return |\n|---|---:|---:|---|---:|")
        for row in r["rows"]:
            print(f"| {row['task']} | {row['seed']} | {row['steps']} | {'yes' if row['success'] else 'no'} "
                  f"| {row['return']:.1f} |")
    print("\nwrote " + ", ".join(r["files"]))
    return 0


def _run_report(cfg) -> int:
    from sodp3d.report import report

    r = report(cfg)
    print(r["text"])
    print("\nwrote " + ", ".join(r["files"]))
    return 0


def format_table(rows: list[dict]) -> str:
    """A markdown table of per-task dataset rows."""
    lines = ["| task | episodes | steps | success rate | mean return | padded obs |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        sr = "-" if r["success_rate"] is None else f"{100 * r['success_rate']:.0f}%"
        ret = "-" if r["mean_return"] is None else f"{r['mean_return']:.1f}"
        pad = "-" if r.get("padded_observations") is None else str(r["padded_observations"])
        lines.append(f"| {r['task']} | {r['episodes']} | {r['steps']} | {sr} | {ret} | {pad} |")
    return "\n".join(lines)


COMMANDS = {
    "demo": Command(
        "demo",
        "the whole method end to end on a few tasks (collect, pre-train, fine-tune, evaluate, plots)",
        _run_demo,
        "sodp3d demo [name=demo] [task=[..]] [encoder=dp3|pointnet] [policy=tiny|simple|paper] [algo=cpu|sodp] "
        "[experiment=smoke] [reg=bc|none|kl|pl]",
    ),
    "collect": Command(
        "collect",
        "collect a sub-optimal multi-task point-cloud dataset into zarr",
        _run_collect,
        "sodp3d collect task=<task|set|[list]> episodes=<per task> out=<path.zarr> [source=scripted|sac]",
    ),
    "pretrain": Command(
        "pretrain",
        "pre-train the diffusion planner on datasets, reward-free",
        _run_pretrain,
        "sodp3d pretrain data=<zarr>[,<zarr>...] out=<run dir> [steps=..] [policy=tiny|simple|paper] "
        "[encoder=dp3|pointnet|state] [resume=true]",
    ),
    "finetune": Command(
        "finetune",
        "fine-tune a pre-trained planner on a task with PPO over the denoising chain plus BC",
        _run_finetune,
        "sodp3d finetune ckpt=<pretrained> task=<task|set> out=<run dir> [reg=bc|none|kl|pl] "
        "[init=pretrained|scratch] [env_steps=..]",
    ),
    "eval": Command(
        "eval",
        "evaluate a checkpoint: success rate and return per task",
        _run_eval,
        "sodp3d eval ckpt=<path> task=<task|set|[list]> [episodes=50] [seeds=[0,1,2]] [out=<dir>]",
    ),
    "viz": Command(
        "viz",
        "draw a rollout as the policy sees it (GIF + interactive HTML), or episodes of a dataset (PNG)",
        _run_viz,
        "sodp3d viz ckpt=<checkpoint or run dir> [task=<task>] [episodes=1] [seed=0]  |  sodp3d viz data=<path.zarr>",
    ),
    "report": Command(
        "report",
        "gather runs (seeds, regularisers, encoders, tasks) into one table (mean and std) and plots",
        _run_report,
        "sodp3d report runs=[<run dir>,...] [out=runs/report]",
    ),
}


def config_dir() -> Path:
    from importlib.resources import files

    return Path(str(files("sodp3d.configs")))


def compose(name: str, overrides: list[str]):
    """The command's config with the user's overrides; bad overrides are user errors."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base=None, job_name=f"sodp3d_{name}"):
            return hydra_compose(config_name=name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        first = " ".join(str(e).strip().split("\n")[0].split())
        raise UserError(f"bad override: {first}") from None


def config_groups(name: str) -> list[tuple[str, str | None]]:
    """(group, default option) of the config groups a command's yaml composes."""
    import yaml

    defaults = yaml.safe_load((config_dir() / f"{name}.yaml").read_text()).get("defaults", [])
    return [(next(iter(d)), next(iter(d.values()))) for d in defaults if isinstance(d, dict)]


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: sodp3d <command> [key=value ...]", "", "commands:"]
    lines += [f"  {c.name:<{width}}  {c.summary}" for c in COMMANDS.values()]
    lines += ["", "Options are Hydra overrides (key=value, task=[a,b]); `sodp3d <command> --help` lists them."]
    return "\n".join(lines)


def _command_help(cmd: Command) -> str:
    from omegaconf import OmegaConf

    cfg = compose(cmd.name, [])
    listed = [f"  {g}: {', '.join(sorted(f.stem for f in (config_dir() / g).glob('*.yaml')))}"
              + (f"  (default: {default})" if default else "") for g, default in config_groups(cmd.name)]
    text = f"usage: {cmd.usage}\n\n{cmd.summary}.\n\n"
    if listed:
        text += "Config groups (choose with group=name):\n" + "\n".join(listed) + "\n\n"
    if any(k in cfg.keys() for k in ("task", "tasks")):
        from sodp3d.envs import task_sets

        text += ("Tasks (task=<name>, a set, or [a,b]): the 50 Meta-World v3 tasks (reach-v3, ...), "
                 "adroit-door, adroit-hammer, adroit-pen; sets " + ", ".join(task_sets()) + ".\n\n")
    return text + "Options (defaults shown; override with key=value):\n\n" + OmegaConf.to_yaml(cfg, resolve=False)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    cmd = COMMANDS.get(name)
    try:
        if cmd is None:
            raise UserError(f"unknown command '{name}'; valid: {', '.join(COMMANDS)}")
        if any(a in ("-h", "--help") for a in rest):
            print(_command_help(cmd))
            return 0
        if "--cfg" in rest:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(compose(name, [a for a in rest if a != "--cfg"])))
            return 0
        bad = [a for a in rest if a.startswith("-")]
        if bad:
            raise UserError(f"unknown flag {bad[0]}; options are key=value overrides (see sodp3d {name} --help)")
        cfg = compose(name, rest)
        return int(cmd.run(cfg) or 0)
    except UserError as e:
        print(f"sodp3d {name}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"\nsodp3d {name}: interrupted; finished work is saved, run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
