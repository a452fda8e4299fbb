"""Tests of the ``expert`` data source (envs/expert_source.py): DAPG's Adroit policies.

The tests write their own tiny policy pickles, shaped like DAPG's files (mjrl's class
names, torch ``Linear`` layers whose tensors are pickled as torch pickles them, numpy
transformations), so they need neither mjrl nor the real files:

  * a collected episode's actions are the tiny policy's mean actions, clipped;
  * a missing transformation means none (identity), as mjrl's forward computes it;
  * a pickle naming any other global is refused in one line without running it, and
    nothing is written; wrong dims, a missing file, a non-pickle and a pickle that is no
    policy are one line each, before anything is written;
  * the noise knobs are the scripted source's, and a resumed collection equals an
    uninterrupted one;
  * with the real files beside the checkout (``../shared/adroit-experts``), DAPG's door
    policy opens the door in our env wrapper.
"""

from __future__ import annotations

import copyreg
import os
import pickle
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from store_kit import assert_one_line_error, assert_same, snapshot

os.environ.setdefault("MUJOCO_GL", "egl")

from sodp3d.cli import main  # noqa: E402
from sodp3d.data.store import EpisodeDataset  # noqa: E402
from sodp3d.envs.expert_source import POLICY_DIMS, load_expert, scan_globals  # noqa: E402
from sodp3d.errors import UserError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXPERTS = REPO.parent / "shared" / "adroit-experts"  # CI puts shared/ beside its clone
FAST = ["workers=1", "env.adroit.resolution=[32,32]", "env.adroit.num_points=64", "episode_length=6"]
NOISELESS = ["expert.noise_std=[0,0]", "expert.random_share=0", "expert.perturb_share=0"]


pytestmark = pytest.mark.usefixtures("close_cached_envs")


# --------------------------------------------------------------------------------------
# Tiny policies, pickled the way DAPG's files are.
@pytest.fixture
def mjrl_names(monkeypatch):
    """Holder classes importable under mjrl's module names while the test pickles them."""
    classes = {}
    for module, name in (("mjrl.policies.gaussian_mlp", "MLP"), ("mjrl.utils.fc_network", "FCNetwork")):
        cls = type(name, (), {"__module__": module})
        for parent in ("mjrl", "mjrl.policies", "mjrl.utils"):
            monkeypatch.setitem(sys.modules, parent, sys.modules.get(parent) or types.ModuleType(parent))
        mod = types.ModuleType(module)
        setattr(mod, name, cls)
        monkeypatch.setitem(sys.modules, module, mod)
        classes[name] = cls
    return classes


def _module_state(**fields) -> dict:
    return {"training": False, "_parameters": OrderedDict(), "_buffers": OrderedDict(), "_modules": OrderedDict(), **fields}


def _reduce_linear(layer: torch.nn.Linear):
    params = OrderedDict(weight=layer.weight, bias=layer.bias)
    return copyreg.__newobj__, (torch.nn.Linear,), _module_state(
        _parameters=params, in_features=layer.in_features, out_features=layer.out_features)


def _reduce_module_list(layers: torch.nn.ModuleList):
    return copyreg.__newobj__, (torch.nn.ModuleList,), _module_state(
        _modules=OrderedDict((str(i), m) for i, m in enumerate(layers)))


def write_policy(path: Path, classes: dict, sizes: list[int], transformations: dict | None, seed: int = 0,
                 extra: dict | None = None) -> dict:
    """A tiny mjrl-like MLP policy pickle (tanh between the layers); returns its numbers."""
    gen = torch.Generator().manual_seed(seed)
    layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen))
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen))
    model = classes["FCNetwork"]()
    model.__dict__.update(_module_state(_modules=OrderedDict(fc_layers=layers)))
    model.obs_dim, model.act_dim = sizes[0], sizes[-1]
    model.transformations = transformations
    policy = classes["MLP"]()
    policy.__dict__.update({"n": sizes[0], "m": sizes[-1], "model": model, "log_std": torch.nn.Parameter(torch.zeros(sizes[-1]))})
    policy.__dict__.update(extra or {})
    with open(path, "wb") as f:
        pickler = pickle.Pickler(f, protocol=4)
        pickler.dispatch_table = {**copyreg.dispatch_table, torch.nn.Linear: _reduce_linear,
                                  torch.nn.ModuleList: _reduce_module_list}
        pickler.dump(policy)
    return {"weights": [layer.weight.detach().double().numpy() for layer in layers],
            "biases": [layer.bias.detach().double().numpy() for layer in layers], "t": transformations or {}}


def mean_action(numbers: dict, obs: np.ndarray) -> np.ndarray:
    """What DAPG's MLP computes (the test's own numpy), clipped to [-1, 1]."""
    t = numbers["t"]
    x = (obs - t.get("in_shift", 0.0)) / (t.get("in_scale", 1.0) + 1e-8)
    for i, (w, b) in enumerate(zip(numbers["weights"], numbers["biases"])):
        x = x @ w.T + b
        if i < len(numbers["weights"]) - 1:
            x = np.tanh(x)
    return np.clip(x * t.get("out_scale", 1.0) + t.get("out_shift", 0.0), -1, 1)


def door_transformations(seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    obs, act = POLICY_DIMS["adroit-door"]
    return {"in_shift": rng.normal(0, 0.3, obs), "in_scale": rng.uniform(0.2, 1.0, obs),
            "out_shift": rng.normal(0, 0.2, act), "out_scale": rng.uniform(0.2, 2.0, act)}


def collect_cli(capsys, out, *args) -> tuple[int, str, str]:
    rc = main(["collect", "source=expert", f"out={out}", *args])
    o, e = capsys.readouterr()
    return rc, o, e


# --------------------------------------------------------------------------------------
def test_collected_actions_are_the_policys_mean_actions(tmp_path, capsys, mjrl_names):
    obs, act = POLICY_DIMS["adroit-door"]
    numbers = write_policy(tmp_path / "door.pickle", mjrl_names, [obs, 8, 8, act], door_transformations())
    out = tmp_path / "d.zarr"
    rc, o, e = collect_cli(capsys, out, "task=adroit-door", f"expert.path={tmp_path / 'door.pickle'}", "episodes=1",
                           *FAST, *NOISELESS)
    assert rc == 0, e
    data = EpisodeDataset(out)
    assert data.n_episodes == 1 and data.episode_tasks == ["adroit-door"]
    actions, states = data.get("action"), data.get("state")
    assert actions.shape == (6, act) and states.shape == (6, obs)
    assert data.get("point_cloud").shape == (6, 64, 3)
    expected = mean_action(numbers, states.astype(np.float64))
    np.testing.assert_allclose(actions, expected, atol=1e-4)  # the store keeps the float32 state
    assert (np.abs(actions) == 1).any() and (np.abs(actions) < 1).any()  # some were clipped, some not
    assert data.episode_info("source").tolist() == ["expert"]
    assert data.episode_info("kind").tolist() == ["noisy"] and data.episode_info("noise_std").tolist() == [0.0]
    assert data.episode_info("return")[0] == pytest.approx(float(data.get("reward").sum()), rel=1e-5)


def test_a_policy_without_transformations_acts_on_the_raw_observation(tmp_path, mjrl_names):
    """DAPG's pen policy has transformations None: mjrl then shifts by 0 and scales by 1."""
    numbers = write_policy(tmp_path / "pen.pickle", mjrl_names, [45, 6, 24], None)
    policy = load_expert(tmp_path / "pen.pickle")
    assert (policy.obs_dim, policy.action_dim) == (45, 24)
    x = np.random.default_rng(0).normal(0, 1, (5, 45))
    np.testing.assert_allclose(policy.act(x), mean_action(numbers, x), atol=1e-5)


def test_a_pickle_that_names_another_global_is_refused_without_running(tmp_path, capsys, mjrl_names):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('ran')",)

    path = tmp_path / "evil.pickle"
    write_policy(path, mjrl_names, [39, 4, 28], door_transformations(), extra={"hook": Payload()})
    assert ("builtins", "exec") in scan_globals(path.read_bytes())[0]
    out = tmp_path / "evil.zarr"
    rc, o, e = collect_cli(capsys, out, "task=adroit-door", f"expert.path={path}", "episodes=1", *FAST)
    msg = assert_one_line_error(rc, o, e)
    assert "builtins.exec" in msg and str(path) in msg
    assert not marker.exists()
    assert not out.exists()


def test_wrong_dims_are_one_line_naming_them(tmp_path, capsys, mjrl_names):
    path = tmp_path / "p.pickle"
    write_policy(path, mjrl_names, [45, 4, 24], None)
    out = tmp_path / "w.zarr"
    rc, o, e = collect_cli(capsys, out, "task=adroit-door", f"expert.path={path}", "episodes=1", *FAST)
    msg = assert_one_line_error(rc, o, e)
    for part in (str(path), "45", "24", "adroit-door", "39", "28", "fit adroit-pen"):
        assert part in msg, (part, msg)
    assert not out.exists()


@pytest.mark.parametrize("case", ["missing", "not-a-pickle", "not-a-policy", "no-path", "metaworld", "one-file-two-tasks"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case):
    path = tmp_path / "x.pickle"
    args = ["task=adroit-door", f"expert.path={path}"]
    if case == "not-a-pickle":
        path.write_text("# not a pickle\n")
    elif case == "not-a-policy":
        path.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}, protocol=3))
    elif case == "no-path":
        args = ["task=adroit-door"]
    elif case == "metaworld":
        args = ["task=reach-v3", f"expert.path={tmp_path}"]
    elif case == "one-file-two-tasks":
        path.write_bytes(b"")
        args = ["task=[adroit-door,adroit-pen]", f"expert.path={path}"]
    out = tmp_path / "bad.zarr"
    rc, o, e = collect_cli(capsys, out, *args, "episodes=1", *FAST)
    msg = assert_one_line_error(rc, o, e)
    expected = {"missing": "does not exist", "not-a-pickle": "is not a pickle", "not-a-policy": "not a DAPG",
                "no-path": "expert.path=", "metaworld": "reach-v3", "one-file-two-tasks": "directory"}[case]
    assert expected in msg, msg
    assert not out.exists()


def test_noise_knobs_and_resumption(tmp_path, capsys, mjrl_names):
    """Episodes draw their kind and noise from expert.* like the scripted source, and a
    collection extended by one episode equals one collected in one go."""
    obs, act = POLICY_DIMS["adroit-door"]
    (tmp_path / "experts").mkdir()
    write_policy(tmp_path / "experts" / "door-v0.pickle", mjrl_names, [obs, 4, act], door_transformations())
    common = ["task=adroit-door", f"expert.path={tmp_path / 'experts'}", "expert.noise_std=[0.2,0.4]",
              "expert.perturb_share=0.5", "expert.random_share=0.2", *FAST]
    whole, part = tmp_path / "whole.zarr", tmp_path / "part.zarr"
    assert collect_cli(capsys, whole, *common, "episodes=3")[0] == 0
    assert collect_cli(capsys, part, *common, "episodes=2")[0] == 0
    assert collect_cli(capsys, part, *common, "episodes=3")[0] == 0
    assert_same(snapshot(whole), snapshot(part))
    data = EpisodeDataset(whole)
    noise = data.episode_info("noise_std")
    assert ((0.2 <= noise) & (noise <= 0.4)).all()
    assert set(data.episode_info("kind").tolist()) <= {"noisy", "perturbed", "random"}
    rc, o, e = collect_cli(capsys, tmp_path / "n.zarr", *common, "expert.noise_std=[1,0]", "episodes=1")
    assert "expert.noise_std" in assert_one_line_error(rc, o, e)


def test_the_dataset_records_the_policy_file_and_refuses_another_one_to_extend_it(tmp_path, capsys, mjrl_names):
    """The store names the policy file and its sha256 per task; extending the dataset with
    other bytes at the same path is one line, and the episodes already there stay."""
    import hashlib

    import zarr

    obs, act = POLICY_DIMS["adroit-door"]
    (tmp_path / "experts").mkdir()
    policy = tmp_path / "experts" / "door-v0.pickle"
    write_policy(policy, mjrl_names, [obs, 4, act], door_transformations(1))
    common = ["task=adroit-door", f"expert.path={tmp_path / 'experts'}", *FAST]
    out = tmp_path / "d.zarr"
    assert collect_cli(capsys, out, *common, "episodes=1")[0] == 0
    recorded = dict(zarr.open_group(str(out), mode="r").attrs)["tasks"]["adroit-door"]["expert_policy"]
    assert recorded == {"file": "door-v0.pickle", "sha256": hashlib.sha256(policy.read_bytes()).hexdigest()}
    write_policy(policy, mjrl_names, [obs, 4, act], door_transformations(2))  # other weights, same name
    rc, o, e = collect_cli(capsys, out, *common, "episodes=2")
    assert "expert_policy" in assert_one_line_error(rc, o, e)
    assert EpisodeDataset(out).n_episodes == 1


def test_the_task_dims_are_the_envs():
    from sodp3d.envs.suites import make_suite_env

    for task, (obs, act) in POLICY_DIMS.items():
        env = make_suite_env(task)
        try:
            assert (env.observation_space["state"].shape[0], env.action_space.shape[0]) == (obs, act)
        finally:
            env.close()


def test_dapgs_door_policy_opens_the_door():
    """DAPG's own file, read safely, acting through our env wrapper (state only)."""
    path = EXPERTS / "door-v0.pickle"
    if not path.exists():
        pytest.skip(f"DAPG's policies are not beside this checkout ({EXPERTS})")
    from sodp3d.envs.suites import make_suite_env

    policy = load_expert(path)
    env = make_suite_env("adroit-door", 120)
    try:
        env.reset(seed=0)
        success = False
        for _ in range(120):
            _, _, terminated, truncated, info = env.step(policy.act(env._last_state))
            success |= info["success"]
            if terminated or truncated:
                break
    finally:
        env.close()
    assert success


def test_only_what_dapgs_files_name_is_allowed():
    """Every global in the real files is on the list, and the list holds nothing else."""
    from sodp3d.envs.expert_source import _POLICY_GLOBALS

    if not EXPERTS.exists():
        pytest.skip(f"DAPG's policies are not beside this checkout ({EXPERTS})")
    named = set()
    for task in POLICY_DIMS:
        named |= set(scan_globals((EXPERTS / f"{task.removeprefix('adroit-')}-v0.pickle").read_bytes())[0])
    numpy2 = {(m.replace("numpy.core", "numpy._core"), n) for m, n in named if m.startswith("numpy.core")}
    assert named <= set(_POLICY_GLOBALS) and set(_POLICY_GLOBALS) <= named | numpy2
    with pytest.raises(UserError):
        load_expert(EXPERTS / "LICENSE")
