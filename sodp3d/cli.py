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
    "collect": Command(
        "collect",
        "collect a sub-optimal multi-task point-cloud dataset into zarr",
        _run_collect,
        "sodp3d collect task=<task|set|[list]> episodes=<per task> out=<path.zarr> [source=scripted|sac]",
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


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: sodp3d <command> [key=value ...]", "", "commands:"]
    lines += [f"  {c.name:<{width}}  {c.summary}" for c in COMMANDS.values()]
    lines += ["", "Options are Hydra overrides (key=value, task=[a,b]); `sodp3d <command> --help` lists them."]
    return "\n".join(lines)


def _command_help(cmd: Command) -> str:
    from omegaconf import OmegaConf

    cfg = compose(cmd.name, [])
    return f"usage: {cmd.usage}\n\n{cmd.summary}.\n\nOptions (defaults shown; override with key=value):\n\n" + OmegaConf.to_yaml(
        cfg, resolve=False
    )


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


if __name__ == "__main__":
    sys.exit(main())
