"""What the policy sees: point-cloud rollouts and dataset views, rendered headless.

* ``record_rollout``: one episode of a policy, one frame per decision (the newest
  observed cloud, the end-effector path executed so far, and the path the predicted
  action sequence would take from there).
* ``rollout_gif`` / ``rollout_mp4`` / ``rollout_html``: that episode as an animated GIF
  (matplotlib, Agg), the same frames as an MP4 (imageio-ffmpeg), and as an interactive
  plotly page (the cloud can be turned by hand; offline, the
  plotly library is embedded).
* ``dataset_figure``: some episodes of a zarr dataset, three moments each, with their
  end-effector path and whether they succeeded.

Shapes: N points, C = 3 (xyz) or 6 (xyz, RGB in [0, 1]); T steps; Tp predicted steps.
Points are coloured by height, or by their recorded colour when C = 6.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from sodp3d.errors import UserError
from sodp3d.files import atomic_write


@dataclass
class Frame:
    step: int                      # env steps before this decision
    cloud: np.ndarray              # (N, C) the newest observed cloud
    predicted: np.ndarray | None   # (Tp - To + 2, 3) end-effector path of the predicted actions
    executed_upto: int             # rows of RolloutRecord.executed reached at this decision
    ret: float                     # return so far
    success: bool                  # succeeded at any step so far


@dataclass
class RolloutRecord:
    task: str
    seed: int
    frames: list[Frame] = field(default_factory=list)
    executed: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # (T + 1, 3)
    success: bool = False
    ret: float = 0.0
    crop: tuple[np.ndarray, np.ndarray] | None = None  # finite (low, high) of the crop box, if any

    @property
    def steps(self) -> int:
        return len(self.executed) - 1

    def limits(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis limits that hold every frame of the episode."""
        return _limits([f.cloud for f in self.frames], [self.executed] + [f.predicted for f in self.frames], self.crop)


class _PathRecorder(gym.Wrapper):
    """Records the end-effector position after reset and after every step."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.path: list[np.ndarray] = []

    def reset(self, **kwargs):
        out = self.env.reset(**kwargs)
        self.path = [self.env.unwrapped.end_effector()]
        return out

    def step(self, action):
        out = self.env.step(action)
        self.path.append(self.env.unwrapped.end_effector())
        return out


def _finite_box(settings) -> tuple[np.ndarray, np.ndarray] | None:
    if settings.crop is None:
        return None
    low, high = np.asarray(settings.crop.low, float), np.asarray(settings.crop.high, float)
    if not (np.isfinite(low).all() and np.isfinite(high).all()):
        return None
    return low, high


def record_rollout(policy, task: str, env_cfg=None, seed: int = 0, generator=None) -> RolloutRecord:
    """One episode of ``policy`` on ``task`` (reset with ``seed``), frame by frame."""
    import torch

    from sodp3d.envs import make_env, task_settings
    from sodp3d.envs.wrappers import ActionChunking

    settings = task_settings(task, env_cfg)
    To, Ta = policy.config.n_obs_steps, policy.config.n_action_steps
    recorder = _PathRecorder(make_env(task, env_cfg, settings=settings))
    env = ActionChunking(recorder, To, Ta)
    base = env.unwrapped
    record = RolloutRecord(task=task, seed=int(seed), crop=_finite_box(settings))
    if generator is None:
        generator = torch.Generator(device=policy.device).manual_seed(int(seed))
    policy.eval()
    try:
        obs, _ = env.reset(seed=int(seed))
        done = False
        while not done:
            out = policy.predict_action({k: obs[k][None] for k in policy.obs_keys}, generator=generator)
            action_pred = out["action_pred"][0].cpu().numpy()
            record.frames.append(Frame(
                step=int(base.elapsed_steps), cloud=np.asarray(obs["point_cloud"][-1]),
                predicted=base.predicted_path(action_pred[To - 1:]), executed_upto=len(recorder.path),
                ret=record.ret, success=record.success,
            ))
            obs, reward, terminated, truncated, info = env.step(out["action"][0].cpu().numpy())
            record.ret += float(reward)
            record.success |= bool(info["success"])
            done = bool(terminated or truncated)
    finally:
        env.close()
    record.executed = np.stack(recorder.path)
    return record


# ---------------------------------------------------------------------------------------
# Drawing
def _colours(cloud: np.ndarray, zlim: tuple[float, float]) -> np.ndarray:
    """(N, 4) RGBA: the recorded colour, or height through viridis."""
    from matplotlib import colormaps

    if cloud.shape[1] >= 6:
        rgb = np.clip(cloud[:, 3:6], 0, 1)
        return np.concatenate([rgb, np.ones((len(rgb), 1))], axis=1)
    z = (cloud[:, 2] - zlim[0]) / max(zlim[1] - zlim[0], 1e-9)
    return colormaps["viridis"](np.clip(z, 0, 1))


def _limits(clouds: list[np.ndarray], paths: list[np.ndarray], crop) -> tuple[np.ndarray, np.ndarray]:
    """Fixed axis limits for a whole animation: the extent of the clouds and paths
    (0.5 to 99.5 percentiles, padded), inside the crop box when there is one."""
    pts = np.concatenate([c[:, :3] for c in clouds] + [p for p in paths if p is not None and len(p)])
    low, high = np.percentile(pts, 0.5, axis=0), np.percentile(pts, 99.5, axis=0)
    pad = 0.05 * np.maximum(high - low, 1e-3)
    low, high = low - pad, high + pad
    if crop is not None:
        low, high = np.maximum(low, crop[0]), np.minimum(high, crop[1])
    return low, high


def _draw(ax, cloud, lim, executed=None, predicted=None, title="", point_size: float | None = None) -> None:
    low, high = lim
    if point_size is None:  # sparse clouds get larger dots
        point_size = float(np.clip(2000.0 / max(len(cloud), 1), 2.0, 16.0))
    keep = np.all((cloud[:, :3] >= low) & (cloud[:, :3] <= high), axis=1)
    c = cloud[keep]
    ax.scatter(c[:, 0], c[:, 1], c[:, 2], c=_colours(c, (low[2], high[2])), s=point_size, depthshade=False, linewidths=0)
    if executed is not None and len(executed):
        ax.plot(executed[:, 0], executed[:, 1], executed[:, 2], color="crimson", lw=2, label="executed")
        ax.scatter(*executed[-1], color="crimson", s=30)
    if predicted is not None and len(predicted):
        ax.plot(predicted[:, 0], predicted[:, 1], predicted[:, 2], color="darkorange", lw=2, ls="--", marker=".",
                label="predicted")
    ax.set_xlim(low[0], high[0])
    ax.set_ylim(low[1], high[1])
    ax.set_zlim(low[2], high[2])
    ax.set_box_aspect(tuple(np.maximum(high - low, 1e-3)))
    ax.view_init(elev=30, azim=-60)
    ax.set_xlabel("x [m]", labelpad=-8)
    ax.set_ylabel("y [m]", labelpad=-8)
    ax.set_zlabel("z [m]", labelpad=-8)
    ax.tick_params(labelsize=6, pad=-2)
    ax.set_title(title, fontsize=9)


def _frame_image(cloud, lim, executed, predicted, title: str, legend: bool, size: tuple[float, float], dpi: int):
    """One 3-D view rendered off screen (Agg) to a PIL image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    fig = Figure(figsize=size, dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(projection="3d")
    _draw(ax, cloud, lim, executed, predicted, title)
    if legend:
        ax.legend(loc="upper left", fontsize=7)
    fig.subplots_adjust(left=0, right=1, bottom=0, top=0.9)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3])


def rollout_images(record: RolloutRecord, size: tuple[float, float] = (5.0, 4.5), dpi: int = 90) -> list:
    """The rollout's frames as PIL images: one per decision, then one that holds the outcome."""
    if not record.frames:
        raise UserError("the rollout has no frames")
    lim = record.limits()
    head = f"{record.task}  seed {record.seed}"
    images = [_frame_image(f.cloud, lim, record.executed[: f.executed_upto], f.predicted,
                           f"{head}  step {f.step}\nreturn {f.ret:.1f}  {'success' if f.success else 'not yet'}",
                           i == 0, size, dpi) for i, f in enumerate(record.frames)]
    images.append(_frame_image(record.frames[-1].cloud, lim, record.executed, None,
                               f"{head}  end, {record.steps} steps\nreturn {record.ret:.1f}  "
                               f"{'success' if record.success else 'failure'}", False, size, dpi))
    return images


HOLD_SECONDS = 2.0  # how long the outcome frame stays


def rollout_gif(record: RolloutRecord, path: str | Path, fps: float = 4.0, size: tuple[float, float] = (5.0, 4.5),
                dpi: int = 90, images: list | None = None) -> Path:
    """An animated GIF, one frame per decision and a last one that holds the outcome,
    written atomically. ``images``: frames already drawn (``rollout_images``)."""
    images = images if images is not None else rollout_images(record, size, dpi)
    durations = [int(1000 / fps)] * (len(images) - 1) + [int(1000 * HOLD_SECONDS)]
    with atomic_write(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)
    return Path(path)


def rollout_mp4(record: RolloutRecord, path: str | Path, fps: float = 4.0, size: tuple[float, float] = (5.0, 4.5),
                dpi: int = 90, images: list | None = None) -> Path:
    """The GIF's frames as an H.264 MP4 (imageio with the imageio-ffmpeg wheel, which
    brings its own ffmpeg), the outcome frame held as long, written atomically. Frames are
    padded with white to a multiple of 16 pixels, as the codec wants."""
    import imageio.v2 as imageio

    images = images if images is not None else rollout_images(record, size, dpi)
    frames = [np.asarray(im.convert("RGB")) for im in images]
    h, w = frames[0].shape[:2]
    H, W = -(-h // 16) * 16, -(-w // 16) * 16
    frames = [np.pad(f, ((0, H - h), (0, W - w), (0, 0)), constant_values=255) for f in frames]
    frames += [frames[-1]] * max(0, round(HOLD_SECONDS * fps) - 1)
    with atomic_write(path) as tmp:
        writer = imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                    pixelformat="yuv420p", macro_block_size=16, ffmpeg_log_level="error")
        try:
            for frame in frames:
                writer.append_data(frame)
        finally:
            writer.close()
    return Path(path)


def write_rollout(record: RolloutRecord, stem: Path, fps: float = 4.0, mp4: bool = True,
                  html: bool = True) -> dict[str, Path]:
    """The rollout's views next to each other: ``<stem>.gif``, ``.mp4`` (the same frames,
    drawn once) and ``.html``; returns them by kind."""
    images = rollout_images(record)

    def named(ext: str) -> Path:  # a stem may hold dots, so no with_suffix
        return stem.parent / f"{stem.name}.{ext}"

    files = {"gif": rollout_gif(record, named("gif"), fps=fps, images=images)}
    if mp4:
        files["mp4"] = rollout_mp4(record, named("mp4"), fps=fps, images=images)
    if html:
        files["html"] = rollout_html(record, named("html"))
    return files


def rollout_html(record: RolloutRecord, path: str | Path) -> Path:
    """An interactive page: the cloud and paths per decision, a slider and a play button."""
    import plotly.graph_objects as go

    low, high = record.limits()

    def traces(f: Frame) -> list:
        keep = np.all((f.cloud[:, :3] >= low) & (f.cloud[:, :3] <= high), axis=1)
        c = f.cloud[keep]
        rgba = _colours(c, (low[2], high[2]))
        colours = [f"rgb({int(255 * r)},{int(255 * g)},{int(255 * b)})" for r, g, b, _ in rgba]
        ex = record.executed[: f.executed_upto]
        pr = f.predicted if f.predicted is not None else np.zeros((0, 3))
        return [
            go.Scatter3d(x=c[:, 0], y=c[:, 1], z=c[:, 2], mode="markers", marker={"size": 2, "color": colours},
                         name="point cloud"),
            go.Scatter3d(x=ex[:, 0], y=ex[:, 1], z=ex[:, 2], mode="lines", line={"color": "crimson", "width": 5},
                         name="executed path"),
            go.Scatter3d(x=pr[:, 0], y=pr[:, 1], z=pr[:, 2], mode="lines+markers",
                         line={"color": "darkorange", "width": 4, "dash": "dash"}, marker={"size": 2},
                         name="predicted path"),
        ]

    frames = [go.Frame(data=traces(f), name=str(i)) for i, f in enumerate(record.frames)]
    steps = [{"args": [[str(i)], {"frame": {"duration": 0, "redraw": True}, "mode": "immediate"}],
              "label": str(f.step), "method": "animate"} for i, f in enumerate(record.frames)]
    fig = go.Figure(data=frames[0].data, frames=frames)
    span = np.maximum(high - low, 1e-3)
    fig.update_layout(
        title=f"{record.task}, seed {record.seed}: {'success' if record.success else 'failure'}, "
              f"return {record.ret:.1f}, {record.steps} steps",
        scene={"xaxis": {"range": [low[0], high[0]], "title": "x [m]"},
               "yaxis": {"range": [low[1], high[1]], "title": "y [m]"},
               "zaxis": {"range": [low[2], high[2]], "title": "z [m]"},
               "aspectmode": "manual", "aspectratio": dict(zip("xyz", (span / span.max()).tolist()))},
        updatemenus=[{"type": "buttons", "showactive": False, "buttons": [
            {"label": "play", "method": "animate",
             "args": [None, {"frame": {"duration": 250, "redraw": True}, "fromcurrent": True}]},
            {"label": "pause", "method": "animate",
             "args": [[None], {"frame": {"duration": 0, "redraw": False}, "mode": "immediate"}]}]}],
        sliders=[{"steps": steps, "currentvalue": {"prefix": "step "}}],
    )
    with atomic_write(path) as tmp:
        fig.write_html(tmp, include_plotlyjs=True, auto_play=False)
    return Path(path)


def pick_episodes(tasks: list[str] | None, n_episodes: int, count: int) -> list[int]:
    """``count`` episode indices spread over the tasks (round robin, in order)."""
    if tasks is None:
        return list(np.linspace(0, n_episodes - 1, num=min(count, n_episodes), dtype=int))
    by_task: dict[str, list[int]] = {}
    for i, t in enumerate(tasks):
        by_task.setdefault(t, []).append(i)
    picked: list[int] = []
    queues = [list(v) for v in by_task.values()]
    while len(picked) < min(count, n_episodes):
        for q in queues:
            if q and len(picked) < count:
                picked.append(q.pop(0))
    return sorted(picked)


def dataset_figure(data_path: str | Path, path: str | Path, episodes: int = 6, moments: int = 3) -> tuple[Path, list[dict]]:
    """A PNG grid: rows are episodes, columns moments of the episode (first to last step);
    returns the file and one row per episode shown (index, task, steps, success, return)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from sodp3d.data.store import EpisodeDataset
    from sodp3d.envs.tasks import suite_of

    data = EpisodeDataset(data_path)
    if data.n_episodes == 0:
        raise UserError(f"{data_path} holds no episodes")
    if "point_cloud" not in data.keys:
        raise UserError(f"{data_path} has no point clouds to show (keys: {', '.join(data.keys)})")
    tasks = data.episode_tasks
    chosen = pick_episodes(tasks, data.n_episodes, episodes)
    success = data.episode_info("success")
    returns = data.episode_info("return")
    rows = []
    fig = Figure(figsize=(3.2 * moments, 3.0 * len(chosen)), dpi=80)
    canvas = FigureCanvasAgg(fig)
    for r, i in enumerate(chosen):
        ep = data.episode(int(i), ["point_cloud", "agent_pos"])
        T = len(ep["point_cloud"])
        task = tasks[i] if tasks is not None else "?"
        ok = None if success is None else bool(success[i])
        rows.append({"episode": int(i), "task": task, "steps": T, "success": ok,
                     "return": None if returns is None else float(returns[i])})
        try:
            ee = ep["agent_pos"][:, :3] if suite_of(task) == "metaworld" else None
        except UserError:
            ee = None
        at = np.linspace(0, T - 1, num=moments, dtype=int)
        lim = _limits([ep["point_cloud"][t] for t in at], [ee], None)
        for c, t in enumerate(at):
            ax = fig.add_subplot(len(chosen), moments, r * moments + c + 1, projection="3d")
            verdict = {None: "success unknown", True: "success", False: "failure"}[ok]
            title = f"ep {i} {task}: {verdict}\nstep {t}/{T}" if c == 0 else f"step {t}/{T}"
            _draw(ax, ep["point_cloud"][t], lim, None if ee is None else ee[: t + 1], None, title)
    fig.tight_layout()
    canvas.draw()
    with atomic_write(path) as tmp:
        fig.savefig(tmp)
    return Path(path), rows


# ---------------------------------------------------------------------------------------
# The command
def run(cfg) -> dict[str, Any]:
    """``sodp3d viz ckpt=<run|file> [task=..]`` (rollouts) or ``sodp3d viz data=<zarr>``; returns
    the record: what was drawn, one row per rollout or episode, and the files written."""
    has_ckpt, has_data = cfg.get("ckpt") is not None, cfg.get("data") is not None
    if has_ckpt == has_data:
        raise UserError("pass exactly one of ckpt=<checkpoint or run dir> (a rollout) or data=<path.zarr> (a dataset view)")
    if has_data:
        data = Path(str(cfg.data))
        out = Path(str(cfg.out)) if cfg.get("out") else data.parent / f"{data.stem}-viz"
        n = int(cfg.episodes) if cfg.get("episodes") is not None else 6
        if n <= 0:
            raise UserError(f"episodes must be a positive integer, got {n}")
        png, rows = dataset_figure(data, out / "episodes.png", n)
        return {"kind": "viz", "view": "data", "files": [str(png)], "rows": rows}

    from sodp3d.checkpoint import acting_env_config, checkpoint_path, policy_from_checkpoint
    from sodp3d.envs import resolve_tasks
    from sodp3d.evaluate import check_policy_fits
    from sodp3d.runs import resolve_device

    ckpt = checkpoint_path(cfg.ckpt)
    policy, payload = policy_from_checkpoint(ckpt, device=resolve_device(str(cfg.device)), use_ema=bool(cfg.use_ema))
    env_cfg = acting_env_config(cfg.env, payload)
    if cfg.get("task") is not None:
        tasks = resolve_tasks(cfg.task)
    elif payload.get("task"):
        tasks = [str(payload["task"])]  # a fine-tuning checkpoint knows its task
    else:
        raise UserError("this checkpoint does not name one task; pass task=<task>")
    n = int(cfg.episodes) if cfg.get("episodes") is not None else 1
    if n <= 0:
        raise UserError(f"episodes must be a positive integer, got {n}")
    out = Path(str(cfg.out)) if cfg.get("out") else ckpt.parent.parent / "viz"
    files, rows = [], []
    for task in tasks:
        check_policy_fits(policy, task, env_cfg)
        for e in range(n):
            seed = int(cfg.seed) + e
            record = record_rollout(policy, task, env_cfg, seed)
            written = write_rollout(record, out / f"{task}-seed{seed}", float(cfg.fps), bool(cfg.get("mp4", True)),
                                    bool(cfg.get("html", True)))
            files += [str(f) for f in written.values()]
            rows.append({"task": task, "seed": seed, "steps": record.steps, "success": record.success,
                         "return": record.ret})
    return {"kind": "viz", "view": "rollout", "files": files, "rows": rows}


def render(record: dict[str, Any]) -> str:
    """The record's rows as a markdown table, and the files written."""
    if record["view"] == "data":
        lines = ["| episode | task | steps | success | return |", "|---:|---|---:|---|---:|"]
        for row in record["rows"]:
            ok = "-" if row["success"] is None else ("yes" if row["success"] else "no")
            ret = "-" if row["return"] is None else f"{row['return']:.1f}"
            lines.append(f"| {row['episode']} | {row['task']} | {row['steps']} | {ok} | {ret} |")
    else:
        lines = ["| task | seed | steps | success | return |", "|---|---:|---:|---|---:|"]
        for row in record["rows"]:
            lines.append(f"| {row['task']} | {row['seed']} | {row['steps']} | {'yes' if row['success'] else 'no'} "
                         f"| {row['return']:.1f} |")
    return "\n".join(lines) + "\n\nwrote " + ", ".join(record["files"])
