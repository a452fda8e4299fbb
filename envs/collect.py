"""The ``collect`` command: sub-optimal, multi-task point-cloud datasets into zarr.

With ``env.<suite>.image=rgb`` (or ``rgbd``) every step also records the cameras' image
(``data/image``, uint8) from the same render as its cloud, so one dataset serves the
point encoders and ``encoder=image``.

Sources (``source=<name>``, see ``SOURCES``), each a module with a ``check`` run before
anything is written and a job runner of one signature
``run_jobs(todo, settings, cfg, seed, workers)`` that yields episodes in ``todo`` order:
  * ``scripted`` (Meta-World): degraded scripted policies, ``envs/scripted_source.py``.
  * ``sac`` (any task): ``envs/sac_source.py``.
  * ``expert`` (Adroit): DAPG's trained policies, degraded like the scripted ones,
    read safely from their pickles (``expert.path``): ``envs/expert_source.py``.
What their worker processes share (seeding, the env cache) is ``envs/workers.py``.

Order and resumption: jobs run in a fixed order (episode 0 of every task, then
episode 1, ...), every episode's randomness derives from (seed, task, episode index),
and episodes are committed in that order. A re-run with the same settings skips what
is committed and appends the rest, so a killed-and-resumed collection equals an
uninterrupted one. Every episode is bounded by the episode length.

As a command: ``run(cfg)`` collects and returns a JSON-serialisable record,
``render(record)`` the text the CLI prints.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, NamedTuple

from omegaconf import DictConfig, OmegaConf

from sodp3d.data.store import EpisodeDataset, EpisodeWriter, inspect_path
from sodp3d.errors import UserError
from sodp3d.files import reraise_write_failure
from sodp3d.locks import writer_lock

from .expert_source import check_expert, expert_provenance, run_expert_jobs
from .sac_source import check_sac, run_sac_jobs
from .scripted_source import check_scripted, run_scripted_jobs
from .settings import ObsSettings, task_settings
from .tasks import resolve_tasks
from .workers import close_envs, env_for


class Source(NamedTuple):
    """A data source: ``check(tasks, cfg)`` refuses bad input before anything is written;
    ``run_jobs(todo, settings, cfg, seed, workers)`` yields one result per (task, episode
    index) of ``todo``, in that order: {"task", "index", "episode", "meta"}."""

    check: Callable[[list[str], DictConfig], None]
    run_jobs: Callable[..., Iterator[dict[str, Any]]]
    # what the dataset's attrs record of where a task's episodes come from, beyond the config
    # (the expert source: the policy file's name and sha256); extending a task must not change it
    provenance: Callable[[str, DictConfig, int], dict[str, Any]] = lambda task, cfg, n_tasks: {}


SOURCES: dict[str, Source] = {
    "scripted": Source(check_scripted, run_scripted_jobs),
    "sac": Source(check_sac, run_sac_jobs),
    "expert": Source(check_expert, run_expert_jobs, expert_provenance),
}


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return value


def preflight(settings: ObsSettings) -> dict[str, int]:
    """Build the env and render once, so a bad camera or crop fails before anything is
    written; returns the task's per-step shapes."""
    env = env_for(settings)
    env.reset(seed=0)
    space = env.observation_space
    return {
        "agent_pos_dim": int(space["agent_pos"].shape[0]),
        "state_dim": int(space["state"].shape[0]),
        "action_dim": int(env.action_space.shape[0]),
    }


def collect(cfg: DictConfig) -> dict[str, Any]:
    """Run a collection described by the ``collect`` config; returns a summary."""
    from tqdm import tqdm

    tasks = resolve_tasks(cfg.task)
    episodes = _positive_int("episodes", cfg.episodes)
    if not cfg.get("out"):
        raise UserError("no output path; pass out=<path.zarr>")
    out = str(cfg.out)
    source = str(cfg.source)
    if source not in SOURCES:
        raise UserError(f"unknown source '{source}'; valid: {', '.join(SOURCES)}")
    SOURCES[source].check(tasks, cfg)
    seed = int(cfg.seed)
    workers = _positive_int("workers", int(cfg.workers) if cfg.get("workers") is not None else 1)
    settings = {t: task_settings(t, cfg.env) for t in tasks}
    if cfg.get("episode_length") is not None:
        length = _positive_int("episode_length", cfg.episode_length)
        settings = {t: replace(s, episode_length=length) for t, s in settings.items()}
    shapes = {(s.num_points, s.channels) for s in settings.values()}
    if len(shapes) > 1:
        raise UserError(f"all tasks of one dataset need the same cloud shape (num_points, channels); got {sorted(shapes)}")
    if len({s.point_cloud for s in settings.values()}) > 1:
        raise UserError("all tasks of one dataset need the same env.<suite>.point_cloud (a cloud for every step, or none)")
    images = {s.image_shape for s in settings.values()}
    if len(images) > 1:
        raise UserError(f"all tasks of one dataset need the same image shape (or none); got "
                        f"{', '.join(sorted(str(i) for i in images))}")

    kind = inspect_path(out)
    if kind in ("dp3", "foreign"):
        raise UserError(
            f"{out} exists and is not a sodp3d dataset"
            + (" (it is a DP3-layout dataset)" if kind == "dp3" else "")
            + "; choose a new out path (or the path of a sodp3d dataset to extend it)"
        )
    # How the episodes are made; extending a dataset must not change it for a task.
    source_cfg = cfg.get(source)
    recipe = {
        "source": source,
        "seed": seed,
        source: OmegaConf.to_container(source_cfg, resolve=True) if source_cfg is not None else {},
    }
    provenance = {t: SOURCES[source].provenance(t, cfg, len(tasks)) for t in tasks}
    with writer_lock(out, "sodp3d collect"):
        return _collect_locked(cfg, out, tasks, episodes, source, seed, workers, settings, recipe, provenance)


def _collect_locked(cfg: DictConfig, out: str, tasks: list[str], episodes: int, source: str, seed: int, workers: int,
                    settings: dict[str, ObsSettings], recipe: dict[str, Any],
                    provenance: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The collection proper, with the store's writer lock held."""
    from tqdm import tqdm

    kind = inspect_path(out)  # again: another writer may have made it before the lock was ours
    if kind in ("dp3", "foreign"):
        raise UserError(f"{out} exists and is not a sodp3d dataset; choose a new out path")
    writer = EpisodeWriter.open(out) if kind == "sodp3d" else None
    dropped = writer.dropped_frames if writer is not None else 0
    if dropped:
        print(f"sodp3d collect: {out}: dropped {dropped} frames of an episode cut before its commit; "
              f"{writer.n_episodes} committed episodes kept", file=sys.stderr)
    if writer is not None:
        _check_compatible(out, writer.attrs, settings, recipe, provenance)
    try:
        dims = {t: preflight(s) for t, s in settings.items()}
        if len({tuple(d.values()) for d in dims.values()}) > 1:
            listed = "; ".join(f"{t}: " + ", ".join(f"{k} {v}" for k, v in d.items()) for t, d in dims.items())
            raise UserError(f"tasks of one dataset must share per-step shapes, and these differ ({listed}); "
                            "collect them into separate datasets")
        shape = next(iter(dims.values()))
        if writer is not None:
            old = {k: writer.attrs.get(k) for k in shape}
            if all(v is not None for v in old.values()) and old != shape:
                raise UserError(f"{out} holds steps with {old}; these tasks have {shape}; choose another out path")

        task_attrs = {t: {**s.to_dict(), **recipe, **provenance[t]} for t, s in settings.items()}
        if writer is None:
            writer = EpisodeWriter.create(out, {**_dataset_attrs(task_attrs, settings, seed), **shape})
        else:
            merged = dict(writer.attrs.get("tasks", {}))
            merged.update({t: a for t, a in task_attrs.items() if t not in merged})
            writer.update_attrs(tasks=merged)
        done = {t: 0 for t in tasks}
        for t in writer.episode_tasks():
            if t in done:
                done[t] += 1
        todo = [(t, i) for i in range(episodes) for t in tasks if i >= done[t]]
        already = sum(min(done[t], episodes) for t in tasks)
        total = episodes * len(tasks)

        bar = tqdm(total=total, initial=already, desc=f"collect {source}", unit="ep", dynamic_ncols=True)
        successes, steps, t0 = 0, 0, time.perf_counter()
        try:
            for result in SOURCES[source].run_jobs(todo, settings, cfg, seed, workers):
                try:
                    writer.append_episode(result["episode"], result["task"], result["meta"])
                except OSError as e:
                    n = writer.n_episodes
                    kept = f"its {n} committed episode{' is' if n == 1 else 's are'} intact"
                    reraise_write_failure(e, out, f"{kept}; run the same command again to continue")
                successes += int(result["meta"]["success"])
                steps += len(result["episode"]["action"])
                bar.update(1)
                bar.set_postfix(successes=successes, steps_per_s=f"{steps / (time.perf_counter() - t0):.0f}")
        finally:
            bar.close()
        return {"out": out, "new_episodes": len(todo), "skipped": already, "steps": steps,
                "seconds": time.perf_counter() - t0, "dropped_frames": dropped}
    finally:
        close_envs()


def _dataset_attrs(task_attrs: dict, settings: dict[str, ObsSettings], seed: int) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("sodp3d", "mujoco", "metaworld", "gymnasium", "gymnasium-robotics", "open3d-cpu", "open3d", "zarr", "numpy"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    first = next(iter(settings.values()))
    observations = (["point_cloud"] if first.point_cloud else []) + (["image"] if first.image else [])
    return {
        "tasks": task_attrs,
        "observations": observations + ["agent_pos", "state"],  # what each step holds besides action, reward, success
        "num_points": first.num_points,
        "channels": first.channels,
        "image": None if first.image_shape is None else list(first.image_shape),  # (H, W, C) uint8, or none
        "seed": seed,
        "versions": versions,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _check_compatible(out: str, attrs: dict, settings: dict[str, ObsSettings], recipe: dict[str, Any],
                      provenance: dict[str, dict[str, Any]]) -> None:
    """Refuse to extend a dataset with other settings. The settings and the recipe must equal
    the stored ones; a provenance record (the expert file's sha256) must equal the stored
    one where the dataset has it (datasets from before the record keep extending)."""
    stored = attrs.get("tasks", {})
    clouds = "point_cloud" in attrs.get("observations", ["point_cloud"])  # stores from before the record held clouds
    first = next(iter(settings.values()))
    if clouds != first.point_cloud:
        raise UserError(f"{out} holds {'point clouds' if clouds else 'no point clouds (state only)'}; this run asks for "
                        f"{'them' if first.point_cloud else 'none'} (env.{first.suite}.point_cloud={str(first.point_cloud).lower()}); "
                        "choose another out path")
    for task, s in settings.items():
        shape = (s.num_points, s.channels)
        if (attrs.get("num_points"), attrs.get("channels")) != shape:
            raise UserError(
                f"{out} holds clouds of {attrs.get('num_points')} points x {attrs.get('channels')} channels; "
                f"this run asks for {shape[0]} x {shape[1]}; choose another out path"
            )
        image = None if s.image_shape is None else list(s.image_shape)
        if attrs.get("image") != image:
            raise UserError(
                f"{out} holds {'no images' if attrs.get('image') is None else 'images of ' + str(attrs['image'])}; "
                f"this run asks for {'none' if image is None else image} (env.{s.suite}.image={s.image or 'null'}); "
                "choose another out path"
            )
        if task in stored:
            old = {k: v for k, v in stored[task].items() if k != "task"}
            new = {k: v for k, v in {**s.to_dict(), **recipe}.items() if k != "task"}
            absent = ObsSettings.__dataclass_fields__  # keys a store from before them lacks: their defaults
            diff = sorted([k for k in new if old.get(k, getattr(absent.get(k), "default", None)) != new[k]]
                          + [k for k, v in provenance[task].items() if k in old and old[k] != v])
            if diff:
                raise UserError(
                    f"{out} was collected for {task} with other settings ({', '.join(diff)} differ{'s' if len(diff) == 1 else ''}); "
                    "use the same settings to extend it, or another out path"
                )


# --------------------------------------------------------------------------------------
# The command: run(cfg) -> record, render(record) -> text.
def run(cfg: DictConfig) -> dict[str, Any]:
    """Collect, then describe the whole dataset: a JSON-serialisable record."""
    result = collect(cfg)
    data = EpisodeDataset(result["out"])
    return {
        "kind": "collect",
        "out": str(result["out"]),
        "new_episodes": int(result["new_episodes"]),
        "skipped": int(result["skipped"]),
        "steps": int(result["steps"]),
        "seconds": float(result["seconds"]),
        "dropped_frames": int(result["dropped_frames"]),
        "episodes": data.n_episodes,
        "total_steps": data.n_steps,
        "per_task": data.summary(),
    }


def help_text() -> str:
    """What each source's default data setting gave (for --help)."""
    return "\n".join([
        "Default data settings and what they gave (success = some step reported success):",
        "  source=scripted: noise std in [0, 1], 10% random and 20% perturbed episodes. About 80-90% of",
        "    episodes succeed; the demo, mt10-cpu and finetune-cpu were collected so (docs/results/).",
        "  source=expert: noise std in [0, 0.2], no random or perturbed episodes. 91% / 98% / 86% of door /",
        "    hammer / pen episodes succeed; pre-trained planners 44.7 / 78.7 / 34.0% (adroit-cpu-2026-12-01.md).",
        "    The noisier mix, expert.noise_std=[0.0,0.4] expert.random_share=0.1 expert.perturb_share=0.2",
        "    (39 / 63 / 61% succeed), left door and hammer planners at random level after 6,000 steps.",
        "  source=sac: the first sac.keep of a state-based SAC run (paper: 0.5 Meta-World, 0.3 Adroit).",
    ])


def render(record: dict[str, Any]) -> str:
    """What the CLI prints for a collection: the counts, then the per-task table."""
    rate = record["steps"] / max(record["seconds"], 1e-9)
    return (
        f"\n{record['episodes']} episodes, {record['total_steps']} steps in {record['out']} "
        f"({record['new_episodes']} new, {record['skipped']} already there; {rate:.0f} steps/s)\n"
        + dataset_table(record["per_task"])
    )


def dataset_table(rows: list[dict]) -> str:
    """A markdown table of per-task dataset rows (``EpisodeDataset.summary()``)."""
    lines = ["| task | episodes | steps | success rate | mean return | padded obs |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        sr = "-" if r["success_rate"] is None else f"{100 * r['success_rate']:.0f}%"
        ret = "-" if r["mean_return"] is None else f"{r['mean_return']:.1f}"
        pad = "-" if r.get("padded_observations") is None else str(r["padded_observations"])
        lines.append(f"| {r['task']} | {r['episodes']} | {r['steps']} | {sr} | {ret} | {pad} |")
    return "\n".join(lines)
