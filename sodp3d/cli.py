"""The ``sodp3d`` command: ``sodp3d <command> [key=value ...]`` (Hydra overrides).

Composes the command's config, calls its ``run(cfg)``, prints ``render(record)``. User
errors print one line and exit with status 2; no traceback.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib import import_module

from sodp3d.config import compose, config_groups, group_options
from sodp3d.errors import UserError


@dataclass(frozen=True)
class Command:
    """A command is a module with ``run(cfg) -> record`` and ``render(record) -> str``."""

    name: str
    module: str
    summary: str
    usage: str

    def load(self):
        return import_module(self.module)


COMMANDS = {c.name: c for c in [
    Command(
        "demo", "sodp3d.demo",
        "the whole method end to end on a few tasks (collect, pre-train, fine-tune, evaluate, plots)",
        "sodp3d demo [name=demo] [task=[..]] [encoder=dp3|pointnet] [policy=tiny|simple|paper] [algo=cpu|sodp] "
        "[experiment=smoke] [reg=bc|none|kl|pl]",
    ),
    Command(
        "collect", "sodp3d.envs.collect",
        "collect a sub-optimal multi-task point-cloud dataset into zarr",
        "sodp3d collect task=<task|set|[list]> episodes=<per task> out=<path.zarr> [source=scripted|sac|expert]",
    ),
    Command(
        "pretrain", "sodp3d.pretrain",
        "pre-train the diffusion planner on datasets, reward-free",
        "sodp3d pretrain data=<zarr>[,<zarr>...] out=<run dir> [steps=..] [policy=tiny|simple|paper] "
        "[encoder=dp3|pointnet|state] [resume=true]",
    ),
    Command(
        "finetune", "sodp3d.finetune",
        "fine-tune a pre-trained planner on a task with PPO over the denoising chain plus BC",
        "sodp3d finetune ckpt=<pretrained> task=<task|set> out=<run dir> [reg=bc|none|kl|pl] "
        "[init=pretrained|scratch] [env_steps=..]",
    ),
    Command(
        "eval", "sodp3d.evaluate",
        "evaluate a checkpoint: success rate and return per task",
        "sodp3d eval ckpt=<path> task=<task|set|[list]> [episodes=50] [seeds=[0,1,2]] [out=<dir>]",
    ),
    Command(
        "viz", "sodp3d.viz",
        "draw a rollout as the policy sees it (GIF + interactive HTML), or episodes of a dataset (PNG)",
        "sodp3d viz ckpt=<checkpoint or run dir> [task=<task>] [episodes=1] [seed=0]  |  sodp3d viz data=<path.zarr>",
    ),
    Command(
        "sweep", "sodp3d.sweep",
        "run an experiment's grid (tasks x seeds x variants: collect, pretrain, finetune, eval) on Ray, then report",
        "sodp3d sweep experiment=<name> [seeds=[0,1,2]] [ray.address=auto] [max_retries=1]",
    ),
    Command(
        "report", "sodp3d.report",
        "gather runs (seeds, regularisers, encoders, tasks) into one table (mean and std) and plots",
        "sodp3d report runs=[<run dir>,...] [out=runs/report]",
    ),
]}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: sodp3d <command> [key=value ...]", "", "commands:"]
    lines += [f"  {c.name:<{width}}  {c.summary}" for c in COMMANDS.values()]
    lines += ["", "Options are Hydra overrides (key=value, task=[a,b]); `sodp3d <command> --help` lists them."]
    return "\n".join(lines)


def _command_help(cmd: Command) -> str:
    from omegaconf import OmegaConf

    cfg = compose(cmd.name, [])
    listed = [f"  {g}: {', '.join(group_options(g))}"
              + (f"  (default: {default})" if default else "") for g, default in config_groups(cmd.name)]
    text = f"usage: {cmd.usage}\n\n{cmd.summary}.\n\n"
    more = getattr(cmd.load(), "help_text", None)  # a command may say more (the sweep: its experiments)
    if more is not None:
        text += more() + "\n\n"
    if listed:
        text += "Config groups (choose with group=name):\n" + "\n".join(listed) + "\n\n"
    if any(k in cfg.keys() for k in ("task", "tasks")):
        from sodp3d.envs import task_sets

        text += ("Tasks (task=<name>, a set, or [a,b]): the 50 Meta-World v3 tasks (reach-v3, ...), "
                 "adroit-door, adroit-hammer, adroit-pen; sets " + ", ".join(task_sets()) + ".\n\n")
    return text + "Options (defaults shown; override with key=value):\n\n" + OmegaConf.to_yaml(cfg, resolve=False)


def _rank_zero() -> bool:
    """Under torchrun every process runs the command; the first one speaks for all."""
    import os

    return os.environ.get("RANK", "0") == "0"


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
        module = cmd.load()
        record = module.run(cfg)
        if _rank_zero():
            print(module.render(record))
        return 0
    except UserError as e:
        if _rank_zero():
            print(f"sodp3d {name}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"\nsodp3d {name}: interrupted; finished work is saved, run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # a write no command caught: one line with the path and the cause
        from sodp3d.files import reraise_write_failure

        try:
            reraise_write_failure(e, "(a file)", "what was saved before this write is intact")
        except UserError as line:
            if _rank_zero():
                print(f"sodp3d {name}: error: {line}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
