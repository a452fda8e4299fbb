"""Composing a command's config: its yaml under ``configs/``, config groups, the user's overrides.

One place for the CLI, the demo and anything else that runs commands the way a user
would. A bad override is a ``UserError``; an unknown option of a config group (``policy=huge``)
names the group's valid options.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from sodp3d.errors import UserError

# `group=option`, `+group=option` or `++group=option`: choosing a config group's option.
_GROUP_CHOICE = re.compile(r"^\+{0,2}(?P<group>[A-Za-z_][\w-]*)=(?P<option>[^\s=\[\]{},]*)$")


@cache
def config_dir() -> Path:
    from importlib.resources import files

    return Path(str(files("sodp3d.configs")))


def group_options(group: str) -> list[str]:
    """The options of a config group (its yaml files), sorted; [] if ``group`` is no group."""
    folder = config_dir() / group
    return sorted(f.stem for f in folder.glob("*.yaml")) if folder.is_dir() else []


def config_groups(name: str) -> list[tuple[str, str | None]]:
    """(group, default option) of the config groups a command's yaml composes."""
    import yaml

    defaults = yaml.safe_load((config_dir() / f"{name}.yaml").read_text()).get("defaults", [])
    return [(next(iter(d)), next(iter(d.values()))) for d in defaults if isinstance(d, dict)]


def _check_group_choices(name: str, overrides: list[str]) -> None:
    groups = {g for g, _ in config_groups(name)}
    for item in overrides:
        m = _GROUP_CHOICE.match(item.strip())
        if m is None or m["group"] not in groups:
            continue
        options = group_options(m["group"])
        if m["option"] not in options and m["option"] != "null":
            raise UserError(f"bad override {item}: unknown {m['group']} '{m['option']}'; valid: {', '.join(options)}")


def compose(name: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The command ``name``'s config (``configs/<name>.yaml``) with the user's overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides)
    _check_group_choices(name, overrides)
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base=None, job_name=f"sodp3d_{name}"):
            return hydra_compose(config_name=name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        first = " ".join(str(e).strip().split("\n")[0].split())
        raise UserError(f"bad override: {first}") from None


@cache
def _default_config(name: str) -> DictConfig:
    """A command's config without overrides, composed once (a sweep plans hundreds of runs);
    callers merge it into new configs (OmegaConf.merge copies) and never change it."""
    from omegaconf import OmegaConf

    base = compose(name)
    OmegaConf.set_struct(base, False)
    return base


def stage_config(name: str, cfg: DictConfig, section: str, extra: dict[str, Any],
                 groups: tuple[str, ...] = ()) -> DictConfig:
    """The config of command ``name`` run as a stage of a larger job (the demo, a sweep):
    its own config with the job's ``section`` and ``extra`` merged in, and the job's env
    and the named config groups put in place of the command's (replaced whole, so no key
    of the command's default group survives)."""
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(_default_config(name), OmegaConf.to_container(cfg.get(section) or {}, resolve=True), extra)
    for group in ("env",) + groups:
        merged[group] = OmegaConf.to_container(cfg[group], resolve=True)
    OmegaConf.set_struct(merged, True)
    return merged

