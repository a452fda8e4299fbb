"""Task-guided fine-tuning: PPO over the denoising chain plus a behaviour-cloning regulariser.

Shapes: M collected chunks, B minibatch of chunks, To observed steps, Tp predicted steps,
Ta executed steps, Da action dim, S DDIM steps, G conditioning dim, E parallel envs.

The K-step denoising process is an MDP (the paper's eq. 9): each chunk's DDIM chain
x_S -> ... -> x_0 (eta = 1, so every step is a Gaussian) is a trajectory whose only
reward is the chunk's: the sum of the environment rewards of its Ta executed steps
(discount 1). One update, top to bottom:

  1. collect E episodes in parallel; keep every chunk's observations, chain, old
     per-step log-probs (means over Tp x Da, floored std, as DPPO) and reward;
  2. weights A = chunk rewards, normalised over the collected batch by default
     (``algo.normalize_reward``; raw rewards otherwise). No critic, no advantage
     estimator, as the paper;
  3. p_step gradient steps per collected episode on minibatches of chunks (all S
     denoising steps of each), with the clipped objective
        L_Imp = mean over (chunk, k) of -min(rho_k A, clip(rho_k, 1-e, 1+e) A),
        rho_k = p_theta(x_{k-1} | x_k, s) / p_old(x_{k-1} | x_k, s),
     plus lambda times the regulariser:
        bc    the pre-training denoising loss (eq. 7) on action sequences of a
              trajectory-level target buffer: successful trajectories, or the top-n
              by return when none succeeded, from recent experience (eq. 13-15);
        none  nothing (DDPO / DPPO style);
        kl    KL to the frozen pre-trained model at every denoising step (DPOK);
        pl    the pre-training loss on the model's own recent samples (DLPO);
  4. log: success rate, mean chunk reward, approx KL, clip fraction, ratio range,
     every loss term, target-buffer size, env steps/s.

fp32 throughout; gradient clipping; a non-finite loss stops the run with a clear
message and keeps the last good checkpoint.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from sodp3d.checkpoint import load_checkpoint, save_checkpoint
from sodp3d.diffusion import DDIMSampler
from sodp3d.errors import UserError
from sodp3d.files import write_text_atomic
from sodp3d.policy import DiffusionPolicy, PolicyConfig

LOG_RATIO_CLAMP = 20.0  # |log rho| beyond this is numerically meaningless


# ---------------------------------------------------------------------------------------
# Collected data
@dataclass
class Trajectory:
    """One episode as the target buffer keeps it."""

    obs: dict[str, np.ndarray]        # per chunk: (C, To, ...) observation windows
    actions: np.ndarray               # (T, Da) executed actions, in order
    chunk_starts: np.ndarray          # (C,) index of each chunk's first executed action
    ret: float
    success: bool


@dataclass
class Rollout:
    """Chunks for PPO (torch, CPU) and the episodes they came from."""

    obs: dict[str, torch.Tensor]      # (M, To, ...)
    chains: torch.Tensor              # (M, S+1, Tp, Da), normalised action space
    old_logp: torch.Tensor            # (M, S)
    reward: torch.Tensor              # (M,)
    trajectories: list[Trajectory] = field(default_factory=list)
    env_steps: int = 0
    seconds: float = 0.0

    @property
    def size(self) -> int:
        return int(self.reward.shape[0])


def collect(policy: DiffusionPolicy, vec, sampler: DDIMSampler, seeds: list[int],
            generator: torch.Generator | None = None) -> Rollout:
    """One episode in each of the E environments (lockstep), sampling chains with eta > 0."""
    E = len(seeds)
    t0 = time.perf_counter()
    obs, _ = vec.reset(seed=seeds)
    done = np.zeros(E, bool)
    per_env: list[dict[str, list]] = [{"obs": [], "chains": [], "logp": [], "reward": [], "actions": [],
                                       "starts": [], "success": False} for _ in range(E)]
    steps = 0
    policy.eval()
    while not done.all():
        o = {k: obs[k] for k in policy.obs_keys}
        sampled = policy.sample_chain(o, sampler, generator, log_prob=True)
        actions = sampled.action.cpu().numpy()
        chain, logp = sampled.chain.cpu(), sampled.log_prob.cpu()  # one device transfer per chunk
        obs, reward, terminated, truncated, info = vec.step(actions)
        executed = np.asarray(info["executed"])
        success = np.asarray(info["success"], bool)
        for e in np.nonzero(~done)[0]:
            rec = per_env[e]
            rec["obs"].append({k: np.asarray(o[k][e]) for k in policy.obs_keys})
            rec["chains"].append(chain[e])
            rec["logp"].append(logp[e])
            rec["reward"].append(float(reward[e]))
            rec["starts"].append(len(rec["actions"]))
            rec["actions"].extend(actions[e, : executed[e]])
            rec["success"] |= bool(success[e])
            steps += int(executed[e])
        done |= terminated | truncated
    trajectories = []
    for rec in per_env:
        trajectories.append(Trajectory(
            obs={k: np.stack([c[k] for c in rec["obs"]]) for k in policy.obs_keys},
            actions=np.asarray(rec["actions"], np.float32),
            chunk_starts=np.asarray(rec["starts"], np.int64),
            ret=float(sum(rec["reward"])),
            success=bool(rec["success"]),
        ))
    return Rollout(
        obs={k: torch.as_tensor(np.concatenate([t.obs[k] for t in trajectories])) for k in policy.obs_keys},
        chains=torch.cat([torch.stack(r["chains"]) for r in per_env]),
        old_logp=torch.cat([torch.stack(r["logp"]) for r in per_env]),
        reward=torch.as_tensor([x for r in per_env for x in r["reward"]], dtype=torch.float32),
        trajectories=trajectories,
        env_steps=steps,
        seconds=time.perf_counter() - t0,
    )


# ---------------------------------------------------------------------------------------
# The target buffer
def action_windows(traj: Trajectory, horizon: int, n_obs_steps: int, chunks: np.ndarray | None = None) -> np.ndarray:
    """(C, Tp, Da): for each chunk (or the chosen ``chunks``), the executed actions from its
    first observed step on, edge-padded at the episode's ends, aligned as the pre-training
    windows are."""
    T = len(traj.actions)
    starts = traj.chunk_starts if chunks is None else traj.chunk_starts[np.asarray(chunks)]
    idx = starts[:, None] - (n_obs_steps - 1) + np.arange(horizon)[None]
    return traj.actions[np.clip(idx, 0, T - 1)]


class TargetBuffer:
    """Trajectory-level buffer of proficient behaviour (the paper's eq. 13-14).

    Keeps the ``capacity`` most recent trajectories; ``proficient()`` are the successful
    ones among them, or, when none succeeded, the ``top_n`` by return.
    """

    def __init__(self, capacity: int = 50, top_n: int = 10):
        self.capacity, self.top_n = int(capacity), int(top_n)
        self.trajectories: deque[Trajectory] = deque(maxlen=self.capacity)

    def add(self, trajectories: list[Trajectory]) -> None:
        self.trajectories.extend(trajectories)

    def proficient(self) -> list[Trajectory]:
        wins = [t for t in self.trajectories if t.success]
        if wins:
            return wins
        return sorted(self.trajectories, key=lambda t: t.ret, reverse=True)[: self.top_n]

    def __len__(self) -> int:
        return len(self.proficient())

    def sample(self, batch_size: int, horizon: int, n_obs_steps: int, rng: np.random.Generator) -> dict[str, Any]:
        """Windows {'obs': {k: (B, To, ...)}, 'action': (B, Tp, Da)} from proficient trajectories."""
        pool = self.proficient()
        if not pool:
            raise RuntimeError("the target buffer is empty")
        counts = np.array([len(t.chunk_starts) for t in pool])
        flat = rng.integers(0, counts.sum(), size=batch_size)
        owner = np.searchsorted(np.cumsum(counts), flat, side="right")
        local = flat - np.concatenate([[0], np.cumsum(counts)[:-1]])[owner]
        obs = {k: np.stack([pool[o].obs[k][i] for o, i in zip(owner, local)]) for k in pool[0].obs}
        acts = np.stack([action_windows(pool[o], horizon, n_obs_steps, [i])[0] for o, i in zip(owner, local)])
        return {"obs": obs, "action": acts.astype(np.float32)}

    def state(self) -> list[dict[str, Any]]:
        return [{"obs": {k: torch.as_tensor(v) for k, v in t.obs.items()}, "actions": torch.as_tensor(t.actions),
                 "chunk_starts": torch.as_tensor(t.chunk_starts),
                 "ret": t.ret, "success": t.success} for t in self.trajectories]

    def load(self, state: list[dict[str, Any]]) -> None:
        self.trajectories.clear()
        for s in state:
            self.trajectories.append(Trajectory(
                obs={k: v.numpy() for k, v in s["obs"].items()}, actions=s["actions"].numpy(),
                chunk_starts=s["chunk_starts"].numpy(),
                ret=float(s["ret"]), success=bool(s["success"])))


# ---------------------------------------------------------------------------------------
# Losses (functions; the loop owns the optimiser)
def chunk_log_probs(policy: DiffusionPolicy, sampler: DDIMSampler, obs: dict[str, torch.Tensor],
                    chains: torch.Tensor) -> torch.Tensor:
    """(B, S) log-probabilities of stored chains under the current weights (encoder included)."""
    return policy.chain_log_prob(policy.condition(obs), chains, sampler)


def ppo_loss(new_logp: torch.Tensor, old_logp: torch.Tensor, weights: torch.Tensor, clip: float):
    """Clipped importance-ratio loss per denoising step, in the standard PPO form (so that a
    negative weight is handled correctly). Shapes: logp (B, S), weights (B,)."""
    log_ratio = (new_logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()
    a = weights[:, None].expand_as(ratio)
    loss = -torch.min(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a).mean()
    with torch.no_grad():
        stats = {
            "approx_kl": float(((ratio - 1) - log_ratio).mean()),
            "clip_fraction": float(((ratio - 1).abs() > clip).float().mean()),
            "ratio_min": float(ratio.min()),
            "ratio_max": float(ratio.max()),
        }
    return loss, stats


def gaussian_kl_same_std(mean_p: torch.Tensor, mean_q: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mp, s^2) || N(mq, s^2)) averaged over the non-batch dims: (B,)."""
    return ((mean_p - mean_q) ** 2 / (2 * std ** 2)).flatten(1).mean(1)


class Regulariser:
    """A regulariser's loss for one minibatch; registry below, chosen by ``reg=``."""

    name = ""

    def __init__(self, finetuner: "FineTuner"):
        self.ft = finetuner

    def loss(self, obs: dict[str, torch.Tensor], chains: torch.Tensor, rollout: Rollout) -> torch.Tensor | None:
        raise NotImplementedError


class NoRegulariser(Regulariser):
    name = "none"

    def loss(self, obs, chains, rollout):
        return None


class BCRegulariser(Regulariser):
    """Pre-training loss on proficient trajectories' action sequences (the paper's)."""

    name = "bc"

    def loss(self, obs, chains, rollout):
        ft = self.ft
        if len(ft.buffer.trajectories) == 0:
            return None
        c = ft.policy.config
        batch = ft.buffer.sample(ft.bc_batch_size, c.horizon, c.n_obs_steps, ft.rng)
        return ft.policy.compute_loss(batch, generator=ft.torch_gen)


class KLRegulariser(Regulariser):
    """KL to the frozen pre-trained model at every denoising step of the stored chains (DPOK)."""

    name = "kl"

    def loss(self, obs, chains, rollout):
        ft = self.ft
        sampler = ft.sampler
        # All S steps of every chain as one batch of B * S, for both models.
        B, S = chains.shape[0], chains.shape[1] - 1
        x_t = chains[:, :-1].reshape(B * S, *chains.shape[2:])
        t = torch.as_tensor(sampler.timesteps, device=chains.device).repeat(B)
        t_prev = torch.as_tensor(sampler.prev_timesteps, device=chains.device).repeat(B)
        cond = ft.policy.condition(obs).repeat_interleave(S, dim=0)
        mean, std = sampler.step_distribution(ft.policy.denoiser(cond), x_t, t, t_prev)
        with torch.no_grad():
            ref_cond = ft.reference.condition(obs).repeat_interleave(S, dim=0)
            ref_mean, _ = sampler.step_distribution(ft.reference.denoiser(ref_cond), x_t, t, t_prev)
        return gaussian_kl_same_std(mean, ref_mean, std).mean()


class PLRegulariser(Regulariser):
    """The pre-training loss on the model's own recent samples (DLPO)."""

    name = "pl"

    def loss(self, obs, chains, rollout):
        ft = self.ft
        x0 = ft.policy.normalizer.unnormalize("action", chains[:, -1])
        return ft.policy.compute_loss({"obs": obs, "action": x0}, generator=ft.torch_gen)


REGULARISERS: dict[str, type[Regulariser]] = {
    "bc": BCRegulariser,
    "none": NoRegulariser,
    "kl": KLRegulariser,
    "pl": PLRegulariser,
}


# ---------------------------------------------------------------------------------------
class FineTuner:
    """Owns the optimiser, schedule, target buffer and RNGs around a policy it wraps."""

    def __init__(self, policy: DiffusionPolicy, algo: DictConfig | dict, device: torch.device, seed: int,
                 reference: DiffusionPolicy | None = None):
        a = OmegaConf.create(algo) if isinstance(algo, dict) else algo
        self.policy = policy.to(device)
        self.device = device
        self.reg_name = str(a.reg)
        if self.reg_name not in REGULARISERS:
            raise UserError(f"unknown regulariser reg={self.reg_name}; valid: {', '.join(REGULARISERS)}")
        self.sampler = policy.ddim(float(a.eta), float(a.min_std))
        self.clip = float(a.clip)
        self.reg_weight = float(a.reg_weight)
        self.p_step = int(a.p_step)
        self.batch_size = int(a.batch_size)
        self.bc_batch_size = int(a.get("bc_batch_size") or a.batch_size)
        self.normalize_reward = bool(a.normalize_reward)
        self.grad_clip = float(a.grad_clip)
        self.optimizer = torch.optim.Adam(policy.parameters(), lr=float(a.lr))
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=float(a.lr_decay))
        self.buffer = TargetBuffer(int(a.buffer_capacity), int(a.top_n))
        self.rng = np.random.default_rng(seed)
        self.torch_gen = torch.Generator(device=device).manual_seed(seed)
        self.reference = None
        if self.reg_name == "kl":
            self.reference = (reference or copy.deepcopy(policy)).to(device).eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)
        self.regulariser = REGULARISERS[self.reg_name](self)
        self.updates = 0

    def weights(self, reward: torch.Tensor) -> torch.Tensor:
        if not self.normalize_reward:
            return reward
        return (reward - reward.mean()) / (reward.std() + 1e-8) if reward.numel() > 1 else reward * 0

    def update(self, rollout: Rollout, episodes: int | None = None) -> dict[str, float]:
        """p_step gradient steps per collected episode on this rollout; returns diagnostics."""
        policy = self.policy
        # A poisoned rollout must not move the weights at all: check it before any step.
        for name, tensor in [("reward", rollout.reward), ("old_logp", rollout.old_logp), ("chains", rollout.chains),
                             *[(f"obs['{k}']", v) for k, v in rollout.obs.items()]]:
            if not torch.isfinite(tensor).all():
                raise FloatingPointError(f"non-finite values in the collected {name} at update {self.updates}")
        policy.train()
        n_steps = self.p_step * (episodes if episodes is not None else max(1, len(rollout.trajectories)))
        S = rollout.chains.shape[1] - 1
        chunks_per_batch = max(1, self.batch_size // S)
        weights = self.weights(rollout.reward).to(self.device)
        sums: dict[str, float] = {}
        for _ in range(n_steps):
            idx = torch.as_tensor(self.rng.choice(rollout.size, size=min(chunks_per_batch, rollout.size), replace=False))
            obs = {k: v[idx].to(self.device) for k, v in rollout.obs.items()}
            chains = rollout.chains[idx].to(self.device)
            new_logp = chunk_log_probs(policy, self.sampler, obs, chains)
            loss_imp, stats = ppo_loss(new_logp, rollout.old_logp[idx].to(self.device), weights[idx.to(self.device)], self.clip)
            reg = self.regulariser.loss(obs, chains, rollout)
            loss = loss_imp if reg is None else loss_imp + self.reg_weight * reg
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite loss at update {self.updates} (L_Imp={float(loss_imp.detach())}, "
                    f"L_{self.reg_name}={float(reg.detach()) if reg is not None else 0.0})"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), self.grad_clip)
            if not torch.isfinite(grad_norm):
                raise FloatingPointError(f"non-finite gradient at update {self.updates}")
            self.optimizer.step()
            stats.update({"loss": float(loss.detach()), "loss_imp": float(loss_imp.detach()),
                          f"loss_{self.reg_name}": float(reg.detach()) if reg is not None else 0.0,
                          "grad_norm": float(grad_norm)})
            for k, v in stats.items():
                if k == "ratio_min":
                    sums[k] = min(sums.get(k, math.inf), v)
                elif k == "ratio_max":
                    sums[k] = max(sums.get(k, -math.inf), v)
                else:
                    sums[k] = sums.get(k, 0.0) + v / n_steps
        sums["lr"] = self.scheduler.get_last_lr()[0]  # the rate these steps used
        self.scheduler.step()
        self.updates += 1
        sums["gradient_steps"] = n_steps
        return sums

    def state(self) -> dict[str, Any]:
        return {"policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "buffer": self.buffer.state(), "updates": self.updates,
                "rng": self.rng.bit_generator.state, "torch_gen": self.torch_gen.get_state()}

    def load(self, payload: dict[str, Any]) -> None:
        self.policy.load_state_dict(payload["policy"], strict=True)
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.buffer.load(payload["buffer"])
        self.updates = int(payload["updates"])
        self.rng.bit_generator.state = payload["rng"]
        self.torch_gen.set_state(payload["torch_gen"].cpu())  # generator states are CPU byte tensors


# ---------------------------------------------------------------------------------------
# The command
def _initial_policy(cfg: DictConfig, pretrained: DiffusionPolicy, device: torch.device) -> DiffusionPolicy:
    """The policy to fine-tune, from the pre-trained one (left untouched) and cfg.init."""
    init = str(cfg.init)
    if init == "pretrained":
        return copy.deepcopy(pretrained)
    if init == "scratch":
        torch.manual_seed(int(cfg.seed))
        fresh = DiffusionPolicy(PolicyConfig(**pretrained.config.to_dict()))
        fresh.normalizer.load_state_dict(pretrained.normalizer.state_dict())  # data statistics only
        return fresh.to(device)
    raise UserError(f"unknown init '{init}'; valid: pretrained, scratch")


def finetune_task(cfg: DictConfig, task: str, run: Path, device: torch.device,
                  pretrained: DiffusionPolicy) -> dict[str, Any]:
    """Fine-tune one task from ``pretrained`` (not modified; the KL regulariser's
    reference); returns its summary (pre-trained and fine-tuned success)."""
    from tqdm import tqdm

    from sodp3d.envs import make_vector_env
    from sodp3d.evaluate import check_policy_fits, evaluate_task
    from sodp3d.pretrain import RunLogger

    policy = _initial_policy(cfg, pretrained, device)
    check_policy_fits(policy, task, cfg.env)
    algo = cfg.algo
    ft = FineTuner(policy, algo, device, int(cfg.seed), reference=pretrained)
    ckpt = run / "checkpoints" / "latest.ckpt"
    state: dict[str, Any] = {"env_steps": 0, "history": [], "evals": [], "pretrained_eval": None}
    if ckpt.exists():
        if not cfg.resume:
            raise UserError(f"{run} already holds a fine-tuning run; pass resume=true to continue it, or another out")
        payload = load_checkpoint(ckpt, map_location=device)
        ft.load(payload)
        state = payload["finetune_state"]
    etas = eval_etas(cfg)
    # One DDIM sampler per evaluation eta; eta = 1 is the sampler fine-tuning optimises.
    samplers = [policy.ddim(e, float(algo.min_std)) for e in etas]

    def rate_of(tag: str, eta: float) -> float | None:
        return next((e["success_rate"] for e in state["evals"] if e["tag"] == tag and e.get("eta", 0.0) == eta), None)

    def summary(final: float | None) -> dict[str, Any]:
        return {"task": task, "reg": ft.reg_name, "init": str(cfg.init), "env_steps": state["env_steps"],
                "pretrained_success": state["pretrained_eval"], "finetuned_success": final,
                "by_eta": [{"eta": e, "pretrained_success": rate_of("initial", e), "finetuned_success": rate_of("final", e)}
                           for e in etas],
                "updates": ft.updates, "history": state["history"], "evals": state["evals"]}

    done = rate_of("final", etas[0])
    if done is not None and state["env_steps"] >= int(cfg.env_steps):
        return summary(done)  # a finished run: nothing to do
    run.mkdir(parents=True, exist_ok=True)
    logger = RunLogger(run, cfg, f"{run.parent.name}-{task}")
    E = int(cfg.num_envs)
    vec = make_vector_env(task, E, cfg.env, asynchronous=E > 1, n_obs_steps=policy.config.n_obs_steps,
                          n_action_steps=policy.config.n_action_steps)
    budget = int(cfg.env_steps)
    seed_base = int(cfg.seed) * 1_000_003

    def save() -> None:
        save_checkpoint(ckpt, {"policy_config": policy.config.to_dict(), "task": task,
                               "train_config": OmegaConf.to_container(cfg, resolve=True),
                               "finetune_state": state, **ft.state()})

    def run_eval(tag: str) -> float:
        """``sodp3d eval``'s protocol on the fine-tuner's own environments, at each eval
        eta; returns the success rate at the first (the headline metric)."""
        rates = []
        for eta, sampler in zip(etas, samplers):
            gen = torch.Generator(device=device).manual_seed(int(cfg.seed))
            r = evaluate_task(ft.policy, task, int(cfg.eval.episodes), int(cfg.seed), E, generator=gen, vec=vec,
                              sampler=sampler)
            rate, ret = float(np.mean(r["success"])), float(np.mean(r["return"]))
            state["evals"].append({"tag": tag, "eta": eta, "env_steps": state["env_steps"], "success_rate": rate,
                                   "mean_return": ret})
            suffix = "" if eta == etas[0] else f"_eta{eta:g}"
            logger.log({f"eval/success_rate{suffix}": rate, f"eval/mean_return{suffix}": ret}, state["env_steps"])
            rates.append(rate)
        return rates[0]

    bar = tqdm(total=budget, initial=min(state["env_steps"], budget), desc=f"finetune {task} ({ft.reg_name})",
               unit="step", dynamic_ncols=True)
    try:
        if state["pretrained_eval"] is None:
            if int(cfg.eval.episodes) > 0:
                state["pretrained_eval"] = run_eval("initial")
            # N_init rollouts of the initial model fill the target buffer (eq. 13).
            n_init = int(algo.n_init)
            filled = 0
            while filled < n_init:
                seeds = [seed_base + 10_000_000 + filled + j for j in range(E)]
                ro = collect(ft.policy, vec, ft.sampler, seeds, ft.torch_gen)
                ft.buffer.add(ro.trajectories[: n_init - filled])
                filled += min(E, n_init - filled)
            save()
        last_eval = state["evals"][-1]["env_steps"] if state["evals"] else 0
        while state["env_steps"] < budget:
            seeds = [seed_base + ft.updates * E + j for j in range(E)]
            ro = collect(ft.policy, vec, ft.sampler, seeds, ft.torch_gen)
            ft.buffer.add(ro.trajectories)
            t_upd = time.perf_counter()
            try:
                stats = ft.update(ro)
            except FloatingPointError as e:
                raise UserError(f"fine-tuning stopped: {e}; the last good checkpoint is {ckpt}") from None
            upd_s = time.perf_counter() - t_upd
            state["env_steps"] += ro.env_steps
            entry = {
                "update": ft.updates, "env_steps": state["env_steps"],
                "success_rate": float(np.mean([t.success for t in ro.trajectories])),
                "mean_chunk_reward": float(ro.reward.mean()),
                "mean_return": float(np.mean([t.ret for t in ro.trajectories])),
                "target_buffer": len(ft.buffer), "env_steps_per_s": ro.env_steps / max(ro.seconds, 1e-9),
                "steps_per_s_with_update": ro.env_steps / max(ro.seconds + upd_s, 1e-9), **stats,
            }
            state["history"].append(entry)
            logger.log(entry, state["env_steps"])
            bar.update(min(ro.env_steps, budget - bar.n))
            bar.set_postfix(success=f"{entry['success_rate']:.2f}", kl=f"{entry['approx_kl']:.1e}",
                            clip=f"{entry['clip_fraction']:.2f}")
            every = int(cfg.eval.every_env_steps)
            if int(cfg.eval.episodes) > 0 and every > 0 and state["env_steps"] - last_eval >= every:
                run_eval("periodic")
                last_eval = state["env_steps"]
            save()
        final = run_eval("final") if int(cfg.eval.episodes) > 0 else None
        save()
    finally:
        bar.close()
        vec.close()
        logger.close()
    return summary(final)


def eval_etas(cfg: DictConfig) -> list[float]:
    """The DDIM etas fine-tuning evaluates with (``eval.etas``); the first is the headline."""
    etas = cfg.eval.get("etas", [0.0])
    etas = [etas] if isinstance(etas, (int, float)) else list(etas)
    if not etas or any(not isinstance(e, (int, float)) or not 0 <= e <= 1 for e in etas):
        raise UserError(f"eval.etas must list DDIM etas in [0, 1] (0: deterministic, 1: as fine-tuning samples), got {etas}")
    return [float(e) for e in etas]


def finetune(cfg: DictConfig) -> dict[str, Any]:
    from sodp3d.envs import resolve_tasks
    from sodp3d.pretrain import resolve_device

    if cfg.get("ckpt") in (None, "???"):
        raise UserError("no checkpoint; pass ckpt=<pre-trained checkpoint or run dir>")
    if cfg.get("out") in (None, "???"):
        raise UserError("no run directory; pass out=<run dir>")
    tasks = resolve_tasks(cfg.task if cfg.get("task") != "???" else None)
    for key in ("env_steps", "num_envs"):
        if not isinstance(cfg[key], int) or cfg[key] <= 0:
            raise UserError(f"{key} must be a positive integer, got {cfg[key]!r}")
    if str(cfg.algo.reg) not in REGULARISERS:
        raise UserError(f"unknown regulariser reg={cfg.algo.reg}; valid: {', '.join(REGULARISERS)}")
    etas = eval_etas(cfg)
    device = resolve_device(str(cfg.device))
    from omegaconf import open_dict

    from sodp3d.checkpoint import acting_env_config, checkpoint_path, policy_from_payload

    # One read of the pre-trained checkpoint: its policy, and the observation settings it
    # was trained with (plus the user's changes) to act with.
    payload = load_checkpoint(checkpoint_path(cfg.ckpt))
    pretrained = policy_from_payload(payload, device, use_ema=True, source=str(checkpoint_path(cfg.ckpt)))
    with open_dict(cfg):
        cfg.env = acting_env_config(cfg.env, payload)
    del payload
    out = Path(str(cfg.out))
    summaries = []
    for task in tasks:
        run = out / task if len(tasks) > 1 else out
        summaries.append(finetune_task(cfg, task, run, device, pretrained))
    results = results_record(cfg, summaries, pretrained.config, etas)
    table = results_table(results)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "results.md", table + "\n")
    write_text_atomic(out / "results.json", json.dumps(results, indent=2))
    return {"out": str(out), "table": table, "summaries": summaries, "results": results}


def results_record(cfg: DictConfig, summaries: list[dict[str, Any]], pc: PolicyConfig,
                   etas: list[float]) -> dict[str, Any]:
    """What ``sodp3d report`` reads: the run's variant (seed, regulariser, init, encoder,
    U-Net) and per task the success before and after fine-tuning at each evaluation eta,
    with the learning curve."""
    return {
        "kind": "finetune",
        "metric": METRIC.format(episodes=int(cfg.eval.episodes), eta=etas[0]),
        "eval_etas": etas,
        "eval_episodes": int(cfg.eval.episodes),
        "seed": int(cfg.seed), "reg": str(cfg.algo.reg), "init": str(cfg.init),
        "encoder": pc.encoder, "unet": pc.unet, "ckpt": str(cfg.ckpt),
        "env_steps": int(cfg.env_steps),
        "tasks": summaries,
    }


METRIC = "final evaluation, success rate over {episodes} episodes (DDIM eta = {eta:g}), before and after fine-tuning"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def results_table(results: dict[str, Any], run_columns: bool = True) -> str:
    """Markdown of a results record: per task (and, with ``run_columns``, its regulariser,
    init and budget) the success before and after fine-tuning and the change, at each
    evaluation eta, then the average over the tasks."""
    rows = results["tasks"]
    etas = [b["eta"] for b in rows[0]["by_eta"]] if rows else list(results.get("eval_etas", [0.0]))
    lines = [f"Metric: {results['metric']}."]
    if len(etas) > 1:
        lines[0] += (" The eta = 1 columns sample as fine-tuning does (every denoising step a Gaussian): "
                     "the policy PPO optimises.")
    head, rule = ("| task | reg | init | env steps |", "|---|---|---|---:|") if run_columns else ("| task |", "|---|")
    for e in etas:
        tag = "" if len(etas) == 1 else f" (eta = {e:g})"
        head += f" pre-trained{tag} | fine-tuned{tag} | change |"
        rule += "---:|---:|---:|"
    lines += ["", head, rule]

    def cells(pairs: list[tuple[float | None, float | None]], bold: bool = False) -> str:
        out = ""
        for a, b in pairs:
            change = "-" if a is None or b is None else f"{100 * (b - a):+.0f}"
            out += "".join(f" **{v}** |" if bold else f" {v} |" for v in (_pct(a), _pct(b), change))
        return out

    for r in rows:
        run = f" {r['reg']} | {r['init']} | {r['env_steps']} |" if run_columns else ""
        lines.append(f"| {r['task']} |{run}" + cells([(b["pretrained_success"], b["finetuned_success"])
                                                       for b in r["by_eta"]]))
    if rows:
        avg = []
        for i in range(len(etas)):
            pairs = [(r["by_eta"][i]["pretrained_success"], r["by_eta"][i]["finetuned_success"]) for r in rows]
            done = all(a is not None and b is not None for a, b in pairs)
            avg.append((sum(a for a, _ in pairs) / len(pairs), sum(b for _, b in pairs) / len(pairs))
                       if done else (None, None))
        blank = " | | |" if run_columns else ""
        lines.append(f"| **average** |{blank}" + cells(avg, bold=True))
    return "\n".join(lines)
