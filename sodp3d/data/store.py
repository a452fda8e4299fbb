"""Episode datasets in zarr: our layout (written and read) and DP3's (read).

Layout (T steps in all, E episodes, N points, C = 3 or 6):

    data/point_cloud  (T, N, C) float32   world-frame clouds
    data/image        (T, H, W, C) uint8  the camera's image (C = 3 rgb, 4 rgbd), when collected
                                          with env.<suite>.image; chunks of 100 steps, compressed
    data/agent_pos    (T, Dp)   float32
    data/state        (T, Ds)   float32   the env's low-dim observation
    data/action       (T, Da)   float32
    data/reward       (T,)      float32
    data/success      (T,)      bool
    meta/episode_ends (E,)      int64     cumulative, as DP3
    meta/episode_task (E,)      str
    meta/episode_*    (E,)      per-episode records: success, return, and how the
                                collector acted (source, noise level, episode kind)
    attrs: format, format_version, n_episodes (the commit counter), per-task observation
           settings, cameras, crop, N, source, package versions

Data are chunked by 100 steps and compressed with Blosc zstd.

Crash safety: an episode is appended array by array and then *committed* by writing
``n_episodes`` into the root attributes (one file, written atomically by zarr's local
store). An appender first cuts every array back to the committed length (and says how
many frames it dropped), so a kill loses at most the episode in progress. Readers check
that a store is whole (``check_whole``): episode ends strictly increasing, every data
array as long as the last end, one per-episode record per episode; a store cut inside an
episode is refused in one line that says to run the collection again.

Readers can find the first NaN or infinite value of an array (``first_non_finite``,
``EpisodeDataset.refuse_non_finite``: a UserError naming the array, episode and step),
reading chunk by chunk.

DP3 layout (``data/{point_cloud, state, action}``, ``meta/episode_ends``, zarr v2 or v3):
read with ``agent_pos`` taken from DP3's ``data/state`` and ``state`` from
``data/full_state`` when present. DP3 stores colour (channels 3:6) in 0-255: such a
store's colour is read scaled to [0, 1] (detected from the stored values). Its clouds
are in DP3's frame, not ours (``cloud_frame``, ``DP3_FRAME``): they are read as they are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from sodp3d.errors import UserError

FORMAT = "sodp3d-episodes"
FORMAT_VERSION = 1
CHUNK_STEPS = 100
STEP_KEYS = ("point_cloud", "agent_pos", "state", "action", "reward", "success")
_DTYPES = {"success": np.bool_, "image": np.uint8}


def _compressor() -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def inspect_path(path: str | Path) -> str:
    """'missing', 'sodp3d', 'dp3', or 'foreign' (something else is there)."""
    p = Path(path)
    if not p.exists():
        return "missing"
    if p.is_dir() and not any(p.iterdir()):
        return "missing"
    try:
        root = zarr.open_group(str(p), mode="r")
    except Exception:
        return "foreign"
    if root.attrs.get("format") == FORMAT:
        return "sodp3d"
    try:
        if "data" in root and "meta" in root and "episode_ends" in root["meta"] and "action" in root["data"]:
            return "dp3"
    except Exception:
        pass
    return "foreign"


def first_non_finite(array: Any, n_rows: int) -> tuple[int, float] | None:
    """(row, value) of the first NaN or infinite value in ``array[:n_rows]`` (numpy or zarr),
    or None. Reads block by block, whole chunks of the array at a time, so memory stays
    bounded however large the store."""
    row_size = max(1, int(np.prod(array.shape[1:])))
    chunk = int(array.chunks[0]) if getattr(array, "chunks", None) else CHUNK_STEPS
    block = chunk * max(1, (1 << 22) // (chunk * row_size))  # whole chunks, about 4M values a block
    for start in range(0, n_rows, block):
        values = np.asarray(array[start : min(start + block, n_rows)])
        if values.dtype.kind not in "fc":
            return None  # integers and booleans cannot be non-finite
        finite = np.isfinite(values)
        if not finite.all():
            flat = np.argmin(finite.reshape(len(values), -1), axis=None)
            row, col = divmod(int(flat), row_size)
            return start + row, float(values.reshape(len(values), -1)[row, col])
    return None


class EpisodeWriter:
    """Appends whole episodes to a dataset of our layout, committing each one."""

    def __init__(self, root: zarr.Group, path: str | Path = "the dataset"):
        self.root = root
        self.path = str(path)
        self.dropped_frames = self._repair()  # of an episode cut before its commit

    # -- creation / opening ----------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, attrs: dict[str, Any]) -> "EpisodeWriter":
        root = zarr.open_group(str(path), mode="w")
        root.create_group("data")
        meta = root.create_group("meta")
        meta.create_array("episode_ends", shape=(0,), chunks=(4096,), dtype="int64")
        meta.create_array("episode_task", shape=(0,), chunks=(4096,), dtype=str)
        root.attrs.update(_jsonable({**attrs, "format": FORMAT, "format_version": FORMAT_VERSION, "n_episodes": 0}))
        return cls(root, path)

    @classmethod
    def open(cls, path: str | Path) -> "EpisodeWriter":
        kind = inspect_path(path)
        if kind != "sodp3d":
            raise UserError(_not_ours(path, kind))
        root = zarr.open_group(str(path), mode="r+")
        version = root.attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise UserError(f"{path} is a sodp3d dataset of format version {version}; this sodp3d writes {FORMAT_VERSION}")
        return cls(root, path)

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.root.attrs)

    def update_attrs(self, **values: Any) -> None:
        self.root.attrs.update(_jsonable(values))

    # -- state -------------------------------------------------------------------------
    @property
    def n_episodes(self) -> int:
        return int(self.root.attrs.get("n_episodes", 0))

    def episode_tasks(self) -> list[str]:
        return [str(t) for t in self.root["meta/episode_task"][: self.n_episodes]]

    def _repair(self) -> int:
        """Cut every array back to the last committed episode; returns how many frames
        (steps) of an uncommitted episode it dropped. A store whose committed part is not
        whole (see ``check_whole``) is refused: nothing is cut."""
        n = self.n_episodes
        meta = self.root["meta"]
        ends = np.asarray(meta["episode_ends"][:], dtype=np.int64)
        if ends.size < n or (n and (np.any(np.diff(ends[:n]) <= 0) or ends[0] <= 0)):
            check_whole(self.root, "sodp3d", self.path)  # raises, naming what is wrong
        steps = int(ends[n - 1]) if n > 0 else 0
        data = self.root["data"]
        _refuse_short(self.root, n, steps, self.path)
        dropped = 0
        for name in list(meta.array_keys()):
            if meta[name].shape[0] != n:
                meta[name].resize((n,))
        for key in list(data.array_keys()):
            dropped = max(dropped, int(data[key].shape[0]) - steps)
            if n == 0:  # a first episode that never committed may have made only some arrays
                del data[key]
                continue
            arr = data[key]
            if arr.shape[0] != steps:
                arr.resize((steps,) + arr.shape[1:])
        return dropped

    # -- appending ---------------------------------------------------------------------
    def append_episode(self, episode: dict[str, np.ndarray], task: str, info: dict[str, Any] | None = None) -> None:
        """Append one episode and commit it.

        ``episode[key]`` has a leading time axis, the same length for every key;
        ``info`` holds per-episode scalars stored as ``meta/episode_<name>``.
        """
        lengths = {k: len(v) for k, v in episode.items()}
        if len(set(lengths.values())) != 1 or 0 in lengths.values():
            raise ValueError(f"episode arrays must share a non-zero length, got {lengths}")
        steps = next(iter(lengths.values()))
        data = self.root["data"]
        existing = set(data.array_keys())
        if existing and existing != set(episode):
            raise ValueError(f"episode keys {sorted(episode)} differ from the dataset's {sorted(existing)}")
        values = {k: np.asarray(v, dtype=_DTYPES.get(k, np.float32)) for k, v in episode.items()}
        for key, value in values.items():  # check everything before writing anything
            if key in existing and data[key].shape[1:] != value.shape[1:]:
                raise ValueError(f"'{key}' has shape {value.shape[1:]} per step, the dataset has {data[key].shape[1:]}")
        try:
            self._write(values, existing, task, info or {}, steps)
        except BaseException:
            try:
                self._repair()  # nothing of this episode stays; the commit never happened
            except OSError:
                pass  # (a full disk, say) the uncommitted tail stays, and the next writer drops it
            raise

    def _write(self, values: dict[str, np.ndarray], existing: set, task: str, info: dict[str, Any], steps: int) -> None:
        data = self.root["data"]
        for key, value in values.items():
            if key not in existing:
                data.create_array(
                    key,
                    shape=(0,) + value.shape[1:],
                    chunks=(CHUNK_STEPS,) + value.shape[1:],
                    dtype=value.dtype,
                    compressors=_compressor(),
                )
            data[key].append(value)
        meta = self.root["meta"]
        n = self.n_episodes
        previous_end = int(meta["episode_ends"][n - 1]) if n else 0
        meta["episode_ends"].append(np.array([previous_end + steps], dtype=np.int64))
        meta["episode_task"].append(np.array([task]))
        existing_meta = set(meta.array_keys())
        for name, value in info.items():
            key = f"episode_{name}"
            value = np.asarray([value])
            if value.dtype.kind in "OU":
                value = value.astype(str)
            if key not in existing_meta:
                meta.create_array(key, shape=(n,), chunks=(4096,), dtype=value.dtype if value.dtype.kind != "U" else str)
            meta[key].append(value)
        self.root.attrs["n_episodes"] = n + 1  # the commit


WORLD_FRAME = "world"
DP3_FRAME = "dp3"
FRAME_NOTES = {  # which frame a store's clouds are in, in words
    WORLD_FRAME: "sodp3d's world frame (the simulator's, cropped by sodp3d's box)",
    DP3_FRAME: ("DP3's frame (camera index 0's pose turned by a fixed rotation, x 61.4 and y -7 degrees, "
                "cropped by DP3's own box that keeps the table)"),
}


class _ColourScaled:
    """A DP3 cloud array (T, N, 6) read with its colour channels scaled from 0-255 to
    [0, 1]; slicing and ``oindex`` as the zarr array it wraps, anything else delegated."""

    def __init__(self, array: Any):
        self._array = array
        self.oindex = _ScaledIndex(array.oindex)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._array, name)

    def __getitem__(self, key: Any) -> np.ndarray:
        return _scale_colour(np.asarray(self._array[key]))


class _ScaledIndex:
    def __init__(self, oindex: Any):
        self._oindex = oindex

    def __getitem__(self, key: Any) -> np.ndarray:
        return _scale_colour(np.asarray(self._oindex[key]))


def _scale_colour(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float32, copy=True)
    values[..., 3:6] /= 255.0
    return values


def _colour_range(path: str | Path, array: Any, n_steps: int) -> str:
    """'unit' ([0, 1]) or '255' (0-255) for the colour channels of a DP3 cloud array,
    from up to 64 steps spread over the store; other ranges are refused."""
    rows = np.unique(np.linspace(0, max(n_steps - 1, 0), num=min(64, max(n_steps, 1)), dtype=np.int64))
    colour = np.asarray(array.oindex[rows])[..., 3:6] if n_steps else np.zeros((0, 3))
    finite = colour[np.isfinite(colour)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if low < 0 or high > 255:
        raise UserError(f"{path}: the colour channels of data/point_cloud range over [{low:g}, {high:g}]; "
                        "expected [0, 1] or DP3's 0-255")
    return "255" if high > 1.0 else "unit"


def _not_ours(path: str | Path, kind: str) -> str:
    if kind == "missing":
        return f"no dataset at {path}"
    if kind == "dp3":
        return f"{path} holds a DP3-layout dataset, not a sodp3d one; sodp3d reads it but does not append to it"
    return f"{path} exists and is not a sodp3d dataset (no '{FORMAT}' format attribute); choose another path"


def _refuse_short(root: zarr.Group, n: int, steps: int, path: str | Path) -> dict[str, int]:
    """The stored lengths of the data (steps) and per-episode (episodes) arrays; a UserError
    when one is shorter than the ``n`` committed episodes of ``steps`` steps need."""
    meta, data = root["meta"], root["data"]
    lengths = {f"data/{k}": int(data[k].shape[0]) for k in data.array_keys()}
    lengths.update({f"meta/{k}": int(meta[k].shape[0]) for k in meta.array_keys() if k != "episode_ends"})
    short = sorted(k for k, v in lengths.items() if v < (steps if k.startswith("data/") else n))
    if short:
        what = f"{steps} steps" if short[0].startswith("data/") else f"{n} episodes"
        raise UserError(f"{path}: {', '.join(short)} {'is' if len(short) == 1 else 'are'} shorter than its {what}; "
                        "the dataset is corrupt")
    return lengths


def check_whole(root: zarr.Group, layout: str, path: str | Path) -> np.ndarray:
    """The committed episode ends of a store, after checking that the store is whole: the
    ends strictly increasing, every data array exactly as long as the last end, and every
    per-episode array (``meta/episode_*``) one entry per episode. A store that is not is a
    UserError saying what is wrong; one cut inside an episode (a collection killed, or
    still running) says that ``collect`` drops the incomplete tail."""
    meta, data = root["meta"], root["data"]
    stored = np.asarray(meta["episode_ends"][:], dtype=np.int64)
    n = int(root.attrs.get("n_episodes", 0)) if layout == "sodp3d" else int(stored.size)
    if stored.size < n:
        raise UserError(f"{path}: meta/episode_ends holds {stored.size} entries but the dataset commits {n} "
                        "episodes; the dataset is corrupt")
    ends = stored[:n]
    if ends.size and (np.any(np.diff(ends) <= 0) or ends[0] <= 0):
        raise UserError(f"{path}: meta/episode_ends is not strictly increasing; the dataset is corrupt")
    steps = int(ends[-1]) if ends.size else 0
    lengths = _refuse_short(root, n, steps, path)
    extra_steps = max([v - steps for k, v in lengths.items() if k.startswith("data/")] + [0])
    extra_episodes = max([v - n for k, v in lengths.items() if k.startswith("meta/")] + [int(stored.size) - n])
    if extra_steps or extra_episodes:
        if layout != "sodp3d":
            raise UserError(f"{path}: its arrays hold {extra_steps} steps past the last of meta/episode_ends "
                            f"({steps}); the dataset is not whole")
        raise UserError(f"{path}: {extra_steps} frames lie past its last committed episode (step {steps}): an "
                        "episode was cut before its commit, by a collection that was killed or is still running; "
                        "run the same sodp3d collect command again to drop them (or finish it)")
    return ends


class EpisodeDataset:
    """Read-only view of the committed episodes of a dataset (ours or DP3's)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.layout = inspect_path(path)
        if self.layout not in ("sodp3d", "dp3"):
            raise UserError(
                f"{path}: " + ("no dataset there" if self.layout == "missing" else
                               "not a sodp3d or DP3 dataset (expected data/ and meta/episode_ends)")
            )
        self.root = zarr.open_group(self.path, mode="r")
        data = self.root["data"]
        self._arrays: dict[str, Any] = {}
        names = set(data.array_keys())
        if self.layout == "dp3":
            mapping = {"point_cloud": "point_cloud", "agent_pos": "state", "action": "action", "state": "full_state"}
            for ours, theirs in mapping.items():
                if theirs in names:
                    self._arrays[ours] = data[theirs]
            for extra in names - set(mapping.values()):
                self._arrays.setdefault(extra, data[extra])
        else:
            self._arrays = {k: data[k] for k in names}
        self.episode_ends = check_whole(self.root, self.layout, path)
        self.cloud_frame = DP3_FRAME if self.layout == "dp3" else WORLD_FRAME  # see FRAME_NOTES
        self.colour_scaled = False  # DP3's 0-255 colour is read in [0, 1]
        cloud = self._arrays.get("point_cloud")
        if self.layout == "dp3" and cloud is not None and cloud.ndim == 3 and cloud.shape[2] >= 6:
            if _colour_range(path, cloud, self.n_steps) == "255":
                self._arrays["point_cloud"] = _ColourScaled(cloud)
                self.colour_scaled = True

    @property
    def n_episodes(self) -> int:
        return int(self.episode_ends.size)

    @property
    def n_steps(self) -> int:
        return int(self.episode_ends[-1]) if self.episode_ends.size else 0

    @property
    def keys(self) -> list[str]:
        return sorted(self._arrays)

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.root.attrs)

    @property
    def episode_tasks(self) -> list[str] | None:
        if self.layout != "sodp3d":
            return None
        return [str(t) for t in self.root["meta/episode_task"][: self.n_episodes]]

    def episode_info(self, name: str) -> np.ndarray | None:
        """A per-episode record (``meta/episode_<name>``) of committed episodes, or None."""
        meta = self.root["meta"]
        key = f"episode_{name}"
        return np.asarray(meta[key][: self.n_episodes]) if key in meta.array_keys() else None

    def episode_starts(self) -> np.ndarray:
        return np.concatenate([[0], self.episode_ends[:-1]]).astype(np.int64)

    def array(self, key: str) -> Any:
        """The stored (lazy, zarr) array behind ``key``; rows past ``n_steps`` are uncommitted."""
        if key not in self._arrays:
            raise UserError(f"{self.path} has no '{key}'; it has: {', '.join(self.keys)}")
        return self._arrays[key]

    def get(self, key: str) -> np.ndarray:
        """All committed steps of one array, in memory."""
        if key not in self._arrays:
            raise UserError(f"{self.path} has no '{key}'; it has: {', '.join(self.keys)}")
        return np.asarray(self._arrays[key][: self.n_steps])

    def stored_name(self, key: str) -> str:
        """Where ``key`` lives in the store (``data/state`` for a DP3 dataset's ``agent_pos``)."""
        return str(self.array(key).path)

    def locate(self, step: int) -> tuple[int, int]:
        """(episode index, step within that episode) of a global step index."""
        episode = int(np.searchsorted(self.episode_ends, step, side="right"))
        return episode, int(step - self.episode_starts()[episode])

    def refuse_non_finite(self, key: str, array: Any = None) -> None:
        """Raise a UserError naming the first NaN or infinite value of ``key``'s committed
        steps (episode and step). ``array`` is what will be used instead of the stored
        array, if anything (the in-memory float32 copy)."""
        array = self.array(key) if array is None else array
        found = first_non_finite(array, self.n_steps)
        if found is not None:
            row, value = found
            episode, step = self.locate(row)
            raise UserError(
                f"{self.path}: {self.stored_name(key)} holds a non-finite value ({value}) at episode {episode}, "
                f"step {step}; the dataset is corrupt: re-collect it or drop that episode"
            )

    def episode(self, i: int, keys: list[str] | None = None) -> dict[str, np.ndarray]:
        if not -self.n_episodes <= i < self.n_episodes:
            raise IndexError(f"episode {i} out of range ({self.n_episodes} episodes)")
        i %= self.n_episodes
        start, end = int(self.episode_starts()[i]), int(self.episode_ends[i])
        return {k: np.asarray(self._arrays[k][start:end]) for k in (keys or self.keys)}

    def summary(self) -> list[dict[str, Any]]:
        """Per task: episodes, steps, success rate, mean return and padded observations
        (where recorded)."""
        tasks = self.episode_tasks or ["(unnamed)"] * self.n_episodes
        padded = self.episode_info("padded") if self.layout == "sodp3d" else None
        has_success = "success" in self._arrays
        has_reward = "reward" in self._arrays
        success = self.get("success") if has_success else None
        reward = self.get("reward") if has_reward else None
        starts = self.episode_starts()
        rows: dict[str, dict[str, Any]] = {}
        for i, task in enumerate(tasks):
            s, e = int(starts[i]), int(self.episode_ends[i])
            row = rows.setdefault(
                task, {"task": task, "episodes": 0, "steps": 0, "successes": 0, "return_sum": 0.0, "padded": 0}
            )
            if padded is not None:
                row["padded"] += int(padded[i])
            row["episodes"] += 1
            row["steps"] += e - s
            if success is not None:
                row["successes"] += int(success[s:e].any())
            if reward is not None:
                row["return_sum"] += float(reward[s:e].sum())
        out = []
        for row in rows.values():
            out.append(
                {
                    "task": row["task"],
                    "episodes": row["episodes"],
                    "steps": row["steps"],
                    "success_rate": row["successes"] / row["episodes"] if has_success else None,
                    "mean_return": row["return_sum"] / row["episodes"] if has_reward else None,
                    "padded_observations": row["padded"] if padded is not None else None,
                }
            )
        return out
