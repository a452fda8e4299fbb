"""`image` observations (env.<suite>.image = rgb | rgbd) and encoder=image end to end.

The image the policy sees must be the camera's view of the state its point cloud shows:
every cloud point near the hand, projected with the camera's intrinsics and extrinsics,
lands on a pixel whose depth channel holds that point's depth (so a flipped image, or
one of another state, fails). Then: the cloud is unchanged by recording images, the
wrappers stack them, collect stores them (uint8, chunked, compressed, settings recorded),
pre-training reads them, and missing images are one line that says how to record them.

Shapes: H x W images (48 x 48, or 84 x 84 for the geometry), To observed steps, N points.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from env_kit import closing
from sodp3d.envs import make_env
from sodp3d.envs.camera import DEPTH_STEP_M
from sodp3d.envs.wrappers import PointCloudObservation, find_wrapper

from sodp3d.cli import main
from sodp3d.data.store import EpisodeDataset
from store_kit import assert_one_line_error

SMALL = ["env.metaworld.resolution=[48,48]", "env.metaworld.num_points=64"]
TINY = ["policy=tiny", "batch_size=4", "device=cpu", "wandb.mode=disabled", "optim.warmup_steps=1", "log_every=1",
        "steps=2"]


def env_cfg(**metaworld):
    from omegaconf import OmegaConf
    from sodp3d.envs.settings import default_env_config

    cfg = default_env_config()
    return OmegaConf.merge(cfg, {"metaworld": metaworld})


def one_line_error(capsys, rc, command):
    return assert_one_line_error(rc, *capsys.readouterr(), command)


# ---------------------------------------------------------------------------- geometry


def depth_mismatch(cam, data, points, image) -> np.ndarray:
    """Per point: |depth channel at the point's pixel - the point's depth|, in metres."""
    uvz = cam.project(data, points[:, :3])
    u, v = np.rint(uvz[:, 0]).astype(int), np.rint(uvz[:, 1]).astype(int)
    assert ((u >= 0) & (u < cam.width) & (v >= 0) & (v < cam.height)).all()
    return np.abs(image[v, u, 3] * DEPTH_STEP_M - uvz[:, 2])


def test_image_is_the_cameras_view_of_the_clouds_state():
    cfg = env_cfg(image="rgbd", resolution=[84, 84], num_points=2048)
    with closing(make_env("pick-place-v3", cfg)) as env:
        pc = find_wrapper(env, PointCloudObservation)
        cam, data = pc.cameras[0], env.unwrapped.data
        obs, _ = env.reset(seed=0)
        before = obs
        action = np.array([0.6, -0.4, -0.6, -1.0], np.float32)
        with pc.rendering_suppressed():  # the hand moves down and sideways, well away from where it started
            for _ in range(24):
                env.step(action)
        obs, *_ = env.step(action)
        image, cloud, hand = obs["image"], obs["point_cloud"], obs["agent_pos"][:3]
        assert image.shape == (84, 84, 4) and image.dtype == np.uint8
        near_hand = cloud[np.linalg.norm(cloud[:, :3] - hand, axis=1) < 0.08]
        assert len(near_hand) >= 5, "the cloud should show the hand"
        # Each point near the hand is back-projected from a pixel: that pixel's depth is its depth (1 cm steps).
        assert depth_mismatch(cam, data, near_hand, image).max() <= 0.6 * DEPTH_STEP_M + 1e-6
        # ... and at the hand the image differs from the same pixels of the first frame
        assert depth_mismatch(cam, data, near_hand, before["image"]).max() > 0.03  # another state fails
        assert depth_mismatch(cam, data, near_hand, image[::-1]).max() > 0.03  # a flipped image fails
        assert depth_mismatch(cam, data, near_hand, image[:, ::-1]).max() > 0.03
        # The colour at the hand is not the background's (black: no skybox is drawn)
        uv = np.rint(cam.project(data, near_hand[:, :3])[:, :2]).astype(int)
        assert (image[uv[:, 1], uv[:, 0], :3].astype(int).sum(axis=1) > 30).all()


def test_recording_images_leaves_the_cloud_unchanged():
    """Colour and depth come from one render, whose depth equals the depth-only render's."""
    clouds = {}
    for mode in (None, "rgb"):
        with closing(make_env("reach-v3", env_cfg(image=mode, resolution=[48, 48], num_points=64))) as env:
            obs, _ = env.reset(seed=3)
            seen = [obs["point_cloud"]]
            for _ in range(3):
                obs, *_ = env.step(np.array([0.5, 0.2, -0.3, 0.0], np.float32))
                seen.append(obs["point_cloud"])
            clouds[mode] = np.stack(seen)
            assert ("image" in obs) == (mode is not None)
    np.testing.assert_array_equal(clouds["rgb"], clouds[None])


def test_chunked_env_stacks_images():
    cfg = env_cfg(image="rgb", resolution=[48, 48], num_points=64)
    with closing(make_env("reach-v3", cfg, n_obs_steps=2, n_action_steps=8)) as env:
        assert env.observation_space["image"].shape == (2, 48, 48, 3)
        assert env.observation_space["image"].dtype == np.uint8
        obs, _ = env.reset(seed=0)
        np.testing.assert_array_equal(obs["image"][0], obs["image"][1])  # the first observation, repeated
        obs, *_ = env.step(np.tile([0.8, 0.0, -0.5, 0.0], (8, 1)).astype(np.float32))
        assert obs["image"].shape == (2, 48, 48, 3) and obs["image"].dtype == np.uint8
        assert not np.array_equal(obs["image"][0], obs["image"][1])  # two rendered steps, the hand moved
        assert env.observation_space.contains(obs)


@pytest.mark.parametrize("override, pattern", [
    ("env.metaworld.image=rgba", r"env\.metaworld\.image must be rgb \| rgbd \| null, got 'rgba'"),
    ("env.metaworld.cameras=[corner4,corner]", r"records one camera's image.*names 2 \(corner4, corner\)"),
])
def test_bad_image_settings_are_one_line(tmp_path, capsys, override, pattern):
    import re

    out = tmp_path / "bad.zarr"
    rc = main(["collect", "task=reach-v3", "episodes=1", f"out={out}", "env.metaworld.image=rgb", override])
    assert re.search(pattern, one_line_error(capsys, rc, "collect"))
    assert not out.exists()


# ---------------------------------------------------------------------------- collect, pretrain, act


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("image-data")
    out = {"rgb": root / "rgb.zarr", "none": root / "none.zarr"}
    assert main(["collect", "task=reach-v3", "episodes=2", "episode_length=12", f"out={out['rgb']}", "workers=1",
                 "env.metaworld.image=rgb", *SMALL]) == 0
    assert main(["collect", "task=reach-v3", "episodes=1", "episode_length=12", f"out={out['none']}", "workers=1",
                 *SMALL]) == 0
    return out


def test_collect_records_images_beside_clouds(stores):
    data = EpisodeDataset(stores["rgb"])
    assert {"image", "point_cloud"} <= set(data.keys)
    images = data.array("image")
    assert images.dtype == np.uint8 and images.shape == (24, 48, 48, 3)
    assert images.chunks == (100, 48, 48, 3)
    assert images.nbytes_stored() < images.nbytes  # compressed
    assert data.attrs["tasks"]["reach-v3"]["image"] == "rgb" and data.attrs["image"] == [48, 48, 3]
    ep = data.episode(0, ["image"])["image"]
    assert ep.std() > 10 and not np.array_equal(ep[0], ep[-1])  # a scene, and it changes over the episode
    assert "image" not in EpisodeDataset(stores["none"]).keys


def test_extending_a_store_without_images_with_images_is_refused(stores, capsys):
    rc = main(["collect", "task=reach-v3", "episodes=2", "episode_length=12", f"out={stores['none']}", "workers=1",
               "env.metaworld.image=rgb", *SMALL])
    assert "holds no images; this run asks for [48, 48, 3]" in one_line_error(capsys, rc, "collect")
    assert EpisodeDataset(stores["none"]).n_episodes == 1


def test_pretrain_image_encoder_on_a_store_without_images_is_one_line(stores, tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["pretrain", f"data={stores['none']}", f"out={run}", "encoder=image", *TINY])
    line = one_line_error(capsys, rc, "pretrain")
    assert f"{stores['none']} has no 'image' observations; record them with `sodp3d collect ... " \
           "env.metaworld.image=rgb` (or rgbd)" in line
    assert not run.exists()


@pytest.fixture(scope="module")
def image_run(stores, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("image-run") / "pre"
    assert main(["pretrain", f"data={stores['rgb']}", f"out={run}", "encoder=image", *TINY]) == 0
    return run


def test_pretrained_image_policy_acts_on_image_observations(image_run, tmp_path, capsys):
    from sodp3d.checkpoint import load_checkpoint

    payload = load_checkpoint(image_run / "checkpoints" / "latest.ckpt")
    assert payload["policy_config"]["encoder"] == "image"
    assert payload["policy_config"]["shape_meta"]["image"] == [48, 48, 3]
    assert not any(k.startswith("normalizer.image") for k in payload["policy"])  # scaled in the encoder
    assert payload["train_config"]["env"]["metaworld"]["tasks"]["reach-v3"]["image"] == "rgb"
    out = tmp_path / "eval"
    assert main(["eval", f"ckpt={image_run}", "task=reach-v3", "episodes=1", "num_envs=1", "seeds=[0]",
                 "env.metaworld.episode_length=16", f"out={out}"]) == 0
    assert (out / "results.json").exists()


@pytest.mark.parametrize("command", ["eval", "finetune"])
def test_acting_without_images_is_one_line(image_run, tmp_path, capsys, command):
    """push-v3 was not recorded, so its settings are the defaults: image null."""
    out = tmp_path / command
    rc = main([command, f"ckpt={image_run}", "task=[reach-v3,push-v3]", f"out={out}", "num_envs=1"])
    line = one_line_error(capsys, rc, command)
    assert "reads 'image' observations, which the env settings of push-v3 do not give" in line
    assert "env.metaworld.image=rgb" in line and "sodp3d collect task=push-v3 env.metaworld.image=rgb" in line
    assert not out.exists()


# ---------------------------------------------------------------------------- the policy's crops


def test_pretraining_loss_draws_the_crops_first_from_its_generator():
    """In training mode the loss crops each observed image at random, drawing the corners
    from the loss's generator before the noise; acting reads the centre crop."""
    import torch
    from policy_kit import make_config, random_obs

    torch.manual_seed(0)
    from sodp3d.policy import DiffusionPolicy

    policy = DiffusionPolicy(make_config(encoder="image"))
    assert "image" not in policy.normalizer.dims  # the encoder scales images
    obs = random_obs(3, torch.Generator().manual_seed(1))
    batch = {"obs": obs, "action": torch.zeros(3, 12, 4)}
    loss = policy.compute_loss(batch, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(policy.compute_loss(batch, generator=torch.Generator().manual_seed(5)), loss)
    # by hand: corners for the 3 x 2 images, then the noise and steps, from one generator
    gen = torch.Generator().manual_seed(5)
    corners = policy.encoder.draw_augmentation(6, gen)
    cond = policy.condition(obs, corners)
    x0, noise, k = policy._noised(batch["action"], gen)
    expected = policy.schedule.loss(policy.model(policy.schedule.add_noise(x0, noise, k), k, cond), x0, noise)
    torch.testing.assert_close(loss, expected)
    assert not torch.equal(cond, policy.condition(obs))  # random crops are not the centre one
    policy.eval()  # acting and evaluation: the centre crop, nothing drawn
    gen = torch.Generator().manual_seed(5)
    x0, noise, k = policy._noised(batch["action"], gen)
    centre = policy.schedule.loss(policy.model(policy.schedule.add_noise(x0, noise, k), k, policy.condition(obs)), x0, noise)
    torch.testing.assert_close(policy.compute_loss(batch, generator=torch.Generator().manual_seed(5)), centre)


# ---------------------------------------------------------------------------- the comparison's grid


def test_a_sweep_variant_pre_trains_with_its_own_encoder():
    from sodp3d.config import compose
    from sodp3d.sweep import plan

    runs = {r.id: r for r in plan(compose("sweep", ["experiment=image-vs-dp3-cpu", "root=/nonexistent"]))}
    pre = {k: r for k, r in runs.items() if r.command == "pretrain"}
    assert sorted(pre) == ["pretrain/all-image-s0", "pretrain/all-s0"]
    assert pre["pretrain/all-s0"].cfg["encoder"]["name"] == "dp3"
    assert pre["pretrain/all-image-s0"].cfg["encoder"] == {"name": "image", "crop_ratio": 0.9, "keypoints": 32,
                                                            "out_channels": 64, "use_depth": False}
    for a, b in [("pretrain/all-s0", "pretrain/all-image-s0")]:  # equal budgets, same data
        for key in ("steps", "batch_size", "data", "policy", "optim"):
            assert pre[a].cfg[key] == pre[b].cfg[key], key
    for r in runs.values():
        if r.command == "finetune":
            assert r.needs == [f"pretrain/all{'-image' if '/image/' in r.id else ''}-s0"]
        if r.command == "collect":  # one store serves both encoders: clouds and images
            assert r.cfg["env"]["metaworld"]["image"] == "rgb"


def test_a_sweep_variant_with_an_unknown_encoder_is_one_line(tmp_path, capsys):
    rc = main(["sweep", "experiment=smoke", f"root={tmp_path}", "+variants.bc.encoder=resnet"])
    assert "variant 'bc': unknown encoder 'resnet'; valid: dp3, image, pointnet, state" in one_line_error(capsys, rc, "sweep")
    assert not any(tmp_path.iterdir())
