"""Per-observation cost of the point-cloud pipeline against a bare depth render.

    python benchmarks/obs_pipeline.py [--repeats 200] [--tasks reach-v3 adroit-door]

For each task, in the same process and on the same scene state:
  bare      mujoco.Renderer: update_scene + render of a depth frame (the baseline)
  render    our render of that camera (kinematics refresh + depth render)
  project   Open3D back-projection to world coordinates
  crop      workspace box
  sample    farthest point sampling (or uniform) to N points
  full      PointCloudObservation.point_cloud(): everything above, end to end
Also the action-chunk env (To=2, Ta=8), which renders 2 of every 8 steps, against
bare simulator steps plus a render on every step.
Target (issue 1/4): full <= 1.5x bare.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("MUJOCO_GL", "egl")

import mujoco  # noqa: E402
import numpy as np  # noqa: E402

from sodp3d.envs import make_env, task_settings  # noqa: E402
from sodp3d.envs.camera import refresh_kinematics  # noqa: E402
from sodp3d.envs.pointcloud import crop, sample  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median milliseconds per call after a warm-up."""
    return interleaved({"f": fn}, repeats)["f"]


def interleaved(fns: dict, repeats: int) -> dict:
    """Median milliseconds per call of each function, calling them in turn so that the
    baseline and the pipeline see the same machine load (these machines are noisy)."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    times: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def bench_task(task: str, repeats: int) -> dict:
    s = task_settings(task)
    env = make_env(task, settings=s)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(10):
        env.step(rng.uniform(-1, 1, env.action_space.shape))
    base = env.unwrapped
    cam = env.cameras[0]
    bare = mujoco.Renderer(base.model, s.height, s.width)
    bare.enable_depth_rendering()

    def bare_render():
        bare.update_scene(base.data, camera=cam.name)
        return bare.render()

    def our_render():
        refresh_kinematics(base.model, base.data)
        return cam.depth(base.data)

    depth = our_render()
    cloud = cam.back_project(depth, base.data)
    cropped = crop(cloud, s.crop)
    row = {
        "task": task,
        "camera": f"{cam.name} {s.height}x{s.width}",
        "points": f"{cloud.shape[0]} -> {cropped.shape[0]} -> {s.num_points}",
    }
    row.update(
        interleaved(
            {
                "bare": bare_render,
                "render": our_render,
                "project": lambda: cam.back_project(depth, base.data),
                "crop": lambda: crop(cloud, s.crop),
                "sample": lambda: sample(cropped, s.num_points, s.sampling),
                "full": env.point_cloud,
            },
            repeats,
        )
    )
    row["ratio"] = row["full"] / row["bare"]
    bare.close()

    # Chunked stepping: 2 renders per 8 steps, against step + render every step.
    chunk = make_env(task, settings=s, n_obs_steps=2, n_action_steps=8)
    plain = make_env(task, settings=s, point_cloud=False)
    chunk.reset(seed=0)
    plain.reset(seed=0)
    bare = mujoco.Renderer(plain.unwrapped.model, s.height, s.width)
    bare.enable_depth_rendering()
    n_chunks = max(4, repeats // 20)
    actions = rng.uniform(-1, 1, (n_chunks,) + chunk.action_space.shape).astype(np.float32)

    def run_chunks():
        for a in actions:
            _, _, te, tr, _ = chunk.step(a)
            if te or tr:
                chunk.reset()

    def run_plain():
        for a in actions:
            for step_action in a:
                _, _, te, tr, _ = plain.step(step_action)
                bare.update_scene(plain.unwrapped.data, camera=cam.name)
                bare.render()
                if te or tr:
                    plain.reset()

    steps = n_chunks * 8
    t = interleaved({"chunk": run_chunks, "plain": run_plain}, 3)
    row["chunk_steps_s"] = steps / (t["chunk"] / 1e3)
    row["plain_steps_s"] = steps / (t["plain"] / 1e3)
    bare.close()
    for e in (env, chunk, plain):
        e.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--tasks", nargs="+", default=["reach-v3", "pick-place-v3", "adroit-door"])
    args = parser.parse_args()
    rows = [bench_task(t, args.repeats) for t in args.tasks]
    print("\nPer observation, median ms (ratio = full / bare depth render, target <= 1.5)\n")
    print("| task | camera | points (raw -> crop -> N) | bare render | render | back-project | crop | sample | full | ratio |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['task']} | {r['camera']} | {r['points']} | {r['bare']:.2f} | {r['render']:.2f} | {r['project']:.2f} "
              f"| {r['crop']:.2f} | {r['sample']:.2f} | {r['full']:.2f} | **{r['ratio']:.2f}x** |")
    print("\nStepping with observations (To=2, Ta=8): env steps/s")
    print("| task | step + render every step | action chunks (2 renders / 8 steps) | speed-up |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['task']} | {r['plain_steps_s']:.0f} | {r['chunk_steps_s']:.0f} | {r['chunk_steps_s'] / r['plain_steps_s']:.2f}x |")
    worst = max(r["ratio"] for r in rows)
    print(f"\nworst full/bare ratio: {worst:.2f}x ({'meets' if worst <= 1.5 else 'misses'} the 1.5x target)")


if __name__ == "__main__":
    main()
