"""Fine-tuning in the planner's noise space (method=noise-sac): the wrapper denoises a noise
exactly as the planner's deterministic sampler does; a noise policy that gives the
planner's own draws evaluates as the planner; SAC learns through the wrapper where the
noise-to-reward map is known; a killed run resumes without repeating env steps; the
checkpoint acts in `sodp3d eval`; bad input is one line and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from sodp3d.checkpoint import load_checkpoint
from sodp3d.cli import main

STATE_ENV = ["env.metaworld.episode_length=24", "env.metaworld.point_cloud=false"]
NS = ["method=noise-sac", "task=reach-v3", "num_envs=2", "eval.episodes=2", "device=cpu", "wandb.mode=disabled",
      "env.metaworld.episode_length=24", "noise_sac.learning_starts=8", "noise_sac.gradient_steps=1",
      "noise_sac.batch_size=16", "noise_sac.net_arch=[32,32]", "noise_sac.checkpoint_every=48"]

pytestmark = pytest.mark.usefixtures("close_cached_envs")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, collect_and_pretrain) -> Path:
    return collect_and_pretrain(tmp_path_factory.mktemp("ns"), "reach-v3", 2, STATE_ENV,
                                ["policy=tiny", "encoder=state", "steps=4", "batch_size=8", "device=cpu",
                                 "wandb.mode=disabled"])


def planner_of(pretrained: Path):
    from sodp3d.checkpoint import policy_from_checkpoint

    return policy_from_checkpoint(pretrained / "checkpoints" / "latest.ckpt")[0]


def test_the_wrapper_denoises_a_noise_as_the_planners_sampler_bit_for_bit(pretrained):
    from sodp3d.envs import make_vector_env
    from sodp3d.finetune.noise_sac import NoiseVecEnv

    planner = planner_of(pretrained)
    vec = make_vector_env("reach-v3", 3, None, mode="sync", autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
                          point_cloud=False, n_obs_steps=2, n_action_steps=8)
    env = NoiseVecEnv(planner, vec, 1.5, seed_base=0, reward_scale=0.25)
    try:
        features = env.reset()
        obs = env._obs
        torch.testing.assert_close(torch.as_tensor(features), planner.condition(obs), rtol=0, atol=0)
        # The planner's own deterministic sampler (eta 0) draws x_S ~ N(0, I) from a generator ...
        own = planner.predict_action(obs, generator=torch.Generator().manual_seed(3), sampler=planner.ddim(0.0))
        # ... the wrapper, given that same noise, executes the same chunk.
        noise = torch.randn((3, planner.config.horizon, planner.action_dim), generator=torch.Generator().manual_seed(3))
        chunk = env.chunks(obs, noise.reshape(3, -1).numpy()).numpy()
        np.testing.assert_array_equal(chunk, own["action"].numpy())
        # Noise aliasing's map, from SAC's observation (the features) alone, is the same map.
        flat = env.chunks_of_features(torch.as_tensor(features), noise.reshape(3, -1))
        np.testing.assert_array_equal(flat.numpy(), chunk.reshape(3, -1))
        assert env.action_space.shape == (planner.config.horizon * planner.action_dim,)
        assert float(env.action_space.high[0]) == 1.5 and env.observation_space.shape == (planner.cond_dim,)
        # A step executes Ta env steps per env and returns the next windows' features.
        out, reward, done, infos = env.step(np.zeros((3, env.action_space.shape[0]), np.float32))
        assert out.shape == (3, planner.cond_dim) and reward.shape == (3,) and not done.any()
        assert [i["executed"] for i in infos] == [8, 8, 8] and env.env_steps == 24
        # SAC sees the chunk's reward scaled; the episode's return is kept unscaled.
        assert np.all(env._ret > 0)
        np.testing.assert_array_equal(reward, (0.25 * env._ret).astype(np.float32))
        # With prior_coef, SAC's reward also gains prior_coef x log N(x_S; 0, I), -|x_S|^2 / 2.
        # (The chunk's reward is read back as a difference of float64 returns: rtol 1e-6 is
        # far above that difference's rounding and far below any slip in the prior term.)
        before, env.prior_coef = env._ret.copy(), 0.5
        A = env.action_space.shape[0]
        out, reward, done, infos = env.step(np.full((3, A), 0.5, np.float32))
        expected = 0.25 * (env._ret - before) - 0.5 * 0.5 * (0.25 * A)
        np.testing.assert_allclose(reward, expected.astype(np.float32), rtol=1e-6)
    finally:
        env.close()


def test_a_noise_policy_of_the_planners_own_draws_evaluates_as_the_planner(pretrained):
    """SteeredPlanner and evaluate_task add nothing: noise drawn as the planner draws it
    gives its evaluation exactly; a zero-mean, exploration-free SAC actor acts as the
    planner from x_S = 0, on the same resets."""
    from sodp3d.evaluate import evaluate_task
    from sodp3d.finetune.steering import SteeredPlanner, actor_noise_fn, make_sac_policy

    planner = planner_of(pretrained)
    Tp, Da = planner.config.horizon, planner.action_dim
    from omegaconf import OmegaConf

    from sodp3d.envs.settings import default_env_config

    env_cfg = OmegaConf.merge(default_env_config(), {"metaworld": {"episode_length": 24, "point_cloud": False}})
    sampler = planner.ddim(0.0)

    def evaluate(policy, gen):
        return evaluate_task(policy, "reach-v3", 4, 0, 2, env_cfg, generator=gen, sampler=sampler)

    base = evaluate(planner, torch.Generator().manual_seed(5))
    draws = torch.Generator().manual_seed(5)
    same = SteeredPlanner(planner, lambda f: torch.randn((f.shape[0], Tp, Da), generator=draws))
    assert evaluate(same, None) == base

    sac = make_sac_policy(planner.cond_dim, Tp, Da, 1.5, [16])
    with torch.no_grad():
        sac.actor.mu.weight.zero_()
        sac.actor.mu.bias.zero_()
    zero = SteeredPlanner(planner, actor_noise_fn(sac.actor, 1.5, Tp, Da))
    from_zero = SteeredPlanner(planner, lambda f: torch.zeros((f.shape[0], Tp, Da)))
    assert evaluate(zero, None) == evaluate(from_zero, None)


class _Line(gym.Env):
    """A test env of a few lines: one step, a constant observation; the reward of the
    executed chunk a is -mean((a - 0.5)^2), so the best noise is known."""

    observation_space = gym.spaces.Dict({"state": gym.spaces.Box(-1, 1, (2, 3), np.float32)})
    action_space = gym.spaces.Box(-1, 1, (2, 1), np.float32)

    def reset(self, *, seed=None, options=None):
        return {"state": np.zeros((2, 3), np.float32)}, {}

    def step(self, a):
        reward = -float(np.mean((np.asarray(a) - 0.5) ** 2))
        return self.reset()[0], reward, True, False, {"executed": 2, "success": reward > -0.01}


class _Identity:
    """A planner whose deterministic map from noise to chunk is the identity (clipped):
    the chunk executes the noise's first Ta rows."""

    obs_keys, cond_dim, action_dim, device, reads_camera = ("state",), 4, 1, torch.device("cpu"), False
    config = type("C", (), {"horizon": 4, "n_obs_steps": 2, "n_action_steps": 2})()

    def ddim(self, eta):
        return None

    def condition(self, obs):
        return torch.ones((len(obs["state"]), 4))

    def predict_action(self, obs, generator=None, sampler=None, x_init=None, cond=None):
        return {"action": x_init[:, :2].clamp(-1, 1)}


@pytest.mark.parametrize("layer_norm", [False, True])
def test_sac_learns_through_the_wrapper_where_the_best_noise_is_known(layer_norm, tmp_path):
    """Tolerance: seeds 0-4 of this setting end within 0.13 (plain) and 0.17 (LayerNorm
    critics) of the peak; the bounds leave room over that spread."""
    from sodp3d.finetune.noise_sac import NoiseVecEnv, sac_model

    vec = gym.vector.SyncVectorEnv([_Line] * 4, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    env = NoiseVecEnv(_Identity(), vec, 1.5, seed_base=0)
    model = sac_model(env, False, layer_norm=layer_norm, learning_starts=64, gradient_steps=2, batch_size=64,
                      learning_rate=3e-3, policy_kwargs={"net_arch": [32, 32]}, seed=0, device="cpu")
    model._warmup_rng = np.random.default_rng(0)
    model.learn(total_timesteps=1600)
    start = np.mean([e["return"] for e in env.finished[:16]])  # the warm-up: the planner's own N(0, I) noise
    noise = model.predict(np.ones((1, 4), np.float32), deterministic=True)[0][0]
    # The first Ta rows of the deterministic noise sit near 0.5, where the reward peaks.
    assert np.abs(noise[:2] - 0.5).max() < (0.25 if layer_norm else 0.15), noise
    end = -float(np.mean((np.clip(noise[:2], -1, 1) - 0.5) ** 2))
    assert start < -0.3 and end > -0.03
    norms = [sum(isinstance(m, torch.nn.LayerNorm) for m in q.modules()) for q in (model.critic, model.critic_target)]
    assert norms == ([4, 4] if layer_norm else [0, 0])  # 2 critics x 2 hidden layers
    # A saved model comes back with its critics' class, and acts the same.
    model.save(tmp_path / "model.zip")
    back = sac_model(env, False, tmp_path / "model.zip", layer_norm=layer_norm, device="cpu")
    assert [sum(isinstance(m, torch.nn.LayerNorm) for m in back.critic.modules())] == norms[:1]
    obs = torch.ones((3, 4))
    with torch.no_grad():
        torch.testing.assert_close(back.critic(obs, torch.zeros((3, 4)))[0], model.critic(obs, torch.zeros((3, 4)))[0],
                                   rtol=0, atol=0)


def test_noise_aliasing_fits_the_chunks_value_and_steers_the_noise_there():
    """With aliasing the critic on executed chunks learns the closed-form reward, SAC's
    noise critic learns that critic's value of the chunk each noise executes (the clip to
    [-1, 1] maps many noises to one chunk), and the actor moves the noise towards the peak.
    Tolerances: seeds 0-4 of this setting end within 0.10 (Q_A), 0.19 (Q_W against Q_A)
    and 0.19 (the noise) of these targets; the bounds leave room over that spread, which
    is far larger than any difference of float kernels between machines."""
    from sodp3d.finetune.aliasing import aliased_sac
    from sodp3d.finetune.noise_sac import NoiseVecEnv, _sac_class

    vec = gym.vector.SyncVectorEnv([_Line] * 4, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    env = NoiseVecEnv(_Identity(), vec, 1.5, seed_base=0)
    model = aliased_sac(_sac_class())("MlpPolicy", env, learning_starts=64, gradient_steps=2, batch_size=64,
                                      learning_rate=3e-3, policy_kwargs={"net_arch": [32, 32]}, seed=0, device="cpu",
                                      chunk_dim=2)
    model.denoise = env.chunks_of_features
    model._warmup_rng = np.random.default_rng(0)
    model.learn(total_timesteps=1600)
    start = np.mean([e["return"] for e in env.finished[:16]])
    ones = torch.ones((6, 4))
    with torch.no_grad():
        chunks = torch.tensor([[-1.0, -1.0], [0.0, 0.0], [0.5, 0.5], [1.0, 1.0], [0.3, 0.7], [-0.5, 1.0]])
        q_a = torch.min(torch.cat(model.action_critic(ones, chunks), 1), 1)[0]
        np.testing.assert_allclose(q_a.numpy(), -((chunks - 0.5) ** 2).mean(1).numpy(), atol=0.15)
        noises = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.5, 0.5, -1.0, 1.0], [1.4, 1.4, 0.0, 0.0], [-1.0, 0.5, 0.3, 0.3]])
        q_w = torch.min(torch.cat(model.critic(ones[:4], noises / 1.5), 1), 1)[0]  # SB3 scales actions to [-1, 1]
        of_chunk = torch.min(torch.cat(model.action_critic(ones[:4], noises[:, :2].clamp(-1, 1)), 1), 1)[0]
        np.testing.assert_allclose(q_w.numpy(), of_chunk.numpy(), atol=0.3)
    noise = model.predict(np.ones((1, 4), np.float32), deterministic=True)[0][0]
    assert np.abs(noise[:2] - 0.5).max() < 0.3, noise
    end = -float(np.mean((np.clip(noise[:2], -1, 1) - 0.5) ** 2))
    assert start < -0.3 and end > -0.05


@pytest.mark.parametrize("aliasing", [False, True])
def test_a_killed_run_resumes_without_repeating_env_steps_and_its_checkpoint_acts(aliasing, pretrained, tmp_path,
                                                                                     monkeypatch, capsys):
    from sodp3d.finetune import noise_sac

    out = tmp_path / "ns"
    original = noise_sac.NoiseVecEnv.step_wait
    calls = {"n": 0}

    def killed(self):
        calls["n"] += 1
        if calls["n"] == 8:  # inside the 3rd episode (3 chunks each): after the checkpoints at 48 and 96 env steps
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(noise_sac.NoiseVecEnv, "step_wait", killed)
    # The aliasing case also runs LayerNorm critics: both are saved with SB3's model.
    ns = [*NS, f"noise_sac.aliasing={str(aliasing).lower()}", f"noise_sac.layer_norm={str(aliasing).lower()}"]
    assert main(["finetune", f"ckpt={pretrained}", f"out={out}", "env_steps=192", *ns]) == 130
    saved = load_checkpoint(out / "checkpoints" / "latest.ckpt")
    steps_then = saved["finetune_state"]["env_steps"]
    assert steps_then == 96 and saved["method"] == "noise-sac"
    assert (out / "sac" / "model.zip").is_file() and (out / "sac" / "replay_buffer.pkl").is_file()
    monkeypatch.setattr(noise_sac.NoiseVecEnv, "step_wait", original)
    if aliasing:  # the chunk critic is saved with SB3's model, and the resumed run loads it (exact_match)
        from stable_baselines3.common.save_util import load_from_zip_file

        params = load_from_zip_file(out / "sac" / "model.zip")[1]
        assert {"action_critic", "action_critic_target", "action_critic.optimizer"} <= set(params)
        # qf0 = Linear, LayerNorm, ReLU, ...: its module 1 has weights only with LayerNorm.
        assert "critic.qf0.1.weight" in params["policy"] and "qf0.1.weight" in params["action_critic"]
    assert main(["finetune", f"ckpt={pretrained}", f"out={out}", "env_steps=192", "resume=true", *ns]) == 0
    final = load_checkpoint(out / "checkpoints" / "latest.ckpt")["finetune_state"]
    steps = [h["env_steps"] for h in final["history"]]
    # One history row per episode boundary (2 envs x 24 steps), none repeated, none lost after the checkpoint.
    assert steps == [48, 96, 144, 192] and final["env_steps"] == 192
    assert all(("action_critic_loss" in h) == aliasing for h in final["history"][1:])  # trained from the 2nd episode
    assert final["sac"]["layer_norm"] == aliasing
    record = json.loads((out / "results.json").read_text())
    assert record["method"] == "noise-sac" and record["tasks"][0]["finetuned_success"] is not None
    assert [e["tag"] for e in record["tasks"][0]["evals"]] == ["initial", "final"]
    # The checkpoint acts through `sodp3d eval`: the planner steered by SAC's actor.
    assert main(["eval", f"ckpt={out}", "task=reach-v3", "episodes=2", "num_envs=1", "device=cpu",
                 f"out={tmp_path / 'ev'}", "env.metaworld.episode_length=24"]) == 0


@pytest.mark.parametrize("bad, words", [
    (["method=dsrl"], ["unknown method=dsrl", "ppo, noise-sac"]),
    (["noise_sac.noise_bound=0"], ["noise_sac.noise_bound must be a positive number"]),
    (["noise_sac.noise_bound=-1.5"], ["noise_sac.noise_bound must be a positive number"]),
    (["noise_sac.gradient_steps=0"], ["noise_sac.gradient_steps must be an integer >= 1"]),
    (["noise_sac.warmup=random"], ["unknown noise_sac.warmup=random", "planner, uniform"]),
    (["noise_sac.aliasing=maybe"], ["noise_sac.aliasing must be true or false", "'maybe'"]),
    (["noise_sac.reward_scale=0"], ["noise_sac.reward_scale must be a positive number", "got 0"]),
    (["noise_sac.prior_coef=-1"], ["noise_sac.prior_coef must be a number >= 0", "got -1"]),
    (["noise_sac.layer_norm=1"], ["noise_sac.layer_norm must be true or false", "got 1"]),
])
def test_bad_input_is_one_line_and_writes_nothing(bad, words, pretrained, tmp_path, capsys):
    out = tmp_path / "bad"
    args = [a for a in NS if not a.startswith(tuple(b.split("=")[0] + "=" for b in bad))]
    rc = main(["finetune", f"ckpt={pretrained}", f"out={out}", "env_steps=48", *args, *bad])
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("sodp3d")]
    assert rc == 2 and "Traceback" not in err and len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]
    assert not out.exists()


def test_a_checkpoint_of_another_method_is_refused_on_resume(pretrained, tmp_path, capsys):
    out = tmp_path / "ppo"
    ppo = ["task=reach-v3", "num_envs=2", "algo.p_step=1", "algo.batch_size=20", "algo.bc_batch_size=8",
           "algo.n_init=2", "eval.episodes=0", "device=cpu", "wandb.mode=disabled", "env.metaworld.episode_length=24"]
    assert main(["finetune", f"ckpt={pretrained}", f"out={out}", "env_steps=48", *ppo]) == 0
    before = sorted(p.name for p in out.rglob("*"))
    capsys.readouterr()
    rc = main(["finetune", f"ckpt={pretrained}", f"out={out}", "env_steps=96", "resume=true", *NS])
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("sodp3d")]
    assert rc == 2 and len(lines) == 1 and "was made by method=ppo; resume it with method=ppo" in lines[0], err
    assert sorted(p.name for p in out.rglob("*")) == before


@pytest.mark.parametrize("other, words", [("noise_sac.aliasing=true", "noise_sac.aliasing=false"),
                                          ("noise_sac.reward_scale=0.5", "noise_sac.reward_scale=1.0")])
def test_a_run_resumed_with_another_setting_of_what_sacs_buffer_holds_is_refused(other, words, pretrained,
                                                                                 tmp_path, capsys):
    out = tmp_path / "plain"
    assert main(["finetune", f"ckpt={pretrained}", f"out={out}", "env_steps=48", *NS]) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    rc = main(["finetune", f"ckpt={pretrained}", f"out={out}", "env_steps=96", "resume=true", *NS, other])
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("sodp3d")]
    assert rc == 2 and len(lines) == 1 and f"was trained with {words};" in lines[0], err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_aliasing_refuses_a_planner_with_a_frozen_prefix(pretrained, tmp_path, capsys):
    """Aliasing runs the planner from SAC's features alone; a frozen prefix (algo.ft_denoising_steps)
    reads the raw observation, so such a planner is refused in one line, before anything is written."""
    ppo = tmp_path / "prefixed"
    assert main(["finetune", f"ckpt={pretrained}", f"out={ppo}", "env_steps=48", "task=reach-v3", "num_envs=2",
                 "algo.p_step=1", "algo.batch_size=20", "algo.bc_batch_size=8", "algo.n_init=2",
                 "algo.ft_denoising_steps=4", "eval.episodes=0", "device=cpu", "wandb.mode=disabled",
                 "env.metaworld.episode_length=24"]) == 0
    capsys.readouterr()
    out = tmp_path / "ns"
    rc = main(["finetune", f"ckpt={ppo}", f"out={out}", "env_steps=48", *NS, "noise_sac.aliasing=true"])
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("sodp3d")]
    assert rc == 2 and len(lines) == 1 and "frozen prefix" in lines[0] and "aliasing=false" in lines[0], err
    assert not out.exists()
