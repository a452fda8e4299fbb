"""Policy speed: pre-training samples/s, the data loader against the train step, and the
latency of one action chunk (S DDIM steps) at batch 1 and 8, per encoder and U-Net preset.

    python benchmarks/policy.py [--presets tiny simple paper] [--device auto] [--seconds 8] [--bf16]
                                [--points 512] [--batch 256] [--encoders dp3 image] [--image 84]

``--encoders dp3 image`` measures Diffusion Policy's image encoder (ResNet-18, GroupNorm,
spatial softmax; random 0.9 crops in training, the centre crop when acting) on --image
square rgb images next to DP3's point encoder, on the same windows.

On a GPU: `python benchmarks/policy.py --device cuda --presets simple paper --bf16` (the
paper preset trains with batch 256 there; --bf16 adds a row per preset with the training
step under bf16 autocast, next to fp32). Peak resident memory of the process is printed.

Meta-World shapes: 512-point clouds (--points; the demo uses 128 and batch 64), 84 x 84
images (--image), agent_pos 9, action 4, Tp=12, To=2, Ta=8, S = 10. The loader column is the time to assemble a batch of windows from an in-memory
dataset, as a share of one training step (it must stay well below 1 to keep up).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sodp3d.data.store import EpisodeWriter  # noqa: E402
from sodp3d.data.windows import WindowDataset  # noqa: E402
from sodp3d.normalizer import MinMaxNormalizer  # noqa: E402
from sodp3d.policy import DiffusionPolicy, PolicyConfig  # noqa: E402
from sodp3d.runs import adam_kwargs, keep_host_memory, resolve_device  # noqa: E402

def meta(points: int, image: int | None = None) -> dict[str, list[int]]:
    out = {"point_cloud": [points, 3], "agent_pos": [9], "state": [39], "action": [4]}
    if image:
        out["image"] = [image, image, 3]
    return out


def synthetic_dataset(path: str, points: int = 512, episodes: int = 8, length: int = 200, image: int | None = None) -> None:
    rng = np.random.default_rng(0)
    writer = EpisodeWriter.create(path, {"tasks": {}})
    for _ in range(episodes):
        writer.append_episode(
            {
                **({"image": rng.integers(0, 256, (length, image, image, 3), dtype=np.uint8)} if image else {}),
                "point_cloud": rng.uniform(-0.5, 0.5, (length, points, 3)).astype(np.float32),
                "agent_pos": rng.normal(size=(length, 9)).astype(np.float32),
                "state": rng.normal(size=(length, 39)).astype(np.float32),
                "action": rng.uniform(-1, 1, (length, 4)).astype(np.float32),
                "reward": np.zeros(length, np.float32),
                "success": np.zeros(length, bool),
            },
            "synthetic",
        )


def timed(fn, seconds: float, min_runs: int = 3, sync=lambda: None) -> float:
    """Median seconds per call, running for about ``seconds`` after one warm-up call."""
    fn()
    sync()
    times, start = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return statistics.median(times)


def bench(preset: str, device: torch.device, data: WindowDataset, seconds: float, bf16: bool = False,
          points: int = 512, batch: int | None = None, encoder: str = "dp3", image: int | None = None) -> dict:
    torch.manual_seed(0)
    config = PolicyConfig(shape_meta=meta(points, image), horizon=12, n_obs_steps=2, n_action_steps=8, encoder=encoder,
                          unet=preset)
    policy = DiffusionPolicy(config)
    arrays = data.arrays_for_fit()
    policy.normalizer = MinMaxNormalizer.fit({k: arrays[k] for k in policy.normalizer.dims})
    policy = policy.to(device)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4, **adam_kwargs(device))  # as pre-training's
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    batch_size = batch or (256 if (device.type == "cuda" or preset != "paper") else 16)
    rng = np.random.default_rng(0)
    batch = data.sample(batch_size, rng)

    def train_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = policy.compute_loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step_s = timed(train_step, seconds, sync=sync)
    load_s = timed(lambda: data.sample(batch_size, rng), min(seconds, 3.0))
    policy.eval()
    latency = {}
    for b in (1, 8):
        obs = {k: torch.as_tensor(v[:1].repeat(b, 0), device=device) for k, v in batch["obs"].items()}
        latency[b] = timed(lambda: policy.predict_action(obs), seconds / 2, sync=sync)
    return {
        "preset": f"{encoder} / {preset}" + (" (bf16 autocast)" if bf16 else ""),
        "params": sum(p.numel() for p in policy.parameters()) / 1e6,
        "batch": batch_size,
        "samples_s": batch_size / step_s,
        "loader": load_s / step_s,
        "lat1": latency[1] * 1e3,
        "lat8": latency[8] * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "simple", "paper"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--points", type=int, default=512, help="points per cloud (the demo: 128)")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default 256; the demo: 64)")
    parser.add_argument("--bf16", action="store_true", help="also time the training step under bf16 autocast")
    parser.add_argument("--encoders", nargs="+", default=["dp3"], choices=["dp3", "image"],
                        help="dp3 (point clouds) and/or image (Diffusion Policy's ResNet-18 on --image images)")
    parser.add_argument("--image", type=int, default=84, help="image side for --encoders image (Diffusion Policy: 84)")
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc's allocator as it is (pre-training keeps freed host memory; see keep_host_memory)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    kept = False if args.system_malloc else keep_host_memory()  # as `sodp3d pretrain` does
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.zarr")
        image = args.image if "image" in args.encoders else None
        synthetic_dataset(path, args.points, image=image)
        data = WindowDataset([path], ["point_cloud", "agent_pos"] + (["image"] if image else []), 12, 2, 8)
        rows = [bench(p, device, data, args.seconds, bf16, args.points, args.batch, enc, image)
                for enc in args.encoders for p in args.presets for bf16 in ((False, True) if args.bf16 else (False,))]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    inputs = f"{args.points} points" + (f", {args.image}x{args.image} images" if "image" in args.encoders else "")
    print(f"\nPolicy speed on {name} ({inputs}, Tp=12, To=2, Ta=8, S=10 DDIM steps; "
          f"freed host memory kept: {'yes' if kept else 'no'})\n")
    print("| encoder / preset | params (M) | train batch | train samples/s | loader / train step | chunk latency b=1 (ms) | chunk latency b=8 (ms) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['preset']} | {r['params']:.2f} | {r['batch']} | {r['samples_s']:.0f} | {r['loader']:.2%} | "
              f"{r['lat1']:.1f} | {r['lat8']:.1f} |")
    import resource

    print(f"\npeak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if device.type == "cpu" and "paper" in args.presets:
        print("\n(paper on CPU trains with batch 16 here; it is meant for a GPU)", file=sys.stdout)


if __name__ == "__main__":
    main()
