"""Run plumbing shared by every command: the device, the run directory and its files, the
metrics logger, and the results record's table.

A run is a directory that knows whether it is finished (``results.json``, the record the
command returned) and how to continue (``checkpoints/latest.ckpt``). Its files are written
atomically: a reader, or a run killed mid-write, never sees half of one.

    <run>/config.yaml       the composed config
    <run>/metrics.jsonl     one line per logged step (and wandb/, offline by default)
    <run>/results.json      the command's record; results.md, its table
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sodp3d.errors import UserError
from sodp3d.files import write_text_atomic


_HOST_MEMORY_KEPT = False


def keep_host_memory() -> bool:
    """Lets this process reuse the host memory it frees instead of handing it back to the
    system after every step (glibc only; elsewhere nothing happens, False returned).

    Training allocates and frees the same few hundred MB every step (a batch of clouds
    through the point encoder: 512 x 512 points x 256 channels is 268 MB a layer). By
    default glibc serves blocks that large with mmap and unmaps them when freed, so every
    step pays again for zero-filled pages: about 45% of a CPU pre-training step at 512
    points (see docs/benchmarks.md). Here large blocks come from the heap and freed ones
    stay there (up to 1 GB of free heap is kept), so the next step reuses them. The
    resident memory stays at what the largest steps needed (higher than with the default
    allocator, which gives blocks back between steps: +650 MB in the 512-point
    benchmark); it settles within some tens of steps and then does not grow with the number
    of steps (tests/test_host_memory.py)."""
    global _HOST_MEMORY_KEPT
    if _HOST_MEMORY_KEPT:
        return True
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):
        return False
    _HOST_MEMORY_KEPT = ok
    return ok


def adam_kwargs(device: torch.device) -> dict[str, bool]:
    """Adam(W)'s fused kernel where torch has one for the device (one kernel for all
    parameters: 0.6 ms a step against 3.0 ms for the per-tensor loop on the tiny policy)."""
    return {"fused": True} if device.type in ("cpu", "cuda") else {}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:<index>") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} asked for, but this torch build sees no CUDA device; use device=cpu or auto")
    return device


# ---------------------------------------------------------------------------------------
# The run directory and its files
def refuse_existing(run: Path, exists: bool, resume: bool, what: str, other: str = "another out") -> None:
    """A run directory that already holds ``what`` is continued only when asked."""
    if exists and not resume:
        raise UserError(f"{run} already holds {what}; pass resume=true to continue it, or {other}")


def write_config(run: Path, cfg: DictConfig) -> Path:
    return write_text_atomic(Path(run) / "config.yaml", OmegaConf.to_yaml(cfg))


def write_results(out: Path, record: dict[str, Any], table: str) -> tuple[Path, Path]:
    """``results.json`` (the record) and ``results.md`` (its table) in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    js = write_text_atomic(out / "results.json", json.dumps(record, indent=2))
    md = write_text_atomic(out / "results.md", table + "\n")
    return js, md


# ---------------------------------------------------------------------------------------
# Metrics
class RunLogger:
    """metrics.jsonl in the run dir, and wandb (offline unless asked otherwise). A logger
    that is not ``enabled`` (a distributed rank other than 0) writes nothing."""

    def __init__(self, run_dir: Path, cfg: DictConfig, name: str, enabled: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.wandb = None
        mode = str(cfg.wandb.mode)
        if mode not in ("offline", "online", "disabled"):
            raise UserError(f"wandb.mode must be offline, online or disabled, got '{mode}'")
        if mode != "disabled" and enabled:
            import wandb

            id_file = run_dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
            id_file.write_text(run_id)
            self.wandb = wandb.init(
                project=str(cfg.wandb.project), name=name, id=run_id, resume="allow", mode=mode,
                dir=str(run_dir), config=OmegaConf.to_container(cfg, resolve=True), reinit=True,
            )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


# ---------------------------------------------------------------------------------------
# The fine-tuning results record (finetune and demo) as a table
def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def results_table(results: dict[str, Any], run_columns: bool = True) -> str:
    """Markdown of a fine-tuning results record: per task (and, with ``run_columns``, its
    regulariser, init and budget) the success before and after fine-tuning and the change,
    at each evaluation eta, then the average over the tasks."""
    rows = results["tasks"]
    etas = [b["eta"] for b in rows[0]["by_eta"]] if rows else list(results.get("eval_etas", [0.0]))
    lines = [f"Metric: {results['metric']}."]
    if len(etas) > 1:
        lines[0] += (" The eta = 1 columns sample as fine-tuning does (every denoising step a Gaussian): "
                     "the policy PPO optimises.")
    head, rule = ("| task | reg | init | env steps |", "|---|---|---|---:|") if run_columns else ("| task |", "|---|")
    for e in etas:
        tag = "" if len(etas) == 1 else f" (eta = {e:g})"
        head += f" pre-trained{tag} | fine-tuned{tag} | change |"
        rule += "---:|---:|---:|"
    lines += ["", head, rule]

    def cells(pairs: list[tuple[float | None, float | None]], bold: bool = False) -> str:
        out = ""
        for a, b in pairs:
            change = "-" if a is None or b is None else f"{100 * (b - a):+.0f}"
            out += "".join(f" **{v}** |" if bold else f" {v} |" for v in (_pct(a), _pct(b), change))
        return out

    for r in rows:
        run = f" {r['reg']} | {r['init']} | {r['env_steps']} |" if run_columns else ""
        lines.append(f"| {r['task']} |{run}" + cells([(b["pretrained_success"], b["finetuned_success"])
                                                       for b in r["by_eta"]]))
    if rows:
        avg = []
        for i in range(len(etas)):
            pairs = [(r["by_eta"][i]["pretrained_success"], r["by_eta"][i]["finetuned_success"]) for r in rows]
            done = all(a is not None and b is not None for a, b in pairs)
            avg.append((sum(a for a, _ in pairs) / len(pairs), sum(b for _, b in pairs) / len(pairs))
                       if done else (None, None))
        blank = " | | |" if run_columns else ""
        lines.append(f"| **average** |{blank}" + cells(avg, bold=True))
    return "\n".join(lines)
