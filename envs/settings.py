"""Per-task observation settings, read from the ``env`` config node and validated.

The suite's defaults apply to every task of that suite; ``tasks.<task>`` overrides any
of them for one task. Validation happens here, once, so that the collector, the
environments and (later) the policy all see the same checked values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sodp3d.errors import UserError

from .camera import IMAGE_MODES, image_channels
from .pointcloud import SAMPLING_METHODS, CropBox
from .tasks import suite_of

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
_KEYS = ("episode_length", "cameras", "resolution", "num_points", "rgb", "sampling", "crop", "image", "point_cloud")
# Keys a config may leave out, with the value they take (configs and checkpoints from before them).
_OPTIONAL = {"image": None, "point_cloud": True}


@dataclass(frozen=True)
class ObsSettings:
    task: str
    suite: str
    episode_length: int
    cameras: tuple[str, ...]
    height: int
    width: int
    num_points: int
    rgb: bool
    sampling: str
    crop: CropBox | None
    image: str | None = None  # rgb | rgbd: the cameras' images as an `image` observation, null: none
    point_cloud: bool = True  # false: no camera at all; the observation is the state and agent_pos

    @property
    def channels(self) -> int:
        return 6 if self.rgb else 3

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """(H, W, C) uint8 of the `image` observation (C = 3 rgb, 4 rgbd), or None."""
        if self.image is None:
            return None
        return (self.height, self.width, image_channels(self.image))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cameras"] = list(self.cameras)
        d["crop"] = None if self.crop is None else self.crop.as_list()
        return d


def default_env_config() -> DictConfig:
    """The packaged ``configs/env/default.yaml``."""
    try:
        from importlib.resources import files

        text = (files("sodp3d.configs") / "env" / "default.yaml").read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        text = (CONFIG_DIR / "env" / "default.yaml").read_text()
    return OmegaConf.create(text)


def _as_dict(node: Any) -> dict:
    if node is None:
        return {}
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    return dict(node)


def task_settings(task: str, env_cfg: DictConfig | dict | None = None) -> ObsSettings:
    """Settings for one task: suite defaults, then that task's overrides, validated."""
    suite = suite_of(task)
    cfg = _as_dict(env_cfg if env_cfg is not None else default_env_config())
    if suite not in cfg:
        raise UserError(f"the env config has no '{suite}' section (needed for task {task})")
    suite_cfg = dict(cfg[suite])
    overrides = _as_dict((suite_cfg.pop("tasks", None) or {}).get(task))
    unknown = set(suite_cfg) - set(_KEYS) or set(overrides) - set(_KEYS)
    if unknown:
        raise UserError(f"unknown env setting(s) {sorted(unknown)} for {task}; valid: {', '.join(_KEYS)}")
    s = {**_OPTIONAL, **suite_cfg, **overrides}
    missing = [k for k in _KEYS if k not in s]
    if missing:
        raise UserError(f"env settings for {task} lack {missing}")

    def where(key: str) -> str:
        """Where the user set ``key``: the task's overrides or the suite's defaults."""
        return f"env.{suite}.tasks.{task}.{key}" if key in overrides else f"env.{suite}.{key}"

    cams = s["cameras"]
    cams = (cams,) if isinstance(cams, str) else tuple(cams or ())
    if not cams:
        raise UserError(f"{where('cameras')} is empty; name at least one camera")
    res = s["resolution"]
    res = (res, res) if isinstance(res, int) else tuple(res)
    if len(res) != 2 or any(not isinstance(r, int) or r <= 0 for r in res):
        raise UserError(f"{where('resolution')} must be [height, width] with positive integers, got {s['resolution']}")
    n = s["num_points"]
    if not isinstance(n, int) or n <= 0:
        raise UserError(f"{where('num_points')} must be a positive integer, got {n}")
    if s["sampling"] not in SAMPLING_METHODS:
        raise UserError(f"{where('sampling')} '{s['sampling']}' is unknown; valid: {', '.join(SAMPLING_METHODS)}")
    ep = s["episode_length"]
    if not isinstance(ep, int) or ep <= 0:
        raise UserError(f"{where('episode_length')} must be a positive integer, got {ep}")
    image = s["image"]
    if image not in (None,) + IMAGE_MODES:
        raise UserError(f"{where('image')} must be {' | '.join(IMAGE_MODES)} | null, got {image!r}")
    if image is not None and len(cams) > 1:
        raise UserError(f"{where('image')}={image} records one camera's image, but {where('cameras')} names "
                        f"{len(cams)} ({', '.join(cams)}); name one camera, or set image=null")
    cloud = s["point_cloud"]
    if not isinstance(cloud, bool):
        raise UserError(f"{where('point_cloud')} must be true or false, got {cloud!r}")
    if not cloud and image is not None:
        raise UserError(f"{where('image')}={image} needs the camera, which {where('point_cloud')}=false leaves out; "
                        "set image=null, or point_cloud=true")
    box = None
    if s["crop"] is not None:
        c = s["crop"]
        try:
            low, high = (c["low"], c["high"]) if isinstance(c, dict) else (c[0], c[1])
            # null (None) leaves a side open, like -inf / +inf
            low = tuple(-math.inf if v is None else float(v) for v in low)
            high = tuple(math.inf if v is None else float(v) for v in high)
            if any(math.isnan(v) for v in low + high):
                raise ValueError("NaN in crop box")
            box = CropBox(low, high)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise UserError(f"{where('crop')} must be {{low: [x, y, z], high: [x, y, z]}} with low < high: {e}") from None
    return ObsSettings(
        task=task,
        suite=suite,
        episode_length=ep,
        cameras=cams,
        height=res[0],
        width=res[1],
        num_points=n,
        rgb=bool(s["rgb"]),
        sampling=s["sampling"],
        crop=box,
        image=image,
        point_cloud=cloud,
    )


# Keys a dataset records per task that define what the policy sees (not the episode length,
# which is an evaluation choice).
OBSERVATION_KEYS = ("cameras", "resolution", "num_points", "rgb", "sampling", "crop", "image", "point_cloud")


def recorded_as_env(recorded: dict[str, Any]) -> dict[str, Any]:
    """A dataset's recorded settings of one task (``ObsSettings.to_dict``) as env-config keys."""
    crop = recorded.get("crop")
    entry = {"cameras": list(recorded["cameras"]), "resolution": [recorded["height"], recorded["width"]],
             "num_points": recorded["num_points"], "rgb": recorded["rgb"], "sampling": recorded["sampling"],
             "crop": None if crop is None else {"low": list(crop[0]), "high": list(crop[1])},
             "image": recorded.get("image"), "point_cloud": recorded.get("point_cloud", True)}
    return {k: entry[k] for k in OBSERVATION_KEYS}


def with_recorded_settings(env_cfg: DictConfig | dict | None, recorded: dict[str, dict]) -> DictConfig:
    """``env_cfg`` with each recorded task's observation settings as its per-task entry."""
    cfg = _as_dict(env_cfg if env_cfg is not None else default_env_config())
    for task, rec in recorded.items():
        suite = rec.get("suite") or suite_of(task)
        if suite not in cfg:
            continue
        tasks = cfg[suite].get("tasks") or {}
        tasks[task] = {**_as_dict(tasks.get(task)), **recorded_as_env(rec)}
        cfg[suite]["tasks"] = tasks
    return OmegaConf.create(cfg)


def require_images(policy, task: str, env_cfg: DictConfig | dict | None) -> None:
    """Refuse, in one line, to act with a policy that reads ``image`` where the env
    settings of ``task`` give none (a checkpoint trained on images, evaluated on a task
    its data did not record, or with image=null): what is missing and how to get it."""
    keys = policy.obs_keys
    if "image" not in keys:
        return
    s = task_settings(task, env_cfg)
    if s.image is None:
        mode = "rgbd" if policy.config.shape_meta["image"][-1] == 4 else "rgb"
        raise UserError(f"the checkpoint's policy reads 'image' observations, which the env settings of {task} do not give "
                        f"(env.{s.suite}.image is null); act with env.{s.suite}.image={mode}, and record data "
                        f"with them: `sodp3d collect task={task} env.{s.suite}.image={mode} out=...`")
