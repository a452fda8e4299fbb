"""``sodp3d sweep experiment=<name>``: a grid of runs (tasks x seeds x variants) on Ray.

Every run is a command a user can run by hand, called as its ``run(cfg)`` inside a Ray
task that asks for what the run uses (CPUs for its environments, a GPU or a share of
one when its device is CUDA):

    collect   one run per task of the data mixtures     -> <out>/data/<task>.zarr
    pretrain  one run per mixture and seed              -> <out>/pretrain/<mixture>-s<seed>/
              (and per encoder a variant chooses:          <out>/pretrain/<mixture>-<encoder>-s<seed>/)
    finetune  one run per variant, task and seed        -> <out>/finetune/<variant>/<task>-s<seed>/
    eval      per fine-tuning run, when eval.episodes   -> <out>/eval/<variant>/<task>-s<seed>/
    report    over the finished fine-tuning runs        -> <out>/report/

A run starts as soon as the runs it reads have finished (Ray passes their results). A
run whose results exist is not scheduled again; a killed run resumes from its
checkpoint (every command resumes); a run that raises is retried ``max_retries`` times,
then recorded as failed while the others go on. ``<out>/sweep.json`` holds every run's
state (pending, running, done, failed with its error, seconds), rewritten atomically as
they change. Ray runs locally (sized to the machine) unless ``ray.address`` names a
cluster. The sweep only schedules: no training logic lives here.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sodp3d.config import config_dir, group_options, stage_config
from sodp3d.errors import UserError
from sodp3d.files import write_text_atomic
from sodp3d.locks import writer_lock

STAGES = ("collect", "pretrain", "finetune", "eval")  # the commands a sweep schedules (sodp3d.cli.COMMANDS)
STATES = ("done", "running", "failed", "pending")


@dataclass
class Run:
    id: str                      # e.g. "finetune/bc/reach-v3-s0"
    command: str                 # collect | pretrain | finetune | eval
    dir: Path
    cfg: dict[str, Any]          # the command's whole config
    needs: list[str] = field(default_factory=list)
    cpus: float = 1.0
    gpus: float = 0.0
    state: str = "pending"       # pending | running | done | failed
    error: str | None = None
    seconds: float | None = None
    attempts: int = 0

    def row(self) -> dict[str, Any]:
        return {"id": self.id, "command": self.command, "dir": str(self.dir), "state": self.state,
                "error": self.error, "seconds": self.seconds, "attempts": self.attempts, "needs": self.needs,
                "cpus": self.cpus, "gpus": self.gpus}


# ---------------------------------------------------------------------------------------
# The grid
def _tasks(value: Any) -> list[str]:
    from sodp3d.envs import resolve_tasks

    return resolve_tasks(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)


def _positive(name: str, value: Any, zero: bool = False) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if zero else 1):
        raise UserError(f"{name} must be a{' non-negative' if zero else ' positive'} integer, got {value!r}")
    return int(value)


def _variant_overrides(name: str, settings: Any, finetune_cfg: DictConfig) -> dict[str, Any]:
    """A variant's fine-tuning overrides (dotted keys), checked against the command's config."""
    from sodp3d.finetune.regularisers import REGULARISERS

    if not isinstance(settings, dict):
        raise UserError(f"variant '{name}' must map keys to values (e.g. {{reg: bc}}), got {settings!r}")

    def flat(d: dict, prefix: str = "") -> dict[str, Any]:  # {algo: {lr: 1}} -> {algo.lr: 1}
        items: dict[str, Any] = {}
        for k, v in d.items():
            items.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return items

    out = {}
    for key, value in flat(settings).items():
        if key in ("mixture", "tasks") or key == "encoder" or key.startswith("encoder."):  # the grid's, not a run's
            continue
        if OmegaConf.select(finetune_cfg, str(key), default="__missing__") == "__missing__":
            raise UserError(f"variant '{name}' sets '{key}', which sodp3d finetune does not have "
                            "(see sodp3d finetune --help; a pre-training mixture is chosen with mixture=)")
        out[str(key)] = value
    reg = out.get("reg", out.get("algo.reg"))
    if reg is not None:  # `reg` is the command's name for algo.reg, which arrives resolved
        out["reg"] = out["algo.reg"] = reg
    if reg is not None and reg not in REGULARISERS:
        raise UserError(f"variant '{name}': unknown regulariser reg={reg}; valid: {', '.join(REGULARISERS)}")
    if out.get("init", "pretrained") not in ("pretrained", "scratch"):
        raise UserError(f"variant '{name}': unknown init '{out['init']}'; valid: pretrained, scratch")
    return out


def _variant_encoder(name: str, settings: dict, base: dict[str, Any]) -> dict[str, Any]:
    """The encoder config a variant pre-trains with: the experiment's, or the one it names
    (``encoder: image``, or ``encoder: {name: image, <option>: ...}``), from configs/encoder/."""
    chosen = settings.get("encoder")
    if chosen is None:
        return base
    chosen = {"name": chosen} if isinstance(chosen, str) else dict(chosen)
    enc_name = str(chosen.get("name", base.get("name")))
    if enc_name not in group_options("encoder"):
        raise UserError(f"variant '{name}': unknown encoder '{enc_name}'; valid: {', '.join(group_options('encoder'))}")
    own = OmegaConf.to_container(OmegaConf.load(config_dir() / "encoder" / f"{enc_name}.yaml"), resolve=True)
    return {**own, **chosen, "name": enc_name}


def sweep_dir(cfg: DictConfig) -> Path:
    """<root>/<experiment>, absolute: every stage's paths (data, checkpoints, run dirs) then
    name the same files from any Ray worker, whatever directory the worker starts in."""
    return Path(str(cfg.root)).expanduser().absolute() / str(cfg.name)


def plan(cfg: DictConfig) -> list[Run]:
    """Every run of the experiment, in an order where a run comes after the runs it needs."""
    out = sweep_dir(cfg)
    seeds = OmegaConf.to_container(cfg.seeds) if OmegaConf.is_config(cfg.seeds) else cfg.seeds
    seeds = [seeds] if isinstance(seeds, int) else list(seeds or [])
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise UserError(f"seeds must list integers, e.g. seeds=[0,1,2], got {seeds!r}")
    tasks = _tasks(cfg.task)
    ft_tasks = _tasks(cfg.finetune_task) if cfg.get("finetune_task") is not None else tasks
    per_task = cfg.get("mixtures") == "per_task"  # one model per task, on its own data (Adroit: action dims differ)
    if per_task:
        mixtures = {t: [t] for t in dict.fromkeys(tasks + ft_tasks)}
    else:
        mixtures = {str(k): _tasks(v) for k, v in (OmegaConf.to_container(cfg.mixtures) or {}).items()} \
            if cfg.get("mixtures") else {"all": tasks}
    variants = OmegaConf.to_container(cfg.variants, resolve=True) if cfg.get("variants") else {str(cfg.reg): {}}
    if not variants:
        raise UserError("variants must name at least one setting, e.g. variants={bc:{reg:bc}}")
    device, gpus = _device(cfg)
    wandb = OmegaConf.to_container(cfg.wandb, resolve=True)
    collect_extra = OmegaConf.to_container(cfg.collect_per_task, resolve=True) if cfg.get("collect_per_task") else {}

    runs: list[Run] = []
    data: dict[str, Run] = {}
    for task in dict.fromkeys(t for m in mixtures.values() for t in m):
        extra = {"task": [task], "out": str(out / "data" / f"{task}.zarr"), "seed": int(cfg.seed),
                 **(collect_extra.get(task) or {})}
        c = stage_config("collect", cfg, "collect", extra)
        if c.expert.get("path"):  # the one path a stage takes from the user: relative to where the sweep starts
            c.expert.path = str(Path(str(c.expert.path)).expanduser().absolute())
        data[task] = Run(f"collect/{task}", "collect", out / "data" / f"{task}.zarr", _plain(c),
                         cpus=float(max(1, int(c.workers))))
    runs += data.values()

    # One pre-training per mixture, seed and encoder: the experiment's encoder, and any a variant names.
    # Variants that name the same encoder settings share its pre-training.
    base_encoder = OmegaConf.to_container(cfg.encoder, resolve=True)
    encoders = {"": base_encoder}
    variant_tag: dict[str, str] = {}
    for variant, settings in variants.items():
        enc = _variant_encoder(str(variant), settings or {}, base_encoder)
        tag = next((t for t, e in encoders.items() if e == enc), None)
        if tag is None:
            tag = f"-{enc['name']}" if f"-{enc['name']}" not in encoders else f"-{variant}"
            encoders[tag] = enc
        variant_tag[str(variant)] = tag
    pretrained: dict[tuple[str, int, str], Run] = {}
    for tag, encoder in encoders.items():
        for mixture, m_tasks in mixtures.items():
            for seed in seeds:
                d = out / "pretrain" / f"{mixture}{tag}-s{seed}"
                c = stage_config("pretrain", cfg, "pretrain", {
                    "data": ",".join(str(data[t].dir) for t in m_tasks), "out": str(d), "resume": True, "seed": seed,
                    "device": device, "wandb": wandb}, groups=("encoder", "policy"))
                c.encoder = encoder
                pretrained[(mixture, seed, tag)] = Run(f"pretrain/{mixture}{tag}-s{seed}", "pretrain", d, _plain(c),
                                                       needs=[data[t].id for t in m_tasks], gpus=gpus)
    runs += pretrained.values()

    ft_base = stage_config("finetune", cfg, "finetune", {}, groups=("algo",))
    ft_cpus = _cpus(cfg, int(ft_base.num_envs))
    first = next(iter(mixtures))
    for variant, settings in variants.items():
        overrides = _variant_overrides(str(variant), settings or {}, ft_base)
        mixture = str((settings or {}).get("mixture", first))
        if per_task and "mixture" in (settings or {}):
            raise UserError(f"variant '{variant}' names a mixture; with mixtures=per_task each task is "
                            "fine-tuned from the model pre-trained on its own data")
        if mixture not in mixtures:
            raise UserError(f"variant '{variant}' pre-trains on mixture '{mixture}'; valid: {', '.join(mixtures)}")
        tag = variant_tag[str(variant)]
        only = (settings or {}).get("tasks")  # a variant fine-tuned on some of the tasks only (a longer budget, say)
        v_tasks = ft_tasks if only is None else _tasks(only)
        outside = [t for t in v_tasks if t not in ft_tasks]
        if outside:
            raise UserError(f"variant '{variant}' names tasks {outside} that the experiment does not fine-tune; "
                            f"valid: {', '.join(ft_tasks)}")
        for task in v_tasks:
            for seed in seeds:
                d = out / "finetune" / str(variant) / f"{task}-s{seed}"
                pre = pretrained[(task if per_task else mixture, seed, tag)]
                c = stage_config("finetune", cfg, "finetune", {
                    "ckpt": str(pre.dir), "task": task, "out": str(d), "resume": True, "seed": seed,
                    "device": device, "wandb": wandb, "variant": str(variant)}, groups=("algo",))
                for key, value in overrides.items():
                    OmegaConf.update(c, key, value, merge=False)
                ft = Run(f"finetune/{variant}/{task}-s{seed}", "finetune", d, _plain(c), needs=[pre.id],
                         cpus=ft_cpus, gpus=gpus)
                runs.append(ft)
                if int(cfg.eval.episodes) > 0:
                    e = out / "eval" / str(variant) / f"{task}-s{seed}"
                    ce = stage_config("eval", cfg, "eval", {
                        "ckpt": str(d), "task": task, "out": str(e), "device": device})
                    runs.append(Run(f"eval/{variant}/{task}-s{seed}", "eval", e, _plain(ce), needs=[ft.id],
                                    cpus=_cpus(cfg, int(ce.num_envs)), gpus=gpus))
    return runs


def _device(cfg: DictConfig) -> tuple[str, float]:
    """(the runs' device, GPUs each training run asks Ray for). A CUDA run gets its GPU from
    Ray, which shows it as the only one, so it acts on ``cuda``; the driver (a cluster's
    head, say) needs no GPU of its own unless the device is ``auto``."""
    name = str(cfg.device)
    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"unknown device '{name}'; use auto, cpu or cuda (Ray gives each run its own GPU)")
    if name == "auto":
        import torch

        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu", 0.0
    gpus = float(cfg.ray.gpus_per_run)
    if not 0 < gpus:
        raise UserError(f"ray.gpus_per_run must be positive with device={cfg.device}, got {gpus}")
    return "cuda", gpus


def _plain(c: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(c, resolve=True)


def _cpus(cfg: DictConfig, envs: int) -> float:
    """CPUs a run asks for: its environment processes, or ``ray.cpus_per_run``."""
    if cfg.ray.get("cpus_per_run") is not None:
        return float(cfg.ray.cpus_per_run)
    return float(max(1, envs))


def is_done(run: Run) -> bool:
    """Whether a run's results exist (so a re-run of the sweep skips it)."""
    if run.command == "collect":
        from sodp3d.data.store import EpisodeDataset, inspect_path

        if not run.dir.exists() or inspect_path(run.dir) != "sodp3d":
            return False
        task = run.cfg["task"][0]
        return sum(1 for t in EpisodeDataset(run.dir).episode_tasks if t == task) >= int(run.cfg["episodes"])
    results = run.dir / "results.json"
    if not results.is_file():
        return False
    if run.command == "pretrain":
        try:
            return int(json.loads(results.read_text()).get("steps", -1)) >= int(run.cfg["steps"])
        except (json.JSONDecodeError, OSError, TypeError, ValueError):
            return False
    return True


# ---------------------------------------------------------------------------------------
# The engine: Ray
def run_one(command: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """One run as the user would run it by hand: the command's ``run`` on its whole config."""
    from sodp3d.cli import COMMANDS

    c = OmegaConf.create(cfg)
    OmegaConf.set_struct(c, True)
    return COMMANDS[command].load().run(c)


def _execute(command: str, cfg: dict[str, Any], run_id: str, tracker, *needs: Any) -> dict[str, Any]:
    """One run, inside a Ray worker (``needs``: the results of the runs it reads, so Ray
    starts it after them)."""
    tracker.started.remote(run_id)
    t0 = time.perf_counter()
    run_one(command, cfg)
    return {"seconds": time.perf_counter() - t0}


class _Tracker:
    """Counts the attempts of each run (a Ray actor: workers tell it, the driver reads it)."""

    def __init__(self):
        self.attempts: dict[str, int] = {}

    def started(self, run_id: str) -> None:
        self.attempts[run_id] = self.attempts.get(run_id, 0) + 1

    def snapshot(self) -> dict[str, int]:
        return dict(self.attempts)


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A host:port or ray://host:port address must answer a TCP connect within seconds
    (Ray itself waits for minutes before it gives up)."""
    import socket

    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"ray.address={address} is not auto, host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise UserError(f"nothing answers at ray.address={address} ({e.strerror or type(e).__name__}); start the "
                        "cluster's head there (ray start --head), or leave ray.address unset for a local Ray") from None


def _init_ray(cfg: DictConfig):
    import ray

    address = cfg.ray.get("address")
    if address and str(address) != "auto":
        _check_reachable(str(address))
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": bool(cfg.ray.log_to_driver),
                              "configure_logging": True, "logging_level": "ERROR"}
    if address:
        kwargs["address"] = str(address)
    else:
        if cfg.ray.get("num_cpus") is not None:
            kwargs["num_cpus"] = int(cfg.ray.num_cpus)
        if cfg.ray.get("num_gpus") is not None:
            kwargs["num_gpus"] = float(cfg.ray.num_gpus)
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = " ".join(str(e).strip().split("\n")[0].split())[:300]
        raise UserError(f"could not start or reach Ray at ray.address={address or 'local'}: {first}") from None
    return ray


def _fit_requests(ray, runs: list[Run]) -> None:
    """A run asking for more CPUs than the whole cluster has would never start: it gets them
    all (its environments then share them). GPUs cannot be shared out like that."""
    have = ray.cluster_resources()
    cpus, gpus = float(have.get("CPU", 1.0)), float(have.get("GPU", 0.0))
    for r in runs:
        r.cpus = min(r.cpus, cpus)
        if r.gpus > gpus:
            ray.shutdown()
            raise UserError(f"{r.id} asks for {r.gpus:g} GPU(s) and Ray sees {gpus:g}; use device=cpu, "
                            "a smaller ray.gpus_per_run, or a cluster with GPUs (ray.address=...)")


def _error_line(e: BaseException) -> str:
    cause = getattr(e, "cause", None) or e
    text = " ".join(str(cause).strip().split("\n")[0].split()) if str(cause).strip() else ""
    return text if isinstance(cause, UserError) else f"{type(cause).__name__}: {text}"[:500]


def _counts(runs: list[Run]) -> dict[str, int]:
    return {s: sum(r.state == s for r in runs) for s in STATES}


def _write_state(path: Path, cfg: DictConfig, runs: list[Run], t0: float) -> None:
    counts = _counts(runs)
    write_text_atomic(path, json.dumps({"experiment": str(cfg.name), "seconds": time.time() - t0, "counts": counts,
                                        "runs": [r.row() for r in runs]}, indent=2))


def _previous_rows(path: Path) -> dict[str, dict[str, Any]]:
    """The rows of an earlier sweep.json, by run id; nothing if it is missing or unreadable
    (it is only a record; the run directories say what is done)."""
    try:
        return {row["id"]: row for row in json.loads(path.read_text())["runs"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def execute(cfg: DictConfig, runs: list[Run], out: Path) -> dict[str, int]:
    """Schedules the runs that are not done on Ray; returns how many were skipped and run."""
    from tqdm import tqdm

    by_id = {r.id: r for r in runs}
    before = _previous_rows(out / "sweep.json")
    for r in runs:
        if is_done(r):
            r.state = "done"
            r.seconds = before.get(r.id, {}).get("seconds")  # what it took when it ran, if recorded
            r.attempts = int(before.get(r.id, {}).get("attempts") or 0)
    todo = [r for r in runs if r.state != "done"]
    skipped = len(runs) - len(todo)
    ray = _init_ray(cfg) if todo else None  # reached before anything is written
    if ray is not None:
        _fit_requests(ray, todo)
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "sweep.json"
    t0 = time.time()
    _write_state(state_file, cfg, runs, t0)
    if ray is None:
        return {"skipped": skipped, "ran": 0}
    try:
        tracker = ray.remote(num_cpus=0)(_Tracker).remote()
        task = ray.remote(_execute)
        refs: dict[str, Any] = {}
        for r in todo:  # in plan order: a run's needs were submitted before it
            needs = [refs[n] for n in r.needs if n in refs]
            refs[r.id] = task.options(num_cpus=r.cpus, num_gpus=r.gpus, max_retries=int(cfg.max_retries),
                                      retry_exceptions=True, name=r.id).remote(r.command, r.cfg, r.id, tracker, *needs)
        pending = {ref: rid for rid, ref in refs.items()}
        bar = tqdm(total=len(runs), initial=skipped, desc=f"sweep {cfg.name}", unit="run", dynamic_ncols=True)
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                changed = False
                for ref in ready:
                    r = by_id[pending.pop(ref)]
                    try:
                        r.seconds = float(ray.get(ref)["seconds"])
                        r.state = "done"
                        r.attempts = max(r.attempts, 1)
                    except Exception as e:  # noqa: BLE001 - a run's failure is recorded, the others go on
                        failed_need = next((n for n in r.needs if by_id[n].state == "failed"), None)
                        r.state = "failed"
                        r.error = f"not run: needs {failed_need}, which failed" if failed_need else _error_line(e)
                    bar.update(1)
                    changed = True
                for rid, attempts in ray.get(tracker.snapshot.remote()).items():
                    if by_id[rid].attempts != attempts:
                        by_id[rid].attempts, changed = attempts, True
                    if by_id[rid].state == "pending":
                        by_id[rid].state, changed = "running", True
                if changed:
                    _write_state(state_file, cfg, runs, t0)
                    bar.set_postfix(_counts(runs))
        finally:
            bar.close()
    finally:
        ray.shutdown()
    _write_state(state_file, cfg, runs, t0)
    return {"skipped": skipped, "ran": len(todo)}


# ---------------------------------------------------------------------------------------
# The command
def run(cfg: DictConfig) -> dict[str, Any]:
    """Plans the experiment's grid, runs what is not done on Ray, and reports (holding the
    root's writer lock: a second sweep of the same experiment is refused)."""
    if cfg.get("name") is None:
        raise UserError("no experiment; pass experiment=<name> (see sodp3d sweep --help)")
    _positive("max_retries", cfg.max_retries, zero=True)
    runs = plan(cfg)  # every bad name or setting is found here, before anything is written
    out = sweep_dir(cfg)
    with writer_lock(out, "sodp3d sweep"):
        return _run_locked(cfg, runs, out)


def _run_locked(cfg: DictConfig, runs: list[Run], out: Path) -> dict[str, Any]:
    from sodp3d import report

    counts = execute(cfg, runs, out)
    finished = [str(r.dir) for r in runs if r.command in ("finetune", "eval") and r.state == "done"]
    failed = [{"id": r.id, "error": r.error} for r in runs if r.state == "failed"]
    files: list[str] = [str(out / "sweep.json")]
    control = cfg.get("control")
    variants = list(cfg.get("variants") or {})
    if control and control not in variants:  # e.g. a grid run with its control left out ('~variants.<control>')
        print(f"control={control} is not among this grid's variants ({', '.join(variants) or 'no fine-tuning'}); "
              "the report pairs no variant with it")
        control = None
    if finished:
        rep = report.run(OmegaConf.create({"runs": finished, "out": str(out / "report"), "failed": failed,
                                           "control": control}), appendix=stage_times(runs))
        files += rep["files"]
    return {"kind": "sweep", "experiment": str(cfg.name), "out": str(out), "runs": len(runs),
            "done": sum(r.state == "done" for r in runs), "failed": failed, "skipped": counts["skipped"],
            "ran": counts["ran"], "files": files}


def stage_times(runs: list[Run]) -> str:
    """A markdown table of the wall-clock per stage: over the done runs of each command that
    recorded their time, the median and range of a run's minutes, and their sum."""
    lines = ["", "Wall-clock per stage (minutes per run; a run resumed after a stop counts its last "
             "attempt only):", "", "| stage | runs | median | min - max | sum |", "|---|---:|---:|---:|---:|"]
    for command in dict.fromkeys(r.command for r in runs):
        minutes = [r.seconds / 60 for r in runs if r.command == command and r.state == "done" and r.seconds is not None]
        if minutes:
            lines.append(f"| {command} | {len(minutes)} | {statistics.median(minutes):.1f} | "
                         f"{min(minutes):.1f} - {max(minutes):.1f} | {sum(minutes):.1f} |")
    return "\n".join(lines)


def render(record: dict[str, Any]) -> str:
    lines = [f"\nsweep {record['experiment']}: {record['done']} of {record['runs']} runs done "
             f"({record['skipped']} were done already), {len(record['failed'])} failed"]
    lines += [f"  failed {f['id']}: {f['error']}" for f in record["failed"]]
    return "\n".join(lines + ["", "wrote " + ", ".join(record["files"])])


def help_text() -> str:
    """The shipped experiments with their axes and number of runs (for --help)."""
    from sodp3d.config import compose, group_options

    lines = ["Experiments (experiment=<name>):"]
    for name in group_options("experiment"):
        try:
            cfg = compose("sweep", [f"experiment={name}"])
            runs = plan(cfg)
        except UserError as e:
            lines.append(f"  {name}: ({e})")
            continue
        by = {s: sum(r.command == s for r in runs) for s in STAGES}
        variants = ", ".join(OmegaConf.to_container(cfg.variants)) if cfg.get("variants") else str(cfg.reg)
        seeds = list(cfg.seeds) if OmegaConf.is_config(cfg.seeds) else cfg.seeds
        ft = _tasks(cfg.finetune_task) if cfg.get("finetune_task") is not None else _tasks(cfg.task)
        lines.append(f"  {name}: {len(runs)} runs ({', '.join(f'{n} {s}' for s, n in by.items() if n)}); "
                     f"seeds {seeds}; variants {variants}; fine-tuned tasks {', '.join(ft)}")
    return "\n".join(lines)
