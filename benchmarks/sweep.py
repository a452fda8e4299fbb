"""The sweep's cost: its overhead per run against the same runs one after another in one
process, and the wall-clock speed-up of running the grid on this machine's cores.

    python benchmarks/sweep.py [--experiment smoke] [--env-steps 960] [--cpus 2] [override ...]

Three timings of the same grid (an experiment's runs, in fresh directories):
  serial   each run's command function called in turn, in this process (the bare baseline);
  sweep/1  `sodp3d sweep` on a local Ray instance with one CPU: one run at a time, so the
           difference to serial is the sweep's own cost (Ray's start, dispatch, workers'
           imports, sweep.json);
  sweep/N  the same with N CPUs and one CPU per run: N runs at a time.
Printed: seconds of each, the overhead per run (absolute and as a share of the mean run,
and what that share is for a one-minute run), and the speed-up of sweep/N over serial.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

from sodp3d import sweep  # noqa: E402
from sodp3d.config import compose  # noqa: E402


def overrides(args, root: Path, cpus: int) -> list[str]:
    return [f"experiment={args.experiment}", f"root={root}", "device=cpu", f"ray.num_cpus={cpus}",
            "ray.cpus_per_run=1", f"finetune.env_steps={args.env_steps}", *args.overrides]


def serial(args, root: Path) -> tuple[float, list[float]]:
    import torch

    torch.set_num_threads(1)  # as a one-CPU Ray task runs
    runs = sweep.plan(compose("sweep", overrides(args, root, 1)))
    each = []
    t0 = time.perf_counter()
    for r in runs:
        t = time.perf_counter()
        sweep.run_one(r.command, r.cfg)
        each.append(time.perf_counter() - t)
    return time.perf_counter() - t0, each


def swept(args, root: Path, cpus: int) -> float:
    t0 = time.perf_counter()
    record = sweep.run(compose("sweep", overrides(args, root, cpus)))
    if record["failed"]:
        sys.exit(f"runs failed: {record['failed']}")
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="smoke")
    p.add_argument("--env-steps", type=int, default=960, help="fine-tuning budget per run (longer runs: smaller share)")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    p.add_argument("overrides", nargs="*", help="more sweep overrides (key=value)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t_serial, each = serial(args, Path(tmp) / "serial")
        t_one = swept(args, Path(tmp) / "one", 1)
        t_many = swept(args, Path(tmp) / "many", args.cpus)
    n = len(each)
    mean = t_serial / n
    per_run = (t_one - t_serial) / n
    print(f"\nsweep benchmark: experiment={args.experiment}, {n} runs, fine-tuning {args.env_steps} env steps, "
          f"{os.cpu_count()} cores")
    print("| schedule | seconds | vs serial |\n|---|---:|---:|")
    print(f"| serial, one process (baseline) | {t_serial:.1f} | 1.00x |")
    print(f"| sweep, 1 CPU (one run at a time) | {t_one:.1f} | {t_one / t_serial:.2f}x |")
    print(f"| sweep, {args.cpus} CPUs ({args.cpus} runs at a time) | {t_many:.1f} | {t_many / t_serial:.2f}x |")
    print(f"\noverhead per run: {per_run:.2f} s = {100 * per_run / mean:.1f}% of the mean run ({mean:.1f} s); "
          f"for a one-minute run: {100 * per_run / 60:.1f}%")
    print(f"speed-up of the {args.cpus}-CPU sweep over serial runs: {t_serial / t_many:.2f}x")
    print(f"peak resident memory of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
