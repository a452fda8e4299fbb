"""Fine-tuning in the planner's noise space (``method=noise-sac``), beyond the paper.

The planner stays frozen. Its deterministic sampler (DDIM, eta = 0) is a map from the
initial noise x_S (Tp x Da) to an action chunk; stable-baselines3's SAC learns where to
put that noise (the DSRL idea: Wagenmaker et al. 2025, arXiv 2506.15799):

    SAC's observation   the frozen encoder's features of the observation window
                        (To x the encoder's width; computed once per chunk; SAC never
                        encodes a cloud)
    SAC's action        x_S, flattened, in [-noise_bound, noise_bound]
    the step            the planner denoises x_S at eta = 0, the environments execute the
                        Ta actions of the chunk, the reward is the chunk's times
                        ``reward_scale`` plus ``prior_coef`` x log N(x_S; 0, I), up to
                        its constant; discount ``gamma`` per chunk; time limits
                        bootstrap (TimeLimit.truncated)

With ``ent_coef`` fixed to ``prior_coef``, SAC's entropy term and the prior's log-density
sum to -prior_coef x KL(pi || N(0, I)) per chunk: SAC then maximises the return while its
noise stays near the N(0, I) draws the planner was trained on, instead of spreading over
the bound as its entropy term alone asks.

Until ``learning_starts`` chunks have been collected, SAC acts as the pre-trained planner
does, with x_S ~ N(0, I) clipped to the bound (``warmup=planner``), so its replay buffer
starts from the planner's behaviour; ``warmup=uniform`` is SB3's own (uniform in the
bound). With ``aliasing=true`` SAC's critic is distilled from a critic on the executed
chunks (aliasing.py) instead of fitted by TD. Evaluation acts with SAC's deterministic
noise through the planner at eta = 0 (``SteeredPlanner``), on the reset seeds of every
method's evaluations, so results pair with PPO + BC's; the evaluation before fine-tuning
is the planner's own.

A run directory holds the usual ``checkpoints/latest.ckpt`` (the planner, SAC's actor to
act with, the run's record), and SB3's whole model and replay buffer under ``sac/``
(written atomically at the same moments), so a killed run resumes where its last
checkpoint stood: episodes then in flight are lost, none is repeated. Checkpoints, and
evaluations, fall at episode boundaries (every environment's episode ends on the same
chunk: fixed-length episodes in lockstep).

Shapes: E environments, G the feature width (To x encoder width), Tp predicted steps,
Da action dim, A = Tp x Da SAC's action width.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from sodp3d.errors import UserError
from sodp3d.policy import DiffusionPolicy

from .aliasing import aliased_sac
from .steering import SteeredPlanner, action_space, actor_noise_fn, obs_space

WARMUPS = ("planner", "uniform")
# What SAC's model and replay buffer are made with, at their defaults (also what a run from
# before a key was made with); a run resumes only with the same.
BUFFER_SETTINGS = {"aliasing": False, "layer_norm": False, "reward_scale": 1.0, "prior_coef": 0.0}


def check_noise_sac(c: DictConfig | dict) -> None:
    """One line for each bad setting, before anything is written."""
    get = c.get
    bound = get("noise_bound")
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not bound > 0:
        raise UserError(f"noise_sac.noise_bound must be a positive number (the bound on SAC's noise), got {bound!r}")
    for key, low in (("gradient_steps", 1), ("batch_size", 1), ("buffer_size", 1), ("learning_starts", 0),
                     ("checkpoint_every", 1)):
        v = get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            what = "gradient steps per environment step (per chunk of every env)" if key == "gradient_steps" else key
            raise UserError(f"noise_sac.{key} must be an integer >= {low} ({what}), got {v!r}")
    scale = get("reward_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise UserError(f"noise_sac.reward_scale must be a positive number (SAC's reward is the chunk's times it), "
                        f"got {scale!r}")
    prior = get("prior_coef", 0.0)
    if isinstance(prior, bool) or not isinstance(prior, (int, float)) or prior < 0:
        raise UserError(f"noise_sac.prior_coef must be a number >= 0 (the weight of log N(x_S; 0, I) in SAC's "
                        f"reward; 0: off), got {prior!r}")
    for key, what in (("aliasing", "noise aliasing: a critic on executed chunks, distilled into the noise space"),
                      ("layer_norm", "a LayerNorm after each hidden layer of SAC's critics")):
        if not isinstance(get(key, False), bool):
            raise UserError(f"noise_sac.{key} must be true or false ({what}), got {get(key)!r}")
    if str(get("warmup")) not in WARMUPS:
        raise UserError(f"unknown noise_sac.warmup={get('warmup')}; valid: {', '.join(WARMUPS)}")
    arch = get("net_arch")
    if not arch or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in arch):
        raise UserError(f"noise_sac.net_arch must list positive layer widths, e.g. [256, 256], got {arch!r}")


# ---------------------------------------------------------------------------------------
# SAC's environment: noise in, the chunk's reward out
def _vec_env_base():
    from stable_baselines3.common.vec_env import VecEnv

    return VecEnv


class NoiseVecEnv(_vec_env_base()):
    """SB3's VecEnv over the run's gymnasium vector env (SAME_STEP autoreset) and the frozen
    planner: each step denoises the E noises in one batch, executes the chunks, and
    returns the features of the next observation windows, and the chunks' rewards times
    ``reward_scale`` plus ``prior_coef`` x log N(x_S; 0, I) (-|x_S|^2 / 2). Counts executed
    env steps and keeps each finished episode's return (the env's alone) and success."""

    render_mode = None  # (SB3 asks its environments)

    def __init__(self, planner: DiffusionPolicy, vec: gym.vector.VectorEnv, bound: float, seed_base: int,
                 reward_scale: float = 1.0, prior_coef: float = 0.0):
        self.planner, self.vec, self.bound = planner, vec, float(bound)
        self.reward_scale, self.prior_coef = float(reward_scale), float(prior_coef)
        self.horizon, self.action_dim = planner.config.horizon, planner.action_dim
        self.sampler = planner.ddim(0.0)
        super().__init__(vec.num_envs, obs_space(planner.cond_dim), action_space(self.horizon, self.action_dim, bound))
        self.seed_base, self.resets = int(seed_base), 0
        self.env_steps = 0                      # executed, summed over the environments
        self.finished: list[dict[str, Any]] = []  # {"return", "success"} per finished episode
        self._ret = np.zeros(self.num_envs)
        self._ok = np.zeros(self.num_envs, bool)
        self._obs: dict[str, np.ndarray] | None = None
        self._actions: np.ndarray | None = None
        self.planner_seconds = 0.0

    @torch.no_grad()
    def features(self, obs: dict[str, Any]) -> np.ndarray:
        return self.planner.condition({k: obs[k] for k in self.planner.obs_keys}).cpu().numpy().astype(np.float32)

    def reset(self) -> np.ndarray:
        seeds = [self.seed_base + self.resets * self.num_envs + j for j in range(self.num_envs)]
        self.resets += 1
        self._obs, _ = self.vec.reset(seed=seeds)
        self._ret[:] = 0
        self._ok[:] = False
        return self.features(self._obs)

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions, np.float32)

    @torch.no_grad()
    def chunks(self, obs: dict[str, Any] | None, noise: np.ndarray | torch.Tensor,
               cond: torch.Tensor | None = None) -> torch.Tensor:
        """The Ta actions (B, Ta, Da) the frozen planner executes from each noise (B, A), at
        eta = 0, on the planner's device. ``cond``: the observation's features when the caller
        has them; without ``obs`` (noise aliasing reads SAC's observation alone) the planner
        must have no frozen prefix."""
        x_init = torch.as_tensor(noise, device=self.planner.device).reshape(-1, self.horizon, self.action_dim)
        obs = None if obs is None else {k: obs[k] for k in self.planner.obs_keys}
        cond = None if cond is None else cond.to(self.planner.device)
        return self.planner.predict_action(obs, sampler=self.sampler, x_init=x_init, cond=cond)["action"]

    def chunks_of_features(self, features: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Noise aliasing's map: (B, G) features and (B, A) noises -> (B, Ta x Da) chunks."""
        return self.chunks(None, noise, cond=features).reshape(len(noise), -1).to(noise.device)

    def step_wait(self):
        t = time.perf_counter()
        actions = self.chunks(self._obs, self._actions).cpu().numpy()
        self.planner_seconds += time.perf_counter() - t
        obs, reward, terminated, truncated, info = self.vec.step(actions)
        done = terminated | truncated
        final = info.get("final_info", {})
        executed = np.where(done, final.get("executed", 0), info.get("executed", 0)).astype(int)
        success = np.where(done, final.get("success", False), info.get("success", False)).astype(bool)
        self.env_steps += int(executed.sum())
        self._ret += reward
        self._ok |= success
        t = time.perf_counter()
        features = self.features(obs)
        infos: list[dict[str, Any]] = [{"executed": int(executed[i])} for i in range(self.num_envs)]
        ended = np.nonzero(done)[0]
        if len(ended):
            last = info["final_obs"]
            terminal = self.features({k: np.stack([last[i][k] for i in ended]) for k in self.planner.obs_keys})
            for row, i in enumerate(ended):
                infos[i]["terminal_observation"] = terminal[row]
                infos[i]["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
                self.finished.append({"return": float(self._ret[i]), "success": bool(self._ok[i])})
                self._ret[i], self._ok[i] = 0.0, False
        self.planner_seconds += time.perf_counter() - t
        self._obs = obs
        sac_reward = reward * self.reward_scale
        if self.prior_coef:
            sac_reward = sac_reward - self.prior_coef * 0.5 * np.square(self._actions, dtype=np.float64).sum(1)
        return features, sac_reward.astype(np.float32), done, infos

    def close(self) -> None:
        self.vec.close()

    # SB3's VecEnv interface beyond stepping: nothing here is a wrapper or has attributes to set.
    def get_attr(self, attr_name, indices=None):
        return [getattr(self, attr_name)] * len(self._get_indices(indices))

    def set_attr(self, attr_name, value, indices=None):
        setattr(self, attr_name, value)

    def env_method(self, method_name, *args, indices=None, **kwargs):
        raise NotImplementedError(method_name)

    def env_is_wrapped(self, wrapper_class, indices=None):
        return [False] * len(self._get_indices(indices))


def _sac_class():
    from stable_baselines3 import SAC

    class NoiseSAC(SAC):
        """SB3's SAC whose warm-up acts as the pre-trained planner: x_S ~ N(0, I), clipped."""

        planner_warmup = True

        def _sample_action(self, learning_starts, action_noise=None, n_envs=1):
            if self.planner_warmup and self.num_timesteps < learning_starts:
                bound = float(self.action_space.high[0])
                noise = np.clip(self._warmup_rng.standard_normal((n_envs, self.action_space.shape[0])), -bound, bound)
                noise = noise.astype(np.float32)
                return noise, self.policy.scale_action(noise)
            return super()._sample_action(learning_starts, action_noise, n_envs)

    return NoiseSAC


@functools.cache
def _layer_norm_policy() -> type:
    """SB3's SAC policy whose critics put a LayerNorm after each hidden linear layer (DSRL's
    critics have one; a common guard against a critic that overestimates). The actor is
    SB3's own, so a checkpoint acts through steering.py unchanged."""
    from stable_baselines3.common.policies import ContinuousCritic
    from stable_baselines3.common.preprocessing import get_action_dim
    from stable_baselines3.common.torch_layers import create_mlp
    from stable_baselines3.sac.policies import SACPolicy

    class LayerNormCritic(ContinuousCritic):
        def __init__(self, observation_space, action_space, net_arch, features_extractor, features_dim,
                     activation_fn=torch.nn.ReLU, **kwargs):
            super().__init__(observation_space, action_space, net_arch, features_extractor, features_dim,
                             activation_fn, **kwargs)
            width = features_dim + get_action_dim(self.action_space)
            self.q_networks = []
            for idx in range(self.n_critics):  # replaces SB3's qf0, qf1, ...
                q_net = torch.nn.Sequential(*create_mlp(width, 1, net_arch, activation_fn,
                                                        post_linear_modules=[torch.nn.LayerNorm]))
                self.add_module(f"qf{idx}", q_net)
                self.q_networks.append(q_net)

    class LayerNormSACPolicy(SACPolicy):
        def make_critic(self, features_extractor=None) -> ContinuousCritic:
            kwargs = self._update_features_extractor(self.critic_kwargs, features_extractor)
            return LayerNormCritic(**kwargs).to(self.device)

    return LayerNormSACPolicy


def sac_model(env: NoiseVecEnv, aliasing: bool, path: Path | None = None, layer_norm: bool = False, **kwargs):
    """SB3's SAC over ``env`` (``NoiseSAC``, trained with noise aliasing when asked, its
    critics with LayerNorm when asked): a new one with ``kwargs``, or the one saved at
    ``path`` (its critics' class given again, not read from the zip); with aliasing, the
    frozen planner's map is wired in (it is not saved with the model)."""
    SAC = aliased_sac(_sac_class()) if aliasing else _sac_class()
    if path is not None:
        if layer_norm:
            kwargs["custom_objects"] = {**kwargs.get("custom_objects", {}), "policy_class": _layer_norm_policy()}
        model = SAC.load(path, env=env, **kwargs)
    else:
        chunk = {"chunk_dim": env.planner.config.n_action_steps * env.action_dim} if aliasing else {}
        model = SAC(_layer_norm_policy() if layer_norm else "MlpPolicy", env, **kwargs, **chunk)
    if aliasing:
        model.denoise = env.chunks_of_features
    return model


# ---------------------------------------------------------------------------------------
# The run
def finetune_task(cfg: DictConfig, task: str, run: Path, device: torch.device, pretrained: DiffusionPolicy,
                  cloud_frame: str) -> dict[str, Any]:
    """Fine-tune one task by SAC in the frozen planner's noise space; returns its summary
    (the same record as PPO + BC's)."""
    from stable_baselines3.common.callbacks import BaseCallback
    from tqdm import tqdm

    from sodp3d.checkpoint import load_checkpoint, refuse_other_method, save_checkpoint
    from sodp3d.envs import make_vector_env
    from sodp3d.evaluate import check_policy_fits
    from sodp3d.files import atomic_write, last_good, reraise_write_failure
    from sodp3d.runs import RunLogger, refuse_existing

    from .evaluations import eval_etas, eval_value, new_state, record_evaluation, task_summary

    c = cfg.noise_sac
    planner = pretrained  # frozen: never trained here
    check_policy_fits(planner, task, cfg.env)
    ckpt, sac_dir = run / "checkpoints" / "latest.ckpt", run / "sac"
    state = new_state()
    made_with = {k: type(v)(c.get(k, v)) for k, v in BUFFER_SETTINGS.items()}
    aliasing, layer_norm = made_with["aliasing"], made_with["layer_norm"]
    state["sac"] = {"resets": 0, "episodes": 0, **made_with}
    if ckpt.exists():
        refuse_existing(run, True, bool(cfg.resume), "a fine-tuning run")
        payload = load_checkpoint(ckpt, map_location=device)
        refuse_other_method(payload, "noise-sac", ckpt)
        state = payload["finetune_state"]
    for key, asked in made_with.items():
        trained_with = state["sac"].get(key, BUFFER_SETTINGS[key])
        if trained_with != asked:
            raise UserError(f"{ckpt} was trained with noise_sac.{key}={json.dumps(trained_with)}; resume it with "
                            "the same, or fine-tune into another out")
    if aliasing and getattr(planner, "prefix", None) is not None:
        raise UserError("noise_sac.aliasing=true runs the planner from SAC's features alone, and this planner has "
                        "a frozen prefix that reads the raw observation; use noise_sac.aliasing=false")
    etas = eval_etas(cfg)
    samplers = [planner.ddim(e, float(cfg.algo.min_std)) for e in etas]
    bound, G = float(c.noise_bound), int(c.gradient_steps)

    def summary(final: float | None, updates: int) -> dict[str, Any]:
        return task_summary(state, task, "noise-sac", str(cfg.init), etas, updates, final, method="noise-sac")

    done = eval_value(state, "final", etas[0])
    if done is not None and state["env_steps"] >= int(cfg.env_steps):
        return summary(done, len(state["history"]))
    run.mkdir(parents=True, exist_ok=True)
    logger = RunLogger(run, cfg, f"{run.parent.name}-{task}")
    E = int(cfg.num_envs)
    layout = dict(mode=str(cfg.get("vector_env", "auto")), workers=cfg.get("env_workers"),
                  point_cloud=planner.reads_camera, n_obs_steps=planner.config.n_obs_steps,
                  n_action_steps=planner.config.n_action_steps)
    # SB3 steps through an episode's end at once (gymnasium's SAME_STEP autoreset), which the
    # workers layout does not give: SAC's environments are async where they render, else sync.
    from sodp3d.envs.vector import resolve_mode

    mode, _ = resolve_mode(layout["mode"], E, layout["workers"], planner.reads_camera)
    mode = "sync" if mode == "workers" else mode
    train_vec = make_vector_env(task, E, cfg.env, **{**layout, "mode": mode},
                                autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)

    def evaluate(policy, tag: str) -> float:
        """The evaluations' protocol in environments of their own, open only while they run
        (E more worker processes that render cost memory: 0.6 GB each at the demo's settings)."""
        eval_vec = make_vector_env(task, E, cfg.env, **layout)
        try:
            return record_evaluation(state, policy, task, cfg, etas, samplers, eval_vec, logger, tag)
        finally:
            eval_vec.close()

    env = NoiseVecEnv(planner, train_vec, bound, int(cfg.seed) * 1_000_003, made_with["reward_scale"],
                      made_with["prior_coef"])
    env.resets, env.env_steps = int(state["sac"]["resets"]), int(state["env_steps"])
    # SB3 allocates its replay buffer whole and saves it whole: no larger than the budget can fill.
    budget_chunks = -(-int(cfg.env_steps) // planner.config.n_action_steps) + int(c.learning_starts) + 2 * E
    kwargs = dict(learning_rate=float(c.learning_rate), buffer_size=min(int(c.buffer_size), budget_chunks),
                  learning_starts=int(c.learning_starts), batch_size=int(c.batch_size), tau=float(c.tau),
                  gamma=float(c.gamma), train_freq=1, gradient_steps=G, ent_coef=c.ent_coef,
                  target_entropy=c.target_entropy, device=device, seed=int(cfg.seed))
    if (sac_dir / "model.zip").exists() and ckpt.exists():
        model = sac_model(env, aliasing, sac_dir / "model.zip", layer_norm=layer_norm, device=device,
                          custom_objects={"learning_rate": kwargs["learning_rate"]})
        model.load_replay_buffer(sac_dir / "replay_buffer.pkl")
    else:
        model = sac_model(env, aliasing, layer_norm=layer_norm, policy_kwargs={"net_arch": list(c.net_arch)},
                          **kwargs)
    model.planner_warmup = str(c.warmup) == "planner"
    model._warmup_rng = np.random.default_rng([int(cfg.seed), int(state["sac"]["resets"])])
    steered = SteeredPlanner(planner, actor_noise_fn(model.actor, bound, env.horizon, env.action_dim))
    saved = {"at": f"env step {state['env_steps']}" if ckpt.exists() else None, "steps": state["env_steps"]}

    def save() -> None:
        state["sac"].update(resets=env.resets)
        sac_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(sac_dir / "model.zip") as tmp:
            model.save(tmp)
        with atomic_write(sac_dir / "replay_buffer.pkl") as tmp:
            model.save_replay_buffer(tmp)
        noise_policy = {"actor": model.actor.state_dict(), "obs_dim": planner.cond_dim, "horizon": env.horizon,
                        "action_dim": env.action_dim, "bound": bound, "net_arch": list(c.net_arch)}
        save_checkpoint(ckpt, {"policy_config": planner.config.to_dict(), "policy": planner.state_dict(),
                               "task": task, "cloud_frame": cloud_frame, "method": "noise-sac",
                               "noise_policy": noise_policy, "train_config": OmegaConf.to_container(cfg, resolve=True),
                               "finetune_state": state}, last_good=saved["at"])
        saved.update(at=f"env step {state['env_steps']}", steps=state["env_steps"])

    budget = int(cfg.env_steps)
    every = int(cfg.eval.every_env_steps)
    bar = tqdm(total=budget, initial=min(state["env_steps"], budget), desc=f"finetune {task} (noise-sac)",
               unit="step", dynamic_ncols=True)
    clock = {"t": time.perf_counter(), "steps": state["env_steps"], "planner": 0.0, "grad": 0}

    class Progress(BaseCallback):
        """Counts env steps; at each episode boundary logs the episodes, evaluates and saves
        when due; stops at the first boundary past the budget."""

        def _on_step(self) -> bool:
            before = state["env_steps"]
            state["env_steps"] = env.env_steps
            bar.update(max(0, min(state["env_steps"], budget) - min(before, budget)))
            if not np.all(self.locals["dones"]):
                return True
            episodes, env.finished = env.finished, []
            state["sac"]["episodes"] += len(episodes)
            now = time.perf_counter()
            vals = model.logger.name_to_value
            entry = {"update": len(state["history"]) + 1, "env_steps": state["env_steps"],
                     "success_rate": float(np.mean([e["success"] for e in episodes])),
                     "mean_return": float(np.mean([e["return"] for e in episodes])), "episodes": len(episodes),
                     "gradient_steps": int(model._n_updates),
                     "replay_buffer": int(model.replay_buffer.size()) * env.num_envs,  # chunks (a row holds every env's)
                     "env_steps_per_s": (state["env_steps"] - clock["steps"]) / max(now - clock["t"], 1e-9),
                     "planner_share": (env.planner_seconds - clock["planner"]) / max(now - clock["t"], 1e-9),
                     "warmup": float(model.num_timesteps < model.learning_starts),
                     **{k.split("/")[-1]: float(v) for k, v in vals.items() if k.startswith("train/")}}
            clock.update(t=now, steps=state["env_steps"], planner=env.planner_seconds)
            state["history"].append(entry)
            logger.log(entry, state["env_steps"])
            bar.set_postfix(success=f"{entry['success_rate']:.2f}", buffer=entry["replay_buffer"])
            last_eval = state["evals"][-1]["env_steps"] if state["evals"] else 0
            finished = state["env_steps"] >= budget
            if (int(cfg.eval.episodes) > 0 and every > 0 and state["env_steps"] - last_eval >= every and not finished):
                evaluate(steered, "periodic")
            if finished or state["env_steps"] - saved["steps"] >= int(c.checkpoint_every):
                save()
            return not finished

    try:
        if state["pretrained_eval"] is None:
            if int(cfg.eval.episodes) > 0:  # the planner's own evaluation: every method's "before"
                state["pretrained_eval"] = evaluate(planner, "initial")
            save()
        if state["env_steps"] < budget:
            model.learn(total_timesteps=10 ** 12, callback=Progress(), reset_num_timesteps=False, progress_bar=False)
        final = evaluate(steered, "final") if int(cfg.eval.episodes) > 0 else None
        save()
    except OSError as e:  # a log line, SB3's model or buffer, or another file of the run could not be written
        reraise_write_failure(e, run, last_good(saved["at"], ckpt))
    finally:
        bar.close()
        env.close()
        logger.close()
    return summary(final, len(state["history"]))
