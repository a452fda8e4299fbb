"""Checkpoints: one file holds everything needed to act or to resume training.

Contents: format tag and version, the policy config (shapes, horizons, encoder, U-Net,
schedule), the policy weights (normaliser included), EMA weights, optimiser and LR
scheduler states, the step count, RNG states, and the run's config. A pre-training
checkpoint also records the frame its training clouds were in (``cloud_frame``: "world",
or "dp3" for a DP3-layout store); acting in sodp3d's environments with a policy trained
in another frame is refused unless asked (``refuse_foreign_frame``).

Writes are atomic (a temporary file in the same folder, fsync, rename), so a kill
leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import copy
import os
import warnings
import tempfile
from pathlib import Path
from typing import Any

import torch

from sodp3d.errors import UserError

FORMAT = "sodp3d-policy"
VERSION = 1


class _Sink:
    """A file whose write failures are kept: torch.save reports them as a RuntimeError
    that no longer says what the operating system said (a full disk, say)."""

    def __init__(self, f):
        self.f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_checkpoint(path: str | Path, payload: dict[str, Any], last_good: str | None = None) -> None:
    """Writes ``payload`` to ``path`` atomically. A write that fails with an operating-system
    error (no space left on device, ...) leaves no partial file and is a UserError of one
    line: the path, the cause, and what is intact (``last_good``, e.g. "step 400", names
    the checkpoint already at ``path``)."""
    from sodp3d.files import write_failed

    path = Path(path)
    payload = {"format": FORMAT, "version": VERSION, **payload}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_failed(path, e, _intact(path, last_good)) from None
    sink = None
    try:
        with os.fdopen(fd, "wb") as f:
            sink = _Sink(f)
            torch.save(payload, sink)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        cause = e if isinstance(e, OSError) else (sink.error if sink is not None else None)
        if cause is not None and isinstance(e, (OSError, RuntimeError)):
            raise write_failed(path, cause, _intact(path, last_good)) from None
        raise
    # A writer killed mid-save leaves its temporary file behind; the new checkpoint
    # supersedes it (one writer per run directory).
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def _intact(path: Path, label: str | None) -> str:
    from sodp3d.files import last_good

    if not path.exists():
        return "no checkpoint was written before"
    return last_good(label, path) if label else f"the last good checkpoint is {path}"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        # Garbage makes the unpickler warn before it fails; keep its warnings for readable files only.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            payload = torch.load(path, map_location=map_location, weights_only=True)
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - garbage bytes fail inside the unpickler in many ways
        # (UnpicklingError, BadZipFile, EOFError, IndexError, KeyError, AssertionError, ...)
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}); it is corrupt or not a torch file") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is not a sodp3d policy checkpoint")
    if payload.get("version") != VERSION:
        raise UserError(f"{path} is a sodp3d checkpoint of version {payload.get('version')}; this sodp3d reads {VERSION}")
    return payload


def refuse_other_method(payload: dict[str, Any], method: str, ckpt: Path) -> None:
    """A run's checkpoint is resumed by the method that made it, or refused in one line."""
    made = str(payload.get("method", "ppo"))
    if made != method:
        raise UserError(f"{ckpt} was made by method={made}; resume it with method={made}, or fine-tune into another out")


def policy_from_checkpoint(path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True):
    """(the policy of a checkpoint, ready to act (EMA weights when present), the payload).
    A checkpoint of ``method=noise-sac`` acts as its planner steered by its noise policy."""
    payload = load_checkpoint(path)
    policy = policy_from_payload(payload, device, use_ema, source=str(path))
    if payload.get("noise_policy") is not None:
        from sodp3d.finetune.steering import steered_from_payload

        policy = steered_from_payload(policy, payload)
    return policy, payload


def policy_from_payload(payload: dict[str, Any], device: str | torch.device = "cpu", use_ema: bool = True,
                        source: str = "the checkpoint"):
    """The policy of a loaded checkpoint (EMA weights when present), in eval mode."""
    from sodp3d.policy import DiffusionPolicy, PolicyConfig

    config = PolicyConfig(**payload["policy_config"])
    policy = DiffusionPolicy(config)
    state = payload.get("ema_policy") if use_ema and payload.get("ema_policy") is not None else payload["policy"]
    try:
        policy.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"{source}: weights do not fit the policy its config describes ({str(e).splitlines()[0]})") from None
    return policy.to(device).eval()


def checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or a run directory's ``checkpoints/latest.ckpt``."""
    p = Path(str(path))
    return p / "checkpoints" / "latest.ckpt" if p.is_dir() else p


def _changed(given: Any, default: Any) -> Any:
    """The leaves of ``given`` that differ from ``default`` (nested dicts; lists are leaves)."""
    if not isinstance(given, dict) or not isinstance(default, dict):
        return given
    out = {}
    for k, v in given.items():
        if k not in default:
            out[k] = v
        elif isinstance(v, dict) and isinstance(default[k], dict):
            sub = _changed(v, default[k])
            if sub:
                out[k] = sub
        elif v != default[k]:
            out[k] = v
    return out


def acting_env_config(env_cfg: Any, payload: dict[str, Any]) -> Any:
    """The observation settings to act with: those the checkpoint was trained with, with
    every setting the user changed from the defaults on top. A run made with, say, 128
    points is evaluated with 128 points without repeating the override, and
    ``env.metaworld.episode_length=200`` changes only that."""
    from omegaconf import DictConfig, OmegaConf

    from sodp3d.envs.settings import default_env_config

    trained = (payload.get("train_config") or {}).get("env")
    if trained is None:
        return env_cfg
    given = OmegaConf.to_container(env_cfg, resolve=True) if isinstance(env_cfg, DictConfig) else env_cfg
    changed = _changed(given or {}, OmegaConf.to_container(default_env_config(), resolve=True))
    trained = copy.deepcopy(trained)
    # A suite-level key the user set also beats the per-task entries the checkpoint recorded.
    for suite, keys in changed.items():
        if isinstance(keys, dict) and isinstance(trained.get(suite), dict):
            for entry in (trained[suite].get("tasks") or {}).values():
                for k in keys:
                    if k != "tasks" and isinstance(entry, dict):
                        entry.pop(k, None)
    return OmegaConf.merge(OmegaConf.create(trained), changed)


def refuse_foreign_frame(payload: dict[str, Any], allow: bool, source: str) -> None:
    """A UserError when the checkpoint's policy was trained on clouds in another frame than
    the world frame sodp3d's environments observe (a DP3-layout store), unless ``allow``."""
    from sodp3d.data.store import FRAME_NOTES, WORLD_FRAME

    frame = str(payload.get("cloud_frame") or WORLD_FRAME)
    if frame == WORLD_FRAME or allow:
        return
    raise UserError(f"{source} was trained on clouds in {FRAME_NOTES.get(frame, frame)}, not the world frame "
                    "sodp3d's environments observe, so its policy would act on clouds in a frame it never saw; "
                    "pass allow_foreign_frame=true to use it anyway")
