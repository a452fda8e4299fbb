"""Reward-free multi-task pre-training (the paper's first stage).

Trains the denoising loss (eq. 7) on the union of datasets, reading observations and
actions only. AdamW, lr 1e-4 with warm-up and cosine decay, batch 256, EMA of the
weights (the paper's defaults; all overridable). Checkpoints are atomic; ``resume=true``
continues after a kill with the same step count, optimiser, scheduler, EMA and RNG
state, so a resumed run takes the same next step as an uninterrupted one.

Validation (``val_ratio`` > 0, as DP3 and Diffusion Policy): per task, round(val_ratio x
its episodes) episodes (at most all but one) are held out, drawn from the seed; no
training window touches them. Every ``val_every`` steps and at the end, the same
denoising loss is computed on their windows (no grad, the training weights in eval mode,
the same noise and diffusion steps every time, so values are comparable), logged as
``val_loss`` and kept in the checkpoint and the results. The normaliser is fitted on all
data, as in Diffusion Policy.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from sodp3d.checkpoint import load_checkpoint, save_checkpoint
from sodp3d import distributed
from sodp3d.data.windows import WindowDataset
from sodp3d.errors import UserError
from sodp3d.files import last_good, reraise_write_failure
from sodp3d.locks import writer_lock
from sodp3d.normalizer import MinMaxNormalizer
from sodp3d.policy import DiffusionPolicy, PolicyConfig
from sodp3d.runs import RunLogger, adam_kwargs, keep_host_memory, refuse_existing, resolve_device, write_config, write_results

# Per suite: horizon Tp, observed To, executed Ta (REFERENCE section 1).
HORIZONS = {"metaworld": (12, 2, 8), "adroit": (4, 2, 3)}


def parse_paths(data: Any) -> list[str]:
    if data is None or data == "???":
        raise UserError("no dataset given; pass data=<path.zarr>[,<path.zarr>...]")
    items = [data] if isinstance(data, str) else list(data)
    paths = [p.strip() for item in items for p in str(item).split(",") if p.strip()]
    if not paths:
        raise UserError("no dataset given; pass data=<path.zarr>[,<path.zarr>...]")
    return paths


def _suite_of_data(paths: list[str]) -> str:
    from sodp3d.data.store import EpisodeDataset

    suites = set()
    for p in paths:
        tasks = EpisodeDataset(p).attrs.get("tasks", {})
        suites |= {t.get("suite") for t in tasks.values() if isinstance(t, dict) and t.get("suite")}
    return suites.pop() if len(suites) == 1 else "metaworld"


def horizons(cfg: DictConfig, suite: str) -> tuple[int, int, int]:
    """(Tp, To, Ta): the suite's defaults unless the config sets them."""
    defaults = HORIZONS[suite]
    keys = ("horizon", "n_obs_steps", "n_action_steps")
    return tuple(int(cfg[k]) if cfg.get(k) is not None else d for k, d in zip(keys, defaults))  # type: ignore[return-value]


def policy_config(cfg: DictConfig, shape_meta: dict[str, list[int]], suite: str) -> PolicyConfig:
    Tp, To, Ta = horizons(cfg, suite)
    enc = OmegaConf.to_container(cfg.encoder, resolve=True)
    pol = OmegaConf.to_container(cfg.policy, resolve=True)
    return PolicyConfig(
        shape_meta=shape_meta,
        horizon=Tp,
        n_obs_steps=To,
        n_action_steps=Ta,
        encoder=str(enc.pop("name")),
        encoder_kwargs=enc,
        unet=str(pol.get("unet")),
        unet_kwargs=dict(pol.get("unet_kwargs") or {}),
        num_train_steps=int(pol.get("num_train_steps", 100)),
        beta_schedule=str(pol.get("beta_schedule", "cosine")),
        prediction_type=str(pol.get("prediction_type", "epsilon")),
        num_inference_steps=int(pol.get("num_inference_steps", 10)),
        eta=float(pol.get("eta", 0.0)),
    )


def ema_decay(num_averaged: int, power: float = 0.75, max_decay: float = 0.9999) -> float:
    """EMA with warm-up (as Diffusion Policy): decay = 1 - (1 + n)^-power, capped."""
    return min(max_decay, 1.0 - (1.0 + num_averaged) ** -power)


def ema_multi_avg_fn(power: float = 0.75, max_decay: float = 0.9999):
    """The EMA step on all tensors of one device and dtype at once (one foreach lerp):
    averaged <- decay * averaged + (1 - decay) * current."""

    def fn(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        torch._foreach_lerp_(averaged, current, 1.0 - ema_decay(int(num_averaged), power, max_decay))

    return fn


def lr_lambda(warmup: int, total: int):
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return fn


OPTIMIZERS = ("adamw", "sgd")


def optimizer_name(o: DictConfig) -> str:
    name = str(o.get("name", "adamw"))
    if name not in OPTIMIZERS:
        raise UserError(f"unknown optim.name={name}; valid: {', '.join(OPTIMIZERS)}")
    return name


def make_optimizer(params, o: DictConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (the paper's), or SGD with momentum: its step is linear in the gradients, so two
    runs whose gradients differ only by floating-point rounding stay as close as their
    gradients (Adam divides by the root of the squared gradient, and turns a rounding
    difference in a near-zero gradient into an lr-sized step)."""
    if optimizer_name(o) == "sgd":
        return torch.optim.SGD(params, lr=float(o.lr), momentum=float(o.get("momentum", 0.9)),
                               weight_decay=float(o.weight_decay))
    return torch.optim.AdamW(params, lr=float(o.lr), betas=tuple(o.betas), weight_decay=float(o.weight_decay),
                             **adam_kwargs(device))


PRECISIONS = ("fp32", "bf16")


def precision(cfg: DictConfig) -> str:
    """The training step's precision: fp32, or bf16 autocast around the loss's forward (for
    GPUs; on a CPU it pays only where the CPU has native bf16)."""
    p = str(cfg.get("precision", "fp32"))
    if p not in PRECISIONS:
        raise UserError(f"unknown precision={p}; valid: {', '.join(PRECISIONS)}")
    return p


class Trainer:
    """Owns the optimiser, schedule, EMA and RNGs; the policy owns only its loss.

    With several processes (``ranks``), every rank draws the same global batch and keeps
    its rows; DistributedDataParallel averages the gradients, so each rank takes the step
    one process would take on the whole batch, and the weights stay equal on all ranks."""

    def __init__(self, policy: DiffusionPolicy, cfg: DictConfig, device: torch.device,
                 ranks: distributed.Ranks = distributed.Ranks()):
        self.policy = policy.to(device)
        self.device = device
        self.ranks = ranks
        self.loss_fn = distributed.loss_module(ranks, self.policy, device)
        o = cfg.optim
        self.optimizer = make_optimizer(policy.parameters(), o, device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(int(o.warmup_steps), int(cfg.steps)))
        self.ema = torch.optim.swa_utils.AveragedModel(
            policy, multi_avg_fn=ema_multi_avg_fn(float(cfg.ema.power), float(cfg.ema.max_decay)), use_buffers=True
        )
        self.grad_clip = float(o.grad_clip) if o.get("grad_clip") else None
        self.bf16 = precision(cfg) == "bf16"
        self.step = 0
        self.rng = np.random.default_rng(int(cfg.seed))
        self.torch_gen = torch.Generator(device=device).manual_seed(int(cfg.seed))

    def train_step(self, dataset: WindowDataset, batch_size: int) -> float:
        batch = dataset.sample(batch_size, self.rng)
        self.policy.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.loss_fn(batch, self.torch_gen, self.ranks.rows(batch_size))
        batch_loss = distributed.mean(self.ranks, loss)  # the same on every rank, so all stop alike
        if not torch.isfinite(batch_loss):
            raise FloatingPointError(f"loss is {batch_loss.item()} at step {self.step}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update_parameters(self.policy)
        self.step += 1
        return float(batch_loss.item())

    def state(self) -> dict[str, Any]:
        return {
            "policy": self.policy.state_dict(),
            "ema": self.ema.state_dict(),
            "ema_policy": self.ema.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "rng": self.rng.bit_generator.state,
            "torch_gen": self.torch_gen.get_state(),
        }

    def load(self, payload: dict[str, Any]) -> None:
        self.policy.load_state_dict(payload["policy"], strict=True)
        self.ema.load_state_dict(payload["ema"], strict=True)
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.step = int(payload["step"])
        self.rng.bit_generator.state = payload["rng"]
        self.torch_gen.set_state(payload["torch_gen"].cpu())  # generator states are CPU byte tensors


def held_out_episodes(dataset: WindowDataset, ratio: float, seed: int) -> dict[str, list[int]]:
    """Per dataset path, the episodes held out for validation: per task, round(ratio x n)
    of its n episodes (halves up), at most n - 1 so every task keeps one to train on,
    drawn with ``seed`` (tasks in sorted order). A store without task names is one task."""
    rng = np.random.default_rng(int(seed))
    held: dict[str, list[int]] = {}
    for s in dataset.sources:
        data = s["data"]
        by_task: dict[str, list[int]] = {}
        for i, task in enumerate(data.episode_tasks or [""] * data.n_episodes):
            by_task.setdefault(task, []).append(i)
        chosen: list[int] = []
        for task in sorted(by_task):
            episodes = by_task[task]
            k = min(int(math.floor(ratio * len(episodes) + 0.5)), len(episodes) - 1)
            if k > 0:
                chosen += rng.choice(episodes, size=k, replace=False).tolist()
        if chosen:
            held[s["path"]] = sorted(int(e) for e in chosen)
    return held


def split_windows(dataset: WindowDataset, held: dict[str, list[int]]) -> tuple[WindowDataset, WindowDataset]:
    """(training windows, validation windows): a window belongs to the episode it was cut
    from (its steps never leave it), so held-out episodes are in no training window."""
    is_val = np.zeros(len(dataset), bool)
    for src, s in enumerate(dataset.sources):
        episodes = held.get(s["path"])
        if not episodes:
            continue
        mine = dataset.index[:, 0] == src
        episode = np.searchsorted(s["data"].episode_ends, dataset.index[mine, 3], side="left")
        is_val[mine] = np.isin(episode, episodes)
    return dataset.subset(np.nonzero(~is_val)[0]), dataset.subset(np.nonzero(is_val)[0])


class Validator:
    """The denoising loss on fixed validation windows (at most ``max_windows``, spread
    evenly), with the same noise and diffusion steps at every call (a generator seeded
    afresh), without gradients, in eval mode (no augmentation)."""

    def __init__(self, windows: WindowDataset, batch_size: int, max_windows: int, seed: int, device: torch.device,
                 bf16: bool = False):
        picks = np.unique(np.linspace(0, len(windows) - 1, num=min(len(windows), max_windows)).astype(np.int64))
        self.batches = [picks[i:i + batch_size] for i in range(0, len(picks), batch_size)]
        self.windows, self.seed, self.device, self.bf16 = windows, int(seed), device, bf16
        self.n_windows = int(len(picks))

    @torch.no_grad()
    def loss(self, policy: DiffusionPolicy) -> float:
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        was_training = policy.training
        policy.eval()
        total = 0.0
        try:
            for rows in self.batches:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    loss = policy.compute_loss(self.windows.get(rows), generator)
                total += float(loss.float().item()) * len(rows)
        finally:
            policy.train(was_training)
        return total / self.n_windows


def _same_policy(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _record_data_settings(cfg: DictConfig, paths: list[str]) -> None:
    """Put the observation settings the data were collected with into ``cfg.env`` (per
    task), so that periodic evaluations, and everything that acts with the checkpoint
    later, see what the policy was trained on."""
    from omegaconf import open_dict

    from sodp3d.data.store import EpisodeDataset, inspect_path
    from sodp3d.envs.settings import with_recorded_settings

    recorded: dict[str, dict] = {}
    for p in paths:
        if inspect_path(p) == "sodp3d":
            recorded.update(EpisodeDataset(p).attrs.get("tasks") or {})
    if recorded:
        with open_dict(cfg):
            cfg.env = with_recorded_settings(cfg.get("env"), recorded)


def _cloud_frame(cfg: DictConfig, dataset: WindowDataset, main: bool) -> str:
    """The frame of the training clouds ("world", or "dp3" when any store is in DP3's
    layout), said in one line per DP3 store; periodic evaluation in sodp3d's environments
    on such clouds is refused unless ``allow_foreign_frame``."""
    from sodp3d.data.store import DP3_FRAME, FRAME_NOTES, WORLD_FRAME

    frames = {s["data"].cloud_frame for s in dataset.sources}
    if "point_cloud" not in dataset.obs_keys or frames == {WORLD_FRAME}:
        return WORLD_FRAME
    if int(cfg.eval.every) > 0 and not cfg.get("allow_foreign_frame", False):
        raise UserError("periodic evaluation acts in sodp3d's environments (world-frame clouds), but these data's "
                        f"clouds are in {FRAME_NOTES[DP3_FRAME]}; set eval.every=0, or allow_foreign_frame=true")
    for s in dataset.sources:
        data = s["data"]
        if data.cloud_frame != WORLD_FRAME and main:
            colour = "; its 0-255 colour is read in [0, 1]" if data.colour_scaled else ""
            print(f"sodp3d pretrain: {data.path} is in DP3's layout: its clouds are in {FRAME_NOTES[data.cloud_frame]}, "
                  f"not sodp3d's world frame{colour}", file=sys.stderr)
    return DP3_FRAME


def run(cfg: DictConfig) -> dict[str, Any]:
    """Pre-trains on ``cfg.data`` into ``cfg.out``; returns the record (also ``<out>/results.json``).
    Under torchrun every process runs this; rank 0 alone writes (see sodp3d.distributed)."""
    paths = parse_paths(cfg.data)
    if not cfg.get("out") or cfg.out == "???":
        raise UserError("no run directory; pass out=<run dir>")
    run = Path(str(cfg.out))
    steps = int(cfg.steps)
    if steps <= 0 or int(cfg.batch_size) <= 0:
        raise UserError(f"steps and batch_size must be positive, got steps={cfg.steps}, batch_size={cfg.batch_size}")
    precision(cfg)  # a bad value is refused before anything is written
    optimizer_name(cfg.optim)
    val_ratio = float(cfg.get("val_ratio", 0.0) or 0.0)
    if not 0.0 <= val_ratio < 1.0:
        raise UserError(f"val_ratio is the share of each task's episodes held out for validation, in [0, 1); got {val_ratio}")
    if val_ratio > 0 and (int(cfg.get("val_every", 1)) <= 0 or int(cfg.get("val_windows", 1)) <= 0):
        raise UserError(f"val_every and val_windows must be positive, got {cfg.get('val_every')}, {cfg.get('val_windows')}")
    ranks = distributed.ranks_from_env()
    ranks.rows(int(cfg.batch_size))  # a batch that does not split is refused before anything starts
    # Rank 0 holds the run directory's writer lock for all ranks (the others write nothing);
    # when it is refused it exits, and the launcher stops the others.
    with writer_lock(run, "sodp3d pretrain") if ranks.main else nullcontext():
        device = distributed.start(ranks, resolve_device(str(cfg.device)))
        keep_host_memory()
        try:
            return _run(cfg, paths, run, steps, val_ratio, device, ranks)
        finally:
            distributed.stop(ranks)


def _run(cfg: DictConfig, paths: list[str], run: Path, steps: int, val_ratio: float, device: torch.device,
         ranks: distributed.Ranks) -> dict[str, Any]:
    from tqdm import tqdm

    from sodp3d.encoders import ENCODERS

    enc_name = str(cfg.encoder.name)
    if enc_name not in ENCODERS:
        raise UserError(f"unknown encoder '{enc_name}'; valid: {', '.join(ENCODERS)}")
    suite = _suite_of_data(paths)
    _record_data_settings(cfg, paths)
    dataset = WindowDataset(paths, ENCODERS[enc_name].keys, *horizons(cfg, suite))
    cloud_frame = _cloud_frame(cfg, dataset, ranks.main)
    held = held_out_episodes(dataset, val_ratio, int(cfg.seed)) if val_ratio > 0 else {}
    all_windows = dataset
    dataset, val_windows = split_windows(all_windows, held)
    if val_ratio > 0 and not held and ranks.main:
        print(f"sodp3d pretrain: val_ratio={val_ratio:g} holds out no episode here (per task round(val_ratio x "
              "episodes), one always kept to train on); no validation loss", file=sys.stderr)
    shape_meta = {k: list(v) for k, v in dataset.shapes.items()}
    config = policy_config(cfg, shape_meta, suite)

    ckpt = run / "checkpoints" / "latest.ckpt"
    payload = None
    if ckpt.exists():
        refuse_existing(run, True, bool(cfg.resume), "a run (checkpoints/latest.ckpt)")
        payload = load_checkpoint(ckpt, map_location=device)
        diff = _same_policy(payload["policy_config"], config.to_dict())
        if diff:
            raise UserError(f"{ckpt} was built with other policy settings ({', '.join(diff)} differ); resume with the same ones")
        if (payload.get("val") or {}).get("held_out", {}) != held:
            raise UserError(f"{ckpt} was trained with other held-out episodes (val_ratio, seed or data differ); "
                            "resume with the same ones")
    torch.manual_seed(int(cfg.seed))  # the same seed gives the same initial weights
    policy = DiffusionPolicy(config)
    if payload is None:  # fitted once, on rank 0, on the channels the encoder reads, and sent to the others
        fitted = MinMaxNormalizer.fit({k: v for k, v in all_windows.arrays_for_fit().items() if k in policy.normalizer.dims},
                                      point_channels=policy.point_channels) if ranks.main else None
        policy.normalizer.load_state_dict(distributed.broadcast(ranks, fitted).state_dict())
    trainer = Trainer(policy, cfg, device, ranks)
    if payload is not None:
        trainer.load(payload)
    validator = Validator(val_windows, int(cfg.batch_size), int(cfg.get("val_windows", 2048)), int(cfg.seed) + 1,
                          device, trainer.bf16) if len(val_windows) and ranks.main else None
    val_every = int(cfg.get("val_every", 1000))
    val_history: list[list[float]] = list(((payload or {}).get("val") or {}).get("history", []))
    if ranks.main:
        run.mkdir(parents=True, exist_ok=True)
        write_config(run, cfg)
    logger = RunLogger(run, cfg, run.name, enabled=ranks.main)
    n_params = sum(p.numel() for p in policy.parameters())

    eval_every = int(cfg.eval.every)
    eval_tasks = None
    if eval_every > 0:
        from sodp3d.envs import resolve_tasks

        eval_tasks = resolve_tasks(cfg.eval.task)

    def periodic_eval() -> None:
        from sodp3d.evaluate import evaluate

        policy_eval = trainer.ema.module.eval()
        r = evaluate(policy_eval, eval_tasks, int(cfg.eval.episodes), [int(cfg.seed)], int(cfg.eval.num_envs), cfg.get("env"))
        entry = {"step": trainer.step, "tasks": [{k: t[k] for k in ("task", "success_rate", "mean_return", "episodes")}
                                                 for t in r["tasks"]], "average": r["average"]["success_rate"]}
        with (run / "evals.jsonl").open("a") as f:
            f.write(json.dumps(entry) + "\n")
        logger.log({"eval/success_rate": entry["average"]}, trainer.step)

    saved = {"at": f"step {trainer.step}" if payload is not None else None}

    def checkpoint() -> None:
        if not ranks.main:
            return
        save_checkpoint(ckpt, {"policy_config": config.to_dict(), "train_config": OmegaConf.to_container(cfg, resolve=True),
                               "data": paths, "cloud_frame": cloud_frame, "val": val_record(), **trainer.state()},
                        last_good=saved["at"])
        saved["at"] = f"step {trainer.step}"

    def val_record() -> dict[str, Any]:
        return {"ratio": val_ratio, "held_out": held, "windows": validator.n_windows if validator else 0,
                "loss": val_history[-1][1] if val_history else None, "history": val_history}

    bar = tqdm(total=steps, initial=trainer.step, desc="pretrain", unit="step", dynamic_ncols=True,
               disable=not ranks.main)
    t0, seen, losses, last_loss = time.perf_counter(), 0, [], None
    try:
        while trainer.step < steps:
            try:
                loss = trainer.train_step(dataset, int(cfg.batch_size))
            except FloatingPointError as e:
                raise UserError(f"training diverged ({e}); the last good checkpoint is {ckpt}") from None
            losses.append(loss)
            seen += int(cfg.batch_size)
            extra = {}
            if validator is not None and (trainer.step % val_every == 0 or trainer.step == steps):
                extra["val_loss"] = validator.loss(trainer.policy)
                val_history.append([trainer.step, extra["val_loss"]])
            if trainer.step % int(cfg.log_every) == 0 or trainer.step == steps:
                rate = seen / (time.perf_counter() - t0)
                mean = last_loss = float(np.mean(losses))
                logger.log({"loss": mean, "lr": trainer.scheduler.get_last_lr()[0], "samples_per_s": rate, **extra},
                           trainer.step)
                bar.set_postfix(loss=f"{mean:.4f}", samples_s=f"{rate:.0f}", **{k: f"{v:.4f}" for k, v in extra.items()})
                losses = []
            elif extra:
                logger.log(extra, trainer.step)
            if trainer.step % int(cfg.checkpoint_every) == 0:
                checkpoint()
            if eval_every > 0 and ranks.main and (trainer.step % eval_every == 0 or trainer.step == steps):
                periodic_eval()
            bar.update(1)
        checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        raise
    except OSError as e:  # a log line, an evaluation's record or another file could not be written
        reraise_write_failure(e, run, last_good(saved["at"], ckpt))
    finally:
        bar.close()
        logger.close()
    val = val_record()
    record = {"kind": "pretrain", "run": str(run), "checkpoint": str(ckpt), "data": paths, "seed": int(cfg.seed),
              "encoder": config.encoder, "unet": config.unet, "steps": trainer.step, "params": n_params,
              "windows": len(dataset), "loss": last_loss, "seconds": time.perf_counter() - t0,
              "processes": ranks.world, "cloud_frame": cloud_frame, "val_ratio": val_ratio,
              "val_episodes": sum(len(v) for v in held.values()), "val_windows": val["windows"],
              "val_loss": val["loss"], "val_history": val_history}
    if ranks.main:
        write_results(run, record, _table(record))
    return record


def _table(record: dict[str, Any]) -> str:
    loss = "-" if record["loss"] is None else f"{record['loss']:.4f}"
    val = "-" if record.get("val_loss") is None else f"{record['val_loss']:.4f} ({record['val_episodes']} episodes)"
    return ("| encoder | U-Net | parameters | windows | steps | last loss | validation loss | seconds |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|\n"
            f"| {record['encoder']} | {record['unet']} | {record['params'] / 1e6:.2f}M | {record['windows']} "
            f"| {record['steps']} | {loss} | {val} | {record['seconds']:.0f} |")


def render(record: dict[str, Any]) -> str:
    return (f"\npre-trained {record['steps']} steps ({record['params'] / 1e6:.2f}M parameters, {record['windows']} windows) "
            f"in {record['seconds']:.0f} s; checkpoint: {record['checkpoint']}")
