"""Checkpoints: atomic round trips, a loaded policy acts like the original (EMA or not),
and every damaged, foreign or mismatched file is a one-line user error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from policy_kit import fitted_normalizer, make_config, policy_normalizer, random_obs

from sodp3d.checkpoint import load_checkpoint, policy_from_checkpoint, save_checkpoint
from sodp3d.errors import UserError
from sodp3d.policy import DiffusionPolicy


def _leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != name)


def test_checkpoint_round_trip_is_atomic(tmp_path):
    torch.manual_seed(0)
    norm, _, _ = fitted_normalizer()
    policy = DiffusionPolicy(make_config(), policy_normalizer(DiffusionPolicy(make_config()), norm))
    path = tmp_path / "ckpts" / "latest.ckpt"  # the folder is created
    payload = {"policy_config": policy.config.to_dict(), "policy": policy.state_dict(), "step": 7,
               "notes": {"a": [1, 2]}}
    save_checkpoint(path, payload)
    assert path.is_file()
    assert _leftovers(path.parent, path.name) == []
    loaded = load_checkpoint(path)
    assert loaded["format"] == "sodp3d-policy" and loaded["version"] == 1
    assert loaded["step"] == 7 and loaded["notes"] == {"a": [1, 2]}
    assert loaded["policy_config"] == policy.config.to_dict()
    assert set(loaded["policy"]) == set(policy.state_dict())
    for k, v in policy.state_dict().items():
        assert torch.equal(loaded["policy"][k], v), k

    # overwriting replaces the file, again without leftovers
    save_checkpoint(path, {**payload, "step": 8})
    assert load_checkpoint(path)["step"] == 8
    assert _leftovers(path.parent, path.name) == []

    # a save that fails half-way leaves the previous checkpoint and no temporary file
    with pytest.raises(Exception):
        save_checkpoint(path, {**payload, "step": 9, "bad": lambda: None})
    assert load_checkpoint(path)["step"] == 8
    assert _leftovers(path.parent, path.name) == []


@pytest.mark.parametrize("use_ema", [False, True])
def test_policy_from_checkpoint_acts_like_the_original(tmp_path, use_ema):
    torch.manual_seed(0)
    norm, _, _ = fitted_normalizer()
    policy = DiffusionPolicy(make_config(encoder="pointnet"),
                             policy_normalizer(DiffusionPolicy(make_config(encoder="pointnet")), norm)).eval()
    ema = DiffusionPolicy(make_config(encoder="pointnet"),
                          policy_normalizer(DiffusionPolicy(make_config(encoder="pointnet")), norm)).eval()
    path = tmp_path / "p.ckpt"
    save_checkpoint(path, {"policy_config": policy.config.to_dict(), "policy": policy.state_dict(),
                           "ema_policy": ema.state_dict()})
    restored, payload = policy_from_checkpoint(path, use_ema=use_ema)
    assert not restored.training
    assert isinstance(restored, DiffusionPolicy) and restored.config == policy.config
    reference = ema if use_ema else policy
    obs = random_obs(2, torch.Generator().manual_seed(5))
    a = reference.predict_action(obs, generator=torch.Generator().manual_seed(6))
    b = restored.predict_action(obs, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(b["action_pred"], a["action_pred"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(b["action"], a["action"], atol=1e-6, rtol=1e-6)
    other = (policy if use_ema else ema).predict_action(obs, generator=torch.Generator().manual_seed(6))
    assert not torch.allclose(other["action_pred"], a["action_pred"])  # the two weight sets differ
    for k, v in reference.normalizer.state_dict().items():
        assert torch.equal(restored.normalizer.state_dict()[k], v)


def test_policy_from_checkpoint_without_ema_uses_the_policy_weights(tmp_path):
    torch.manual_seed(0)
    policy = DiffusionPolicy(make_config(encoder="state")).eval()
    path = tmp_path / "p.ckpt"
    save_checkpoint(path, {"policy_config": policy.config.to_dict(), "policy": policy.state_dict()})
    restored, _ = policy_from_checkpoint(path)
    for k, v in policy.state_dict().items():
        assert torch.equal(restored.state_dict()[k], v)


def test_policy_from_checkpoint_with_mismatched_weights_is_a_user_error(tmp_path):
    policy = DiffusionPolicy(make_config(encoder="state"))
    config = make_config(encoder="state", unet_kwargs={"down_dims": [16, 32]}).to_dict()
    path = tmp_path / "p.ckpt"
    save_checkpoint(path, {"policy_config": config, "policy": policy.state_dict()})
    with pytest.raises(UserError, match="weights do not fit"):
        policy_from_checkpoint(path)


def _check_readable(msg: str, path: Path) -> None:
    assert str(path) in msg
    assert "\n" not in msg
    assert "Traceback" not in msg and len(msg) < 400


def test_corrupt_checkpoint_is_a_user_error(tmp_path):
    path = tmp_path / "corrupt.ckpt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    _check_readable(str(err.value), path)
    with pytest.raises(UserError):
        policy_from_checkpoint(path)


def test_any_garbage_is_a_one_line_checkpoint_error(tmp_path):
    """Random bytes make torch's unpickler fail in many ways (IndexError, KeyError, ...)."""
    rng = np.random.default_rng(0)
    for i in range(300):
        junk = tmp_path / f"junk{i}.ckpt"
        junk.write_bytes(rng.integers(0, 256, int(rng.integers(1, 512)), dtype=np.uint8).tobytes())
        with pytest.raises(UserError, match=f"junk{i}.ckpt"):
            load_checkpoint(junk)


def test_truncated_and_empty_checkpoints_are_user_errors(tmp_path):
    policy = DiffusionPolicy(make_config(encoder="state"))
    good = tmp_path / "good.ckpt"
    save_checkpoint(good, {"policy_config": policy.config.to_dict(), "policy": policy.state_dict()})
    data = good.read_bytes()
    for name, content in (("half.ckpt", data[: len(data) // 2]), ("empty.ckpt", b"")):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(UserError) as err:
            load_checkpoint(path)
        _check_readable(str(err.value), path)


def test_foreign_torch_file_is_a_user_error(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"a": 1}, path)
    with pytest.raises(UserError, match="not a sodp3d policy checkpoint") as err:
        load_checkpoint(path)
    _check_readable(str(err.value), path)
    torch.save([1, 2, 3], path)
    with pytest.raises(UserError, match="not a sodp3d policy checkpoint"):
        load_checkpoint(path)


def test_other_checkpoint_version_is_a_user_error(tmp_path):
    path = tmp_path / "v2.ckpt"
    save_checkpoint(path, {"policy": {}})
    payload = torch.load(path, weights_only=True)
    payload["version"] = 2
    torch.save(payload, path)
    with pytest.raises(UserError, match="version 2"):
        load_checkpoint(path)


def test_missing_checkpoint_is_a_user_error(tmp_path):
    for path in (tmp_path / "nope.ckpt", tmp_path):  # a missing file, a folder
        with pytest.raises(UserError, match="no checkpoint") as err:
            load_checkpoint(path)
        assert str(path) in str(err.value)
    with pytest.raises(UserError):
        policy_from_checkpoint(tmp_path / "nope.ckpt")


def test_foreign_frame_is_refused_unless_allowed():
    from sodp3d.checkpoint import refuse_foreign_frame

    refuse_foreign_frame({}, False, "old.ckpt")  # checkpoints from before the record: our world frame
    refuse_foreign_frame({"cloud_frame": "world"}, False, "ours.ckpt")
    with pytest.raises(UserError, match="allow_foreign_frame=true") as e:
        refuse_foreign_frame({"cloud_frame": "dp3"}, False, "theirs.ckpt")
    assert "theirs.ckpt" in str(e.value) and "DP3's frame" in str(e.value) and "\n" not in str(e.value)
    refuse_foreign_frame({"cloud_frame": "dp3"}, True, "theirs.ckpt")
