"""Commands as library functions: every command is ``run(cfg) -> record`` plus
``render(record) -> str``; the record is what ``results.json`` holds and the CLI prints
its rendering. Config composition: an unknown option of a config group is one line that
lists the valid ones. The code has no import circles.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from sodp3d.cli import COMMANDS, main
from sodp3d.config import compose, config_groups, group_options

ROOT = Path(__file__).resolve().parents[1]
FAST_ENV = ["env.metaworld.resolution=[32,32]", "env.metaworld.num_points=32", "env.metaworld.episode_length=16"]
TINY = ["policy=tiny", "batch_size=8", "device=cpu", "wandb.mode=disabled", "optim.warmup_steps=1", "log_every=1"]


def test_every_command_is_a_module_with_run_and_render():
    for cmd in COMMANDS.values():
        module = cmd.load()
        assert callable(module.run) and callable(module.render), cmd.name


GROUP_CASES = [(name, group) for name in COMMANDS for group, _ in config_groups(name)]


def test_group_cases_cover_every_group():
    assert {g for _, g in GROUP_CASES} == {"env", "encoder", "policy", "algo", "experiment"}


@pytest.mark.parametrize("command,group", GROUP_CASES, ids=[f"{c}-{g}" for c, g in GROUP_CASES])
def test_unknown_group_option_is_one_line_listing_the_valid_ones(command, group, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main([command, f"{group}=huge"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith(f"sodp3d {command}: error: "), err
    options = group_options(group)
    assert options and f"unknown {group} 'huge'; valid: {', '.join(options)}" in err, err
    assert not any(tmp_path.iterdir())


def test_valid_group_options_and_plain_keys_still_compose():
    cfg = compose("pretrain", ["policy=simple", "encoder=pointnet", "steps=7"])
    assert cfg.policy.unet == "simple" and cfg.encoder.name == "pointnet" and cfg.steps == 7
    assert compose("demo", ["experiment=smoke"]).name == "demo-smoke"


def test_records_are_the_results_files_and_the_cli_prints_their_rendering(tmp_path, capsys):
    from sodp3d import evaluate, pretrain
    from sodp3d.envs import collect

    data = tmp_path / "one.zarr"
    rec = collect.run(compose("collect", ["task=reach-v3", "episodes=1", f"out={data}", "workers=1", *FAST_ENV]))
    assert (rec["kind"], rec["episodes"], rec["new_episodes"]) == ("collect", 1, 1)
    assert rec["per_task"][0]["task"] == "reach-v3" and rec["total_steps"] == rec["steps"] > 0

    pre = pretrain.run(compose("pretrain", [f"data={data}", f"out={tmp_path / 'pre'}", "steps=3", *TINY]))
    assert pre["kind"] == "pretrain" and pre["steps"] == 3 and pre["loss"] is not None
    assert json.loads((tmp_path / "pre" / "results.json").read_text()) == pre
    assert "| dp3 | tiny |" in (tmp_path / "pre" / "results.md").read_text()

    overrides = [f"ckpt={tmp_path / 'pre'}", "task=reach-v3", "episodes=1", "num_envs=1", f"out={tmp_path / 'ev'}",
                 "device=cpu"]
    ev = evaluate.run(compose("eval", overrides))
    assert json.loads((tmp_path / "ev" / "results.json").read_text()) == ev
    capsys.readouterr()
    assert main(["eval", *overrides]) == 0
    printed = capsys.readouterr().out
    assert printed.strip() == evaluate.render(json.loads((tmp_path / "ev" / "results.json").read_text())).strip()


# ---------------------------------------------------------------------------------------
# No import circles: no module imports one that imports it back (function-level imports
# count too; they run the same code, only later).
PACKAGES = {"sodp3d": ROOT / "sodp3d", "sodp3d.envs": ROOT / "envs", "sodp3d.encoders": ROOT / "encoders"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = f
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return circles


def test_the_import_graph_has_no_circles():
    modules = _modules()
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    assert graph["sodp3d.cli"] and graph["sodp3d.finetune.command"]  # the graph is read at all
    assert _circles(graph) == []


def test_the_circle_finder_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
