"""The ``expert`` data source (Adroit): DAPG's trained policies, degraded on purpose.

DAPG (Rajeswaran et al., 2018) published one trained policy per Adroit task as a pickled
mjrl ``MLP`` (``dapg/policies/<door|hammer|pen>-v0.pickle`` in the public hand_dapg
repository, Apache-2.0). This module reads them without mjrl and without running
anything the file asks for beyond rebuilding arrays:

  * every global the pickle names is checked against a short list (what DAPG's files
    name: ``collections.OrderedDict``, torch's tensor rebuild helpers and storages, the
    ``Linear`` / ``ModuleList`` classes, numpy's array reconstruction and dtypes, and
    mjrl's two class names) *before* a single opcode runs; anything else is refused in
    one line (``UserError``) naming the global and the file;
  * the allowed names are mapped to small holders of ours (mjrl and torch classes become
    attribute bags, torch tensors become numpy arrays, the old torch backend getter and
    ``torch.tanh`` become inert markers), so unpickling builds plain data only;
  * the tensors' storages (legacy ``torch.save`` streams embedded as bytes) are parsed by
    the same restricted unpickler, their globals checked first as well.

The result is an ``ExpertPolicy``: numpy weights and ``act(obs) -> action``, the
policy's mean action, a = out(MLP((obs - in_shift) / (in_scale + 1e-8))) * out_scale +
out_shift, clipped to [-1, 1] (tanh between the layers, none after the last).

Collection (``source=expert``) follows ``scripted_source``: each episode draws a kind
(``noisy``, ``perturbed`` or ``random``) and a Gaussian action-noise std from the same
knobs (``expert.noise_std``, ``random_share``, ``perturb_share``, ``perturb_prob``,
``perturb_length``, read by ``ScriptedConfig``). The policy reads the env's own float64
observation (the ``state`` key before its float32 cast). An episode's randomness derives
from (seed, task, episode index) only.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import pickletools
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from sodp3d.errors import UserError

from .scripted_source import ScriptedConfig, run_degraded_episode
from .settings import ObsSettings
from .tasks import ADROIT_TASKS, suite_of
from .workers import env_for, run_in_order

# Observation and action dims of each Adroit task (gymnasium-robotics v1 = DAPG's v0).
POLICY_DIMS: dict[str, tuple[int, int]] = {
    "adroit-door": (39, ADROIT_TASKS["adroit-door"][1]),
    "adroit-hammer": (46, ADROIT_TASKS["adroit-hammer"][1]),
    "adroit-pen": (45, ADROIT_TASKS["adroit-pen"][1]),
}
# The file DAPG named each task's policy, as looked up in a directory given as expert.path.
POLICY_FILES: dict[str, str] = {t: f"{t.removeprefix('adroit-')}-v0.pickle" for t in POLICY_DIMS}
WHERE_TO_GET = "DAPG's policies are dapg/policies/<door|hammer|pen>-v0.pickle in the public hand_dapg repository"


# --------------------------------------------------------------------------------------
# What unpickling builds: inert holders in place of mjrl's and torch's objects.
class _Holder:
    """An attribute bag standing in for a pickled class (state set by BUILD)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {sorted(vars(self))}>"


class _MLPHolder(_Holder):
    """mjrl.policies.gaussian_mlp.MLP"""


class _FCNetworkHolder(_Holder):
    """mjrl.utils.fc_network.FCNetwork"""


class _LinearHolder(_Holder):
    """torch.nn.modules.linear.Linear"""


class _ModuleListHolder(_Holder):
    """torch.nn.modules.container.ModuleList"""


class _TorchFunctions:
    """Stands for ``torch._C._VariableFunctions``; only named attributes are read from it."""


_TORCH_FUNCTIONS = _TorchFunctions()
_FUNCTION_NAMES = ("tanh",)  # the only torch function the files name (the nonlinearity)


class _Function(str):
    """The name of a torch function the policy applies (a marker, never called)."""


def _torch_function(owner: Any, name: Any) -> _Function:
    """Stands for ``builtins.getattr``: only ``getattr(torch._C._VariableFunctions, <known>)``."""
    if owner is not _TORCH_FUNCTIONS or name not in _FUNCTION_NAMES:
        raise _Refused(f"getattr on {type(owner).__name__} for {name!r}")
    return _Function(name)


def _no_backend() -> None:
    """Stands for ``torch.nn.backends.thnn._get_thnn_function_backend`` (old torch)."""
    return None


class _PendingStorage:
    """A tensor storage's bytes (a legacy ``torch.save`` stream), decoded after the scan."""

    def __init__(self, payload: bytes):
        if not isinstance(payload, (bytes, bytearray)):
            raise _Refused("a storage that is not bytes")
        self.payload = bytes(payload)
        self.array: np.ndarray | None = None


class _PendingTensor:
    """``_rebuild_tensor_v2``'s arguments; ``resolve()`` gives the array once its storage is decoded."""

    def __init__(self, storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
        if not isinstance(storage, _PendingStorage):
            raise _Refused("a tensor whose storage is not a storage")
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def resolve(self) -> np.ndarray:
        data = self.storage.array if isinstance(self.storage, _PendingStorage) else None
        if data is None:
            raise _Refused("a tensor whose storage was not decoded")
        offset, size, stride = self.offset, self.size, self.stride
        ints = [offset, *size, *stride]
        if len(size) != len(stride) or any(not isinstance(v, int) or v < 0 for v in ints) \
                or int(np.prod(size, dtype=np.int64)) > data.size:  # no tensor repeats its storage's values
            raise _Refused(f"a tensor of size {size}, stride {stride}, offset {offset}")
        last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
        if last >= data.size:
            raise _Refused(f"a tensor of size {size} past the end of its storage ({data.size} values)")
        view = np.lib.stride_tricks.as_strided(data[offset:], shape=size, strides=[s * data.itemsize for s in stride])
        return np.array(view)  # a copy, not a view of the storage


def _rebuild_parameter(data, requires_grad=False, hooks=None) -> _PendingTensor:
    """Stands for ``torch._utils._rebuild_parameter``: a parameter is its tensor."""
    if not isinstance(data, _PendingTensor):
        raise _Refused("a parameter that is not a tensor")
    return data


_NUMERIC_KINDS = "biuf"


def _dtype(spec, align=False, copy=False) -> np.dtype:
    """``numpy.dtype`` for plain numeric types only (no object or structured dtypes)."""
    if not isinstance(spec, str) or np.dtype(spec).kind not in _NUMERIC_KINDS or np.dtype(spec).fields:
        raise _Refused(f"the dtype {spec!r}")
    return np.dtype(spec, bool(align), bool(copy))


def _reconstruct(subtype, shape, dtype_code):
    """``numpy.core.multiarray._reconstruct`` for plain ndarrays. numpy pickles an array as
    an empty one (shape (0,)) whose shape and bytes its ``__setstate__`` then sets."""
    if subtype is not np.ndarray or shape != (0,) or not isinstance(dtype_code, bytes):
        raise _Refused(f"an array of type {subtype!r} and shape {shape!r}")
    return np.ndarray.__new__(np.ndarray, (0,), _dtype(dtype_code.decode("ascii", "replace")))


def _scalar(dtype, data: bytes):
    """``numpy.core.multiarray.scalar`` for numeric dtypes: one value from its bytes."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMERIC_KINDS or not isinstance(data, bytes) \
            or len(data) != dtype.itemsize:
        raise _Refused(f"a scalar of dtype {dtype!r}")
    return np.frombuffer(data, dtype=dtype)[0]


class _StorageType:
    """A legacy storage class named by a storage stream (``torch.FloatStorage``)."""

    def __init__(self, name: str, dtype: str):
        self.name, self.dtype = name, np.dtype(dtype)


# Every global DAPG's policy files name, and what it becomes here. numpy >= 2 moved
# numpy.core to numpy._core; both spellings map to the same holders.
_POLICY_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("mjrl.policies.gaussian_mlp", "MLP"): _MLPHolder,
    ("mjrl.utils.fc_network", "FCNetwork"): _FCNetworkHolder,
    ("torch.nn.modules.linear", "Linear"): _LinearHolder,
    ("torch.nn.modules.container", "ModuleList"): _ModuleListHolder,
    ("torch.nn.backends.thnn", "_get_thnn_function_backend"): _no_backend,
    ("torch._utils", "_rebuild_tensor_v2"): _PendingTensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _PendingStorage,
    ("torch._C", "_VariableFunctions"): _TORCH_FUNCTIONS,
    ("builtins", "getattr"): _torch_function,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
}
# What the storage streams inside them name.
_STORAGE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch", "FloatStorage"): _StorageType("FloatStorage", "<f4"),
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch's legacy serialization magic number
_LEGACY_PROTOCOL = 1001


class _Refused(Exception):
    """Something in a policy file that a DAPG policy file does not hold."""


class _NotAPickle(Exception):
    pass


# --------------------------------------------------------------------------------------
# Scanning: which globals a pickle names, read from its opcodes without running any.
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
_NO_PUSH_OPS = {"MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "FRAME", "PROTO"}
_EXTENSION_OPS = {"EXT1", "EXT2", "EXT4"}


def scan_globals(data: bytes, start: int = 0) -> tuple[list[tuple[str, str]], int]:
    """The (module, name) globals one pickle at ``data[start:]`` names, in order, and the
    offset just past its STOP. Nothing is executed. A global that cannot be read off the
    opcodes (an extension code, a STACK_GLOBAL whose strings are not literals) is
    returned as a name that no allow-list holds."""
    found: list[tuple[str, str]] = []
    memo: dict[int, Any] = {}
    pushed: list[Any] = []  # what the last opcodes pushed: a str, or None for anything else
    try:
        for op, arg, pos in pickletools.genops(io.BytesIO(data[start:])):
            name = op.name
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                found.append((module, attr))
                pushed.append(None)
            elif name == "STACK_GLOBAL":
                module, attr = (pushed[-2], pushed[-1]) if len(pushed) >= 2 else (None, None)
                if not isinstance(module, str) or not isinstance(attr, str):
                    module, attr = "<computed>", "<computed>"
                found.append((module, attr))
                pushed.append(None)
            elif name in _EXTENSION_OPS:
                found.append(("<copyreg extension>", str(arg)))
                pushed.append(None)
            elif name in _STRING_OPS:
                pushed.append(str(arg))
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                pushed.append(memo.get(int(arg)))
            elif name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = pushed[-1] if pushed else None
            elif name not in _NO_PUSH_OPS:
                pushed.append(None)
            if name == "STOP":
                return found, start + pos + 1
    except Exception as e:  # genops raises ValueError, struct errors, ... on malformed input
        raise _NotAPickle(str(e) or type(e).__name__) from None
    raise _NotAPickle("it ends before the pickle's STOP")


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in ``allowed`` (to our holders), and
    persistent ids only through ``persistent`` (None: refused)."""

    def __init__(self, data: bytes, allowed: dict[tuple[str, str], Any], persistent=None):
        super().__init__(io.BytesIO(data))
        self._allowed = allowed
        self._persistent = persistent

    def find_class(self, module: str, name: str):  # noqa: D401
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise _Forbidden(module, name) from None

    def persistent_load(self, pid):
        if self._persistent is None:
            raise _Refused("a persistent id")
        return self._persistent(pid)


class _Forbidden(Exception):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.module, self.name = module, name


def _check_globals(names: list[tuple[str, str]], allowed: dict[tuple[str, str], Any]) -> None:
    for module, name in names:
        if (module, name) not in allowed:
            raise _Forbidden(module, name)


def _restricted_load(data: bytes, allowed: dict[tuple[str, str], Any], persistent=None) -> Any:
    """Unpickle one whole pickle after checking every global it names."""
    names, end = scan_globals(data)
    _check_globals(names, allowed)
    try:
        return _RestrictedUnpickler(data[:end], allowed, persistent).load()
    except (_Forbidden, _Refused):
        raise
    except Exception as e:
        raise _Refused(f"malformed content ({type(e).__name__}: {e})") from None


def _decode_storage(payload: bytes) -> np.ndarray:
    """A storage's values from a legacy ``torch.save`` stream: five pickles (magic number,
    protocol, system info, the storage as a persistent id, the storage keys), then per key
    its element count (int64) and raw little-endian values."""
    pos = 0
    pieces: list[tuple[int, int]] = []
    for _ in range(5):  # scan all five first: nothing is unpickled before every global is checked
        names, end = scan_globals(payload, pos)
        _check_globals(names, _STORAGE_GLOBALS)
        pieces.append((pos, end))
        pos = end
    magic, protocol, info = (_restricted_load(payload[a:b], {}) for a, b in pieces[:3])
    if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL or not isinstance(info, dict):
        raise _Refused("a storage that is not a legacy torch.save stream")
    if info.get("little_endian") is not True:
        raise _Refused("a big-endian storage")
    described: dict[str, tuple[_StorageType, int]] = {}

    def persistent(pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise _Refused(f"a storage id {pid!r}")
        if len(pid) > 5 and pid[5] is not None:
            raise _Refused("a storage view")
        described[pid[2]] = (pid[1], pid[4])
        return pid[2]

    key = _restricted_load(payload[pieces[3][0]:pieces[3][1]], _STORAGE_GLOBALS, persistent)
    keys = _restricted_load(payload[pieces[4][0]:pieces[4][1]], {})
    if keys != [key] or key not in described:
        raise _Refused("a storage stream that holds other than one storage")
    kind, numel = described[key]
    count = int.from_bytes(payload[pos:pos + 8], "little", signed=True)
    body = payload[pos + 8:]
    if count != numel or len(body) != numel * kind.dtype.itemsize:
        raise _Refused(f"a storage of {numel} values with {len(body)} bytes")
    return np.frombuffer(body, dtype=kind.dtype).astype(kind.dtype.newbyteorder("="))


# --------------------------------------------------------------------------------------
# The policy.
@dataclass(frozen=True)
class ExpertPolicy:
    """A DAPG policy's mean action as numpy: tanh MLP with input/output transformations.

    Shapes: Do observation dim, Da action dim; ``weights[i]`` (out, in), ``biases[i]`` (out,).
    """

    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]
    in_shift: np.ndarray
    in_scale: np.ndarray
    out_shift: np.ndarray
    out_scale: np.ndarray
    path: str = ""
    sha256: str = ""

    @property
    def obs_dim(self) -> int:
        return int(self.weights[0].shape[1])

    @property
    def action_dim(self) -> int:
        return int(self.weights[-1].shape[0])

    def act(self, obs: np.ndarray) -> np.ndarray:
        """(Do,) or (B, Do) float -> (Da,) or (B, Da) float32 in [-1, 1]: the mean action."""
        x = (np.asarray(obs, dtype=np.float64) - self.in_shift) / (self.in_scale + 1e-8)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = x @ w.T + b
            if i < len(self.weights) - 1:
                x = np.tanh(x)
        return np.clip(x * self.out_scale + self.out_shift, -1.0, 1.0).astype(np.float32)


def _as_array(value: Any, what: str) -> np.ndarray:
    if isinstance(value, _PendingTensor):
        value = value.resolve()
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "fi":
        raise _Refused(f"{what} that is not a numeric array")
    return value.astype(np.float64)


def _policy_from(obj: Any, path: str, sha: str) -> ExpertPolicy:
    """The loaded holders as an ``ExpertPolicy``; ``_Refused`` naming what is missing."""
    if not isinstance(obj, _MLPHolder):
        raise _Refused(f"a {type(obj).__name__} at the top instead of mjrl's MLP policy")
    model = vars(obj).get("model")
    if not isinstance(model, _FCNetworkHolder):
        raise _Refused("an MLP policy without its FCNetwork model")
    m = vars(model)
    layers = m.get("fc_layers")
    if layers is None:
        layers = m.get("_modules", {}).get("fc_layers")
    modules = list(vars(layers).get("_modules", {}).values()) if isinstance(layers, _ModuleListHolder) else None
    if not modules or not all(isinstance(layer, _LinearHolder) for layer in modules):
        raise _Refused("a model without fc_layers of Linear layers")
    nonlinearity = m.get("nonlinearity", _Function("tanh"))
    if nonlinearity != "tanh":
        raise _Refused(f"a nonlinearity {nonlinearity!r} (DAPG's policies use tanh)")
    weights, biases = [], []
    for i, layer in enumerate(modules):
        params = vars(layer).get("_parameters", {})
        w = _as_array(params.get("weight"), f"layer {i}'s weight")
        b = _as_array(params.get("bias"), f"layer {i}'s bias")
        if w.ndim != 2 or b.shape != (w.shape[0],) or (weights and weights[-1].shape[0] != w.shape[1]):
            raise _Refused(f"layer {i} of shape {w.shape} / {b.shape} that does not chain")
        weights.append(w)
        biases.append(b)
    n_in, n_out = weights[0].shape[1], weights[-1].shape[0]
    t = m.get("transformations")
    if t is None:
        t = {}
    if not isinstance(t, dict):
        raise _Refused("transformations that are not a dict")
    defaults = {"in_shift": np.zeros(n_in), "in_scale": np.ones(n_in), "out_shift": np.zeros(n_out), "out_scale": np.ones(n_out)}
    tf = {}
    for k, default in defaults.items():
        v = t.get(k)
        if v is None:
            v = m.get(k)  # the tensors mjrl's forward reads (zeros / ones where none were set)
        tf[k] = default if v is None else _as_array(v, f"the transformation {k}")
        if tf[k].shape != default.shape:
            raise _Refused(f"the transformation {k} of shape {tf[k].shape} for a layer of {default.shape[0]}")
    return ExpertPolicy(tuple(weights), tuple(biases), path=path, sha256=sha, **tf)


def load_expert(path: str | Path) -> ExpertPolicy:
    """Read a DAPG policy pickle safely; one-line ``UserError`` for anything else."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"expert policy {p} does not exist; {WHERE_TO_GET}")
    if not p.is_file():
        raise UserError(f"expert policy {p} is not a file")
    data = p.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    try:
        obj = _restricted_load(data, _POLICY_GLOBALS)
        storages = _storages_in(obj)
        for storage in storages:  # every storage's globals are checked before any is decoded
            pos = 0
            for _ in range(5):
                names, pos = scan_globals(storage.payload, pos)
                _check_globals(names, _STORAGE_GLOBALS)
        for storage in storages:
            storage.array = _decode_storage(storage.payload)
        return _policy_from(obj, str(p), sha)
    except _NotAPickle as e:
        raise UserError(f"expert policy {p} is not a pickle ({e}); {WHERE_TO_GET}") from None
    except _Forbidden as e:
        raise UserError(f"refusing expert policy {p}: it names the global '{e.module}.{e.name}', which no DAPG "
                        "policy file uses; nothing in it was run") from None
    except _Refused as e:
        raise UserError(f"expert policy {p} is not a DAPG (mjrl MLP) policy: it holds {e}") from None
    except Exception as e:  # holders with unexpected contents (attributes of the wrong kind, ...)
        raise UserError(f"expert policy {p} is not a DAPG (mjrl MLP) policy ({type(e).__name__}: {e})") from None


def _storages_in(obj: Any) -> list[_PendingStorage]:
    """Every storage reachable from the loaded holders (containers and attribute bags only)."""
    found: dict[int, _PendingStorage] = {}
    seen: set[int] = set()
    stack = [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, _PendingStorage):
            found[id(o)] = o
        elif isinstance(o, _PendingTensor):
            stack.append(o.storage)
        elif isinstance(o, _Holder):
            stack.extend(vars(o).values())
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
    return list(found.values())


# --------------------------------------------------------------------------------------
# Which file serves which task, and whether it fits.
def dims_fit(obs_dim: int, action_dim: int) -> str | None:
    """The Adroit task whose dims these are, or None."""
    return next((t for t, d in POLICY_DIMS.items() if d == (obs_dim, action_dim)), None)


def check_dims(policy: ExpertPolicy, task: str) -> None:
    want = POLICY_DIMS[task]
    have = (policy.obs_dim, policy.action_dim)
    if have != want:
        fits = dims_fit(*have)
        raise UserError(f"expert policy {policy.path} takes {have[0]} observations and gives {have[1]} actions; "
                        f"{task} has {want[0]} and {want[1]}"
                        + (f"; the file's dims fit {fits}" if fits else "; they fit no Adroit task"))


def policy_path(spec: Any, task: str, n_tasks: int) -> Path:
    """The policy file of ``task``: ``spec`` itself, or ``<spec>/<door|hammer|pen>-v0.pickle``
    when it is a directory."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        raise UserError(f"source=expert needs expert.path=<policy.pickle> (or a directory of {', '.join(POLICY_FILES.values())}); "
                        f"{WHERE_TO_GET}")
    p = Path(str(spec)).expanduser()
    if p.is_dir():
        return p / POLICY_FILES[task]
    if n_tasks > 1:
        raise UserError(f"expert.path={spec} is one file but {n_tasks} tasks are asked for; pass a directory holding "
                        f"{', '.join(POLICY_FILES.values())}")
    return p


_CACHE: dict[tuple[str, int, int], ExpertPolicy] = {}


def expert_for(path: Path) -> ExpertPolicy:
    """``load_expert``, cached per process by (path, size, mtime)."""
    st = path.stat() if path.exists() else None
    key = (str(path), st.st_size if st else -1, st.st_mtime_ns if st else -1)
    if key not in _CACHE:
        _CACHE[key] = load_expert(path)
    return _CACHE[key]


def expert_config(cfg: DictConfig) -> ScriptedConfig:
    """The noise knobs of the ``expert:`` section (the scripted source's, same meaning)."""
    return ScriptedConfig.from_cfg(cfg.get("expert"), section="expert")


def check_expert(tasks: list[str], cfg: DictConfig) -> None:
    """Refuse what this source cannot do, before anything is written: tasks without a
    policy, a missing or unsafe file, a policy whose dims do not fit its task."""
    others = [t for t in tasks if suite_of(t) != "adroit"]
    if others:
        raise UserError(f"source=expert has DAPG's Adroit policies only ({', '.join(POLICY_DIMS)}); "
                        f"use source=scripted or source=sac for {', '.join(others)}")
    section = cfg.get("expert") or {}
    expert_config(cfg)
    for task in tasks:
        check_dims(expert_for(policy_path(section.get("path"), task, len(tasks))), task)


def expert_provenance(task: str, cfg: DictConfig, n_tasks: int) -> dict[str, Any]:
    """What a dataset records of the policy behind ``task``'s episodes: its file's name and
    sha256 (a path differs between machines; the bytes do not)."""
    policy = expert_for(policy_path((cfg.get("expert") or {}).get("path"), task, n_tasks))
    return {"expert_policy": {"file": Path(policy.path).name, "sha256": policy.sha256}}


# --------------------------------------------------------------------------------------
# Episodes.
def run_expert_episode(settings: ObsSettings, cfg: ScriptedConfig, path: str, seed: int, index: int) -> dict[str, Any]:
    """One episode of a degraded expert; arrays with a leading time axis."""
    policy = expert_for(Path(path))
    base = env_for(settings).unwrapped
    if base.action_space.shape[0] != policy.action_dim or base.observation_space["state"].shape[0] != policy.obs_dim:
        raise UserError(f"expert policy {path} ({policy.obs_dim} obs / {policy.action_dim} actions) does not fit "
                        f"{settings.task}'s env ({base.observation_space['state'].shape[0]} / {base.action_space.shape[0]})")
    return run_degraded_episode(settings, cfg, policy.act, policy.action_dim, "expert", seed, index)


def _expert_job(args: tuple) -> dict[str, Any]:
    return run_expert_episode(*args)


def run_expert_jobs(
    todo: list[tuple[str, int]], settings: dict[str, ObsSettings], cfg: DictConfig, seed: int, workers: int
) -> Iterator[dict[str, Any]]:
    """Yield one episode per (task, episode index) in ``todo``, in that order."""
    knobs = expert_config(cfg)
    spec = (cfg.get("expert") or {}).get("path")
    tasks = list(dict.fromkeys(t for t, _ in todo)) or list(settings)
    paths = {t: str(policy_path(spec, t, len(settings))) for t in tasks}
    jobs = [(settings[t], knobs, paths[t], seed, i) for t, i in todo]
    yield from run_in_order(_expert_job, jobs, workers)
