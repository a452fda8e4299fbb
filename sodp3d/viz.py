"""What the policy sees: point-cloud rollouts and dataset views, rendered headless.

* ``record_rollout``: one episode of a policy, one frame per decision (the newest
  observed cloud, the end-effector path executed so far, and the path the predicted
  action sequence would take from there).
* ``rollout_gif`` / ``rollout_mp4`` / ``rollout_html``: that episode as an animated GIF
  (matplotlib, Agg), the same frames as an MP4 (imageio-ffmpeg), and as an interactive
  plotly page (the cloud can be turned by hand; offline, the
  plotly library is embedded).
* ``rollout_rrd``: the same episode as a Rerun recording (``.rrd``, rerun-sdk): the cloud
  at every decision, the executed and predicted hand paths, actions, rewards and success
  as time series, all on the ``step`` timeline. Written to a file, never streamed to a
  viewer unless asked (``spawn``).
* ``dataset_figure``: some episodes of a zarr dataset, three moments each, with their
  end-effector path and whether they succeeded; ``dataset_rrd``: those episodes as Rerun
  recordings, every step.

Shapes: N points, C = 3 (xyz) or 6 (xyz, RGB in [0, 1]); T steps; Tp predicted steps; Da
action dims.
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
    actions: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))   # (T, Da) executed, step by step
    rewards: np.ndarray = field(default_factory=lambda: np.zeros(0))        # (T,)
    successes: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # (T,) the env's flag at each step
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
    """Records the end-effector position after reset and after every step, and every
    step's action, reward and success flag."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.path: list[np.ndarray] = []
        self.steps: list[tuple[np.ndarray, float, bool]] = []

    def reset(self, **kwargs):
        out = self.env.reset(**kwargs)
        self.path = [self.env.unwrapped.end_effector()]
        self.steps = []
        return out

    def step(self, action):
        out = self.env.step(action)
        self.path.append(self.env.unwrapped.end_effector())
        self.steps.append((np.asarray(action, np.float32), float(out[1]), bool(out[4].get("success", False))))
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
    if recorder.steps:
        record.actions = np.stack([a for a, _, _ in recorder.steps])
        record.rewards = np.array([r for _, r, _ in recorder.steps], np.float32)
        record.successes = np.array([ok for _, _, ok in recorder.steps], bool)
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


ROLLOUT_FORMATS = ("gif", "mp4", "html", "rerun")
DATA_FORMATS = ("png", "rerun")
DEFAULT_FORMATS = {"rollout": ("gif", "mp4", "html"), "data": ("png",)}
_EXTENSIONS = {"gif": "gif", "mp4": "mp4", "html": "html", "rerun": "rrd"}


def parse_formats(value: Any, view: str) -> tuple[str, ...]:
    """The formats to write for a ``view`` ('rollout' or 'data'): a name, a list or a
    comma-separated string of them, ``all``, or None (the view's defaults)."""
    valid = ROLLOUT_FORMATS if view == "rollout" else DATA_FORMATS
    if value is None:
        return DEFAULT_FORMATS[view]
    items = [value] if isinstance(value, str) else list(value)
    names = [n.strip() for item in items for n in str(item).split(",") if n.strip()]
    if "all" in names:
        return valid
    bad = [n for n in names if n not in valid]
    if bad or not names:
        what = "a rollout" if view == "rollout" else "a dataset view"
        raise UserError(f"unknown format '{','.join(bad) or value}' for {what}; valid: {', '.join(valid)}, all")
    return tuple(n for n in valid if n in names)


def write_rollout(record: RolloutRecord, stem: Path, fps: float = 4.0,
                  formats: tuple[str, ...] = DEFAULT_FORMATS["rollout"]) -> dict[str, Path]:
    """The rollout's views next to each other: ``<stem>.gif``, ``.mp4`` (the same frames,
    drawn once), ``.html`` and ``.rrd`` (Rerun), those in ``formats``; returns them by kind."""

    def named(kind: str) -> Path:  # a stem may hold dots, so no with_suffix
        return stem.parent / f"{stem.name}.{_EXTENSIONS[kind]}"

    images = rollout_images(record) if {"gif", "mp4"} & set(formats) else None
    files = {}
    if "gif" in formats:
        files["gif"] = rollout_gif(record, named("gif"), fps=fps, images=images)
    if "mp4" in formats:
        files["mp4"] = rollout_mp4(record, named("mp4"), fps=fps, images=images)
    if "html" in formats:
        files["html"] = rollout_html(record, named("html"))
    if "rerun" in formats:
        files["rerun"] = rollout_rrd(record, named("rerun"))
    return files


# ---------------------------------------------------------------------------------------
# Rerun recordings
RERUN_APP = "sodp3d"
TIMELINE = "step"  # env steps since reset


def _rgb8(cloud: np.ndarray, zlim: tuple[float, float]) -> np.ndarray:
    """(N, 3) uint8: the GIF's colours (recorded RGB, or height through viridis)."""
    return np.round(255 * _colours(cloud, zlim)[:, :3]).astype(np.uint8)


def _write_rrd(path: str | Path, name: str, clouds: list[tuple[int, np.ndarray]], zlim: tuple[float, float],
               executed: np.ndarray | None, predicted: list[tuple[int, np.ndarray | None]],
               actions: np.ndarray | None, rewards: np.ndarray | None, successes: np.ndarray | None,
               summary: str) -> Path:
    """One episode as a Rerun recording on the ``step`` timeline, written atomically.

    ``clouds``: (step, (N, C) cloud) pairs; ``executed``: (T + 1, 3) or (T, 3) hand
    positions, row t at step t (the path so far is logged at every step);
    ``predicted``: (step, (K, 3) path) pairs; ``actions`` (T, Da), ``rewards`` (T,),
    ``successes`` (T,): row t at step t."""
    import uuid

    import rerun as rr

    with atomic_write(path) as tmp:
        rec = rr.RecordingStream(RERUN_APP, recording_id=uuid.uuid4(), send_properties=False)
        rec.set_log_time_enabled(False)  # the step timeline alone: the same episode gives the same file
        rec.save(tmp)
        rec.send_recording_name(name)
        rec.log("world", rr.ViewCoordinates.RIGHT_HAND_Z_UP, static=True)
        rec.log("summary", rr.TextDocument(summary, media_type=rr.MediaType.MARKDOWN), static=True)
        if actions is not None and actions.size:
            rec.log("action", rr.SeriesLines(names=[f"a{i}" for i in range(actions.shape[1])]), static=True)
        for step, cloud in clouds:
            rec.set_time(TIMELINE, sequence=int(step))
            rec.log("world/point_cloud", rr.Points3D(cloud[:, :3], colors=_rgb8(cloud, zlim), radii=0.004))
        for step, path_ in predicted:
            if path_ is not None and len(path_):
                rec.set_time(TIMELINE, sequence=int(step))
                rec.log("world/hand/predicted", rr.LineStrips3D([path_], colors=[[255, 140, 0]], radii=0.002))
        if executed is not None:
            for t in range(len(executed)):
                rec.set_time(TIMELINE, sequence=t)
                rec.log("world/hand/executed", rr.LineStrips3D([executed[: t + 1]], colors=[[220, 20, 60]], radii=0.003))
        for name, series in (("action", actions), ("reward", rewards), ("success", successes)):
            for t in range(0 if series is None else len(series)):
                rec.set_time(TIMELINE, sequence=t)
                rec.log(name, rr.Scalars(np.asarray(series[t], np.float64)))
        rec.flush()
        rec.disconnect()  # closes the file, footer written
    return Path(path)


def rollout_rrd(record: RolloutRecord, path: str | Path) -> Path:
    """The rollout as a Rerun recording: the cloud at every decision (coloured as in the
    GIF), the executed hand path at every step and the predicted one at every decision,
    actions, rewards and success at every step; written atomically."""
    if not record.frames:
        raise UserError("the rollout has no frames")
    low, high = record.limits()
    summary = (f"**{record.task}**, seed {record.seed}: {'success' if record.success else 'failure'}, "
               f"return {record.ret:.1f}, {record.steps} steps")
    return _write_rrd(path, f"{record.task} seed {record.seed}", [(f.step, f.cloud) for f in record.frames],
                      (low[2], high[2]), record.executed, [(f.step, f.predicted) for f in record.frames],
                      record.actions, record.rewards, record.successes, summary)


def open_viewer(files: list[str | Path]) -> None:
    """Opens the Rerun viewer on ``files`` (a separate process; needs a display)."""
    import subprocess
    import sys

    subprocess.Popen([sys.executable, "-m", "rerun", *map(str, files)], start_new_session=True)


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


def _shown_episodes(data_path: str | Path, episodes: int):
    """(the dataset, one row per episode shown: index, task, steps, success, return)."""
    from sodp3d.data.store import EpisodeDataset

    data = EpisodeDataset(data_path)
    if data.n_episodes == 0:
        raise UserError(f"{data_path} holds no episodes")
    if "point_cloud" not in data.keys:
        raise UserError(f"{data_path} has no point clouds to show (keys: {', '.join(data.keys)})")
    tasks = data.episode_tasks
    chosen = pick_episodes(tasks, data.n_episodes, episodes)
    success = data.episode_info("success")
    returns = data.episode_info("return")
    lengths = data.episode_ends - data.episode_starts()
    rows = []
    for i in chosen:
        i = int(i)
        rows.append({"episode": i, "task": tasks[i] if tasks is not None else "?", "steps": int(lengths[i]),
                     "success": None if success is None else bool(success[i]),
                     "return": None if returns is None else float(returns[i])})
    return data, rows


def _hand_path(ep: dict[str, np.ndarray], task: str) -> np.ndarray | None:
    """The episode's hand positions (Meta-World's agent_pos starts with them), or None."""
    from sodp3d.envs.tasks import suite_of

    try:
        return ep["agent_pos"][:, :3] if "agent_pos" in ep and suite_of(task) == "metaworld" else None
    except UserError:
        return None


def _verdict(success: bool | None) -> str:
    return {None: "success unknown", True: "success", False: "failure"}[success]


def dataset_figure(data_path: str | Path, path: str | Path, episodes: int = 6, moments: int = 3) -> tuple[Path, list[dict]]:
    """A PNG grid: rows are episodes, columns moments of the episode (first to last step);
    returns the file and one row per episode shown (index, task, steps, success, return)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data, rows = _shown_episodes(data_path, episodes)
    fig = Figure(figsize=(3.2 * moments, 3.0 * len(rows)), dpi=80)
    canvas = FigureCanvasAgg(fig)
    for r, row in enumerate(rows):
        i, task, ok = row["episode"], row["task"], row["success"]
        ep = data.episode(i, [k for k in ("point_cloud", "agent_pos") if k in data.keys])
        T = len(ep["point_cloud"])
        ee = _hand_path(ep, task)
        at = np.linspace(0, T - 1, num=moments, dtype=int)
        lim = _limits([ep["point_cloud"][t] for t in at], [ee], None)
        for c, t in enumerate(at):
            ax = fig.add_subplot(len(rows), moments, r * moments + c + 1, projection="3d")
            title = f"ep {i} {task}: {_verdict(ok)}\nstep {t}/{T}" if c == 0 else f"step {t}/{T}"
            _draw(ax, ep["point_cloud"][t], lim, None if ee is None else ee[: t + 1], None, title)
    fig.tight_layout()
    canvas.draw()
    with atomic_write(path) as tmp:
        fig.savefig(tmp)
    return Path(path), rows


def dataset_rrd(data_path: str | Path, out: str | Path, episodes: int = 6) -> tuple[list[Path], list[dict]]:
    """The episodes ``dataset_figure`` shows, each as a Rerun recording ``<out>/episode-<i>.rrd``:
    the cloud at every step, the hand path (Meta-World), actions, rewards and success;
    returns the files and one row per episode."""
    data, rows = _shown_episodes(data_path, episodes)
    files = []
    for row in rows:
        i, task = row["episode"], row["task"]
        ep = data.episode(i, [k for k in ("point_cloud", "agent_pos", "action", "reward", "success") if k in data.keys])
        clouds = ep["point_cloud"]
        ee = _hand_path(ep, task)
        low, high = _limits(list(clouds), [ee], None)
        summary = f"**{Path(str(data_path)).name}**, episode {i} ({task}): {_verdict(row['success'])}, {len(clouds)} steps"
        files.append(_write_rrd(Path(out) / f"episode-{i}.rrd", f"{task} episode {i}", list(enumerate(clouds)),
                                (low[2], high[2]), ee, [], ep.get("action"), ep.get("reward"), ep.get("success"),
                                summary))
    return files, rows


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
        formats = parse_formats(cfg.get("format"), "data")
        _check_spawn(cfg, formats)
        n = int(cfg.episodes) if cfg.get("episodes") is not None else 6
        if n <= 0:
            raise UserError(f"episodes must be a positive integer, got {n}")
        files = []
        if "png" in formats:
            png, rows = dataset_figure(data, out / "episodes.png", n)
            files.append(png)
        if "rerun" in formats:
            rrds, rows = dataset_rrd(data, out, n)
            files += rrds
        _maybe_view(cfg, files)
        return {"kind": "viz", "view": "data", "files": [str(f) for f in files], "rows": rows}

    from sodp3d.checkpoint import acting_env_config, checkpoint_path, policy_from_checkpoint, refuse_foreign_frame
    from sodp3d.envs import resolve_tasks
    from sodp3d.evaluate import check_policy_fits
    from sodp3d.runs import resolve_device

    formats = parse_formats(cfg.get("format"), "rollout")
    _check_spawn(cfg, formats)
    ckpt = checkpoint_path(cfg.ckpt)
    policy, payload = policy_from_checkpoint(ckpt, device=resolve_device(str(cfg.device)), use_ema=bool(cfg.use_ema))
    refuse_foreign_frame(payload, bool(cfg.get("allow_foreign_frame", False)), str(ckpt))
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
            written = write_rollout(record, out / f"{task}-seed{seed}", float(cfg.fps), formats)
            files += [str(f) for f in written.values()]
            rows.append({"task": task, "seed": seed, "steps": record.steps, "success": record.success,
                         "return": record.ret})
    _maybe_view(cfg, files)
    return {"kind": "viz", "view": "rollout", "files": files, "rows": rows}


def _check_spawn(cfg, formats: tuple[str, ...]) -> None:
    if cfg.get("spawn", False) and "rerun" not in formats:
        raise UserError("spawn=true opens the Rerun viewer on the recordings written; add format=rerun")


def _maybe_view(cfg, files: list) -> None:
    """``spawn=true`` opens the Rerun viewer on the recordings written; nothing is opened otherwise."""
    if cfg.get("spawn", False):
        open_viewer([f for f in files if str(f).endswith(".rrd")])


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
