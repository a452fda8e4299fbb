"""Noise schedules, the denoising loss and the DDIM sampler with per-step log-probabilities.

Shape legend:
    B   batch
    T   horizon (Tp, the predicted action steps)
    Da  action dim
    G   global-condition dim (read by the model, never here)
    K   diffusion training steps (timesteps k in [0, K))
    S   sampling (DDIM) steps

A ``model_fn`` is any callable ``model_fn(x (B, T, Da), k (B,) long) -> (B, T, Da)``
returning the schedule's prediction (noise for "epsilon", the clean sample for
"sample"); the caller closes over the observation features, e.g.
``lambda x, k: unet(x, k, global_cond)``.

Numerics (see REFERENCE.md section 3, DPPO):
    * fp32 throughout; the schedule's tables are float32 CPU tensors moved to the
      input's device on use.
    * A DDIM step from t to t_prev is a Gaussian N(mean, std^2) with
      sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev),
      mean  = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat,
      std   = max(sigma, min_std) when eta > 0; std = 0 (deterministic) when eta = 0.
      After the last step t_prev = -1 with abar_{-1} = 1, so that step's sigma is 0 and
      its std is min_std: log-probs of a full chain need min_std > 0 (DPPO uses 0.1).
    * x0_hat is clamped to [-clip_sample, clip_sample] and eps_hat recomputed from it;
      the sampling noise z is clamped to [-noise_clamp, noise_clamp].
    * Log-probs are averaged (not summed) over the T * Da action entries.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from sodp3d.errors import UserError

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

PREDICTION_TYPES = ("epsilon", "sample")
BETA_SCHEDULES = ("cosine", "linear")

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


# ----------------------------------------------------------------------------- betas

def cosine_betas(K: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Improved-DDPM cosine betas (diffusers "squaredcos_cap_v2"): (K,) float32.

    alpha_bar(t) = cos(((t + s) / (1 + s)) * pi / 2) ** 2 for t in [0, 1];
    beta_k = min(1 - alpha_bar((k + 1) / K) / alpha_bar(k / K), max_beta), k = 0 .. K-1.
    """
    _check_steps(K)

    def alpha_bar(t: float) -> float:
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((k + 1) / K) / alpha_bar(k / K), max_beta) for k in range(K)]
    return torch.tensor(betas, dtype=torch.float64).to(torch.float32)


def linear_betas(K: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM linear betas (diffusers "linear"): linspace(beta_start, beta_end, K), (K,) float32."""
    _check_steps(K)
    return torch.linspace(beta_start, beta_end, K, dtype=torch.float64).to(torch.float32)


def _check_steps(K: int) -> None:
    if int(K) != K or K < 1:
        raise UserError(f"num_train_steps={K} is invalid; use a positive integer (100 in SODP)")


# ----------------------------------------------------------------------------- schedule

class NoiseSchedule:
    """The forward (noising) process and the denoising loss.

    Attributes: betas, alphas, alphas_cumprod, each (K,) float32 on the CPU.
    ``prediction_type``: "epsilon" (SODP eq. 7, regress the noise) or "sample" (DP3,
    regress the clean action sequence x0).
    """

    def __init__(self, num_train_steps: int = 100, beta_schedule: str = "cosine",
                 prediction_type: str = "epsilon"):
        _check_steps(num_train_steps)
        if beta_schedule not in BETA_SCHEDULES:
            raise UserError(f"unknown beta_schedule '{beta_schedule}'; valid: {', '.join(BETA_SCHEDULES)}")
        if prediction_type not in PREDICTION_TYPES:
            raise UserError(f"unknown prediction_type '{prediction_type}'; valid: {', '.join(PREDICTION_TYPES)}")
        self.num_train_steps = int(num_train_steps)
        self.beta_schedule = beta_schedule
        self.prediction_type = prediction_type
        betas = (cosine_betas if beta_schedule == "cosine" else linear_betas)(self.num_train_steps)
        self.betas = betas
        self.alphas = (1.0 - betas.double()).float()
        self.alphas_cumprod = torch.cumprod(1.0 - betas.double(), dim=0).float()
        self._cache: dict[torch.device, torch.Tensor] = {}

    def config(self) -> dict:
        """The constructor arguments (for checkpoints)."""
        return {"num_train_steps": self.num_train_steps, "beta_schedule": self.beta_schedule,
                "prediction_type": self.prediction_type}

    def __repr__(self) -> str:
        return (f"NoiseSchedule(num_train_steps={self.num_train_steps}, beta_schedule='{self.beta_schedule}', "
                f"prediction_type='{self.prediction_type}')")

    def abar_table(self, device: torch.device | str) -> torch.Tensor:
        """(K + 1,) float32 on ``device``: [1, abar_0, ..., abar_{K-1}], so entry k + 1 is
        abar_k and entry 0 is abar_{-1} = 1 (the end of the reverse chain)."""
        device = torch.device(device)
        table = self._cache.get(device)
        if table is None:
            table = torch.cat([torch.ones(1), self.alphas_cumprod]).to(device)
            self._cache[device] = table
        return table

    def abar(self, k: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """abar_k shaped to broadcast against ``like``: k (B,) long or int, k = -1 gives 1.
        Returns (B, 1, ..., 1) (or a 0-d tensor for an int k)."""
        table = self.abar_table(like.device)
        k = torch.as_tensor(k, device=like.device, dtype=torch.long)
        a = table[k + 1]
        return a.reshape(a.shape + (1,) * (like.ndim - a.ndim)) if a.ndim else a

    def random_timesteps(self, batch: int, device: torch.device | str = "cpu",
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """Training timesteps k ~ U{0, ..., K-1}: (B,) long."""
        return torch.randint(0, self.num_train_steps, (batch,), device=device, generator=generator)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
        """x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) noise. x0, noise: (B, T, Da); k: (B,) long."""
        a = self.abar(k, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network regresses: the noise ("epsilon") or x0 ("sample"). (B, T, Da)."""
        return noise if self.prediction_type == "epsilon" else x0

    def loss(self, model_out: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
             reduction: str = "mean") -> torch.Tensor:
        """MSE between the model output and the target. All (B, T, Da).
        reduction "mean" -> scalar; "none" -> (B,) per-sample means (for weighting or masks)."""
        err = F.mse_loss(model_out, self.target(x0, noise), reduction="none")
        if reduction == "mean":
            return err.mean()
        if reduction == "none":
            return err.reshape(err.shape[0], -1).mean(dim=1)
        raise UserError(f"unknown reduction '{reduction}'; valid: mean, none")

    def to_x0_eps(self, model_out: torch.Tensor, x_k: torch.Tensor,
                  k: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat), each (B, T, Da), from a model output at x_k, k (B,) long."""
        a = self.abar(k, x_k)
        if self.prediction_type == "epsilon":
            eps = model_out
            x0 = (x_k - (1 - a).sqrt() * eps) / a.sqrt()
        else:
            x0 = model_out
            eps = (x_k - a.sqrt() * x0) / (1 - a).sqrt()
        return x0, eps


# ----------------------------------------------------------------------------- DDIM

def ddim_timesteps(K: int, S: int) -> list[int]:
    """DDIM "leading" timesteps, descending: step = K // S, [(S-1) step, ..., step, 0].
    K=100, S=10 -> [90, 80, ..., 10, 0]."""
    _check_steps(K)
    if int(S) != S or not 1 <= S <= K:
        raise UserError(f"num_steps={S} DDIM steps is invalid for K={K} training steps; use 1 <= S <= {K}")
    step = K // S
    return [i * step for i in range(S - 1, -1, -1)]


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x | mean, std^2) averaged over all but the batch dim: x, mean, std (B, T, Da)
    (std may broadcast) -> (B,)."""
    lp = -0.5 * ((x - mean) / std) ** 2 - torch.log(std) - _LOG_SQRT_2PI
    return lp.reshape(lp.shape[0], -1).mean(dim=1)


class DDIMSampler:
    """DDIM over a NoiseSchedule, stochastic when eta > 0, with log-probs of every step.

    timesteps: [t_0 > t_1 > ... > t_{S-1} = 0]; step i goes from t_i to prev_timesteps[i]
    (= t_{i+1}, or -1 after the last one). eta = 1 for fine-tuning (each step is a
    Gaussian), eta = 0 for evaluation (deterministic).
    """

    def __init__(self, schedule: NoiseSchedule, num_steps: int = 10, eta: float = 0.0,
                 min_std: float = 0.0, clip_sample: float | None = 1.0, noise_clamp: float | None = 3.0):
        self.schedule = schedule
        self.timesteps: list[int] = ddim_timesteps(schedule.num_train_steps, num_steps)
        self.prev_timesteps: list[int] = self.timesteps[1:] + [-1]
        self.num_steps = int(num_steps)
        self.eta = _check_eta(eta)
        if not min_std >= 0:
            raise UserError(f"min_std={min_std} is invalid; use a value >= 0 (DPPO uses 0.1)")
        if clip_sample is not None and not clip_sample > 0:
            raise UserError(f"clip_sample={clip_sample} is invalid; use a positive bound (1.0) or null for no clipping")
        if noise_clamp is not None and not noise_clamp > 0:
            raise UserError(f"noise_clamp={noise_clamp} is invalid; use a positive bound (3.0) or null for no clamping")
        self.min_std = float(min_std)
        self.clip_sample = None if clip_sample is None else float(clip_sample)
        self.noise_clamp = None if noise_clamp is None else float(noise_clamp)
        self._t_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return (f"DDIMSampler(num_steps={self.num_steps}, eta={self.eta}, min_std={self.min_std}, "
                f"clip_sample={self.clip_sample}, noise_clamp={self.noise_clamp}, schedule={self.schedule})")

    # -- one step

    def step_distribution(self, model_fn: ModelFn, x_t: torch.Tensor, t: torch.Tensor | int,
                          t_prev: torch.Tensor | int, eta: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The Gaussian of one reverse step from t to t_prev (t_prev = -1 after the last step).

        x_t: (B, T, Da); t, t_prev: ints or (B,) long tensors (mixed steps in one batch).
        Returns (mean, std), both (B, T, Da) (std is an expanded view); std is 0 when eta = 0.
        Gradients flow from mean into model_fn's parameters.
        """
        eta = self.eta if eta is None else _check_eta(eta)
        B = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.long)
        k = t.expand(B) if t.ndim == 0 else t
        abar_t = self.schedule.abar(k, x_t)  # (B, 1, 1)
        abar_prev = self.schedule.abar(torch.as_tensor(t_prev, device=x_t.device, dtype=torch.long).expand(B), x_t)

        x0, eps = self.schedule.to_x0_eps(model_fn(x_t, k), x_t, k)
        if self.clip_sample is not None:
            x0 = x0.clamp(-self.clip_sample, self.clip_sample)
            eps = (x_t - abar_t.sqrt() * x0) / (1 - abar_t).sqrt()

        sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).clamp(min=0).sqrt()
        mean = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        std = sigma.clamp(min=self.min_std) if eta > 0 else torch.zeros_like(sigma)
        return mean, std.expand_as(mean)

    def _draw(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """mean + std * clamp(z, -noise_clamp, noise_clamp); no noise drawn when std is 0 (eta = 0)."""
        z = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        if self.noise_clamp is not None:
            z = z.clamp(-self.noise_clamp, self.noise_clamp)
        return mean + std * z

    # -- sampling

    def sample(self, model_fn: ModelFn, shape: Sequence[int], generator: torch.Generator | None = None,
               return_chain: bool = False, eta: float | None = None, x_init: torch.Tensor | None = None,
               return_log_prob: bool = False, device: torch.device | str | None = None):
        """Run the S reverse steps from x_T ~ N(0, I) (or ``x_init``) to x0.

        shape: (B, T, Da). generator: optional torch.Generator on the target device (for
        the initial noise and the per-step noise). device: where to sample when there is
        no x_init (defaults to the generator's device, else CPU).
        Returns x0 (B, T, Da); with return_chain / return_log_prob a tuple
        (x0, [chain (B, S+1, T, Da) = [x_T, x after step 1, ..., x0]], [log_prob (B, S)]),
        log_prob being the per-step log-density of each sampled step (as :meth:`log_prob`).
        Gradients are tracked unless the caller uses torch.no_grad() (do so when collecting).
        """
        eta = self.eta if eta is None else _check_eta(eta)
        shape = tuple(int(n) for n in shape)
        if x_init is not None:
            if tuple(x_init.shape) != shape:
                raise UserError(f"x_init has shape {tuple(x_init.shape)}; expected {shape}")
            x = x_init.to(torch.float32)
        else:
            if device is None:
                device = generator.device if generator is not None else "cpu"
            x = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        if return_log_prob:
            self._check_density(eta)
        chain, log_probs = [x], []
        for t, t_prev in zip(self.timesteps, self.prev_timesteps):
            mean, std = self.step_distribution(model_fn, x, t, t_prev, eta=eta)
            x = self._draw(mean, std, generator) if eta > 0 else mean
            if return_log_prob:
                self._check_positive(std)
                log_probs.append(gaussian_log_prob(x, mean, std))
            if return_chain:
                chain.append(x)
        out = [x]
        if return_chain:
            out.append(torch.stack(chain, dim=1))
        if return_log_prob:
            out.append(torch.stack(log_probs, dim=1))
        return out[0] if len(out) == 1 else tuple(out)

    # -- log-probabilities

    def log_prob(self, model_fn: ModelFn, chain: torch.Tensor, eta: float | None = None) -> torch.Tensor:
        """Per-step log-probs of a stored chain: (B, S+1, T, Da) -> (B, S).

        Entry i is log N(chain[:, i+1] | mean_i(chain[:, i]), std_i^2) with the floored std,
        averaged over the T * Da action entries. Gradients flow into model_fn.
        """
        eta = self.eta if eta is None else _check_eta(eta)
        self._check_density(eta)
        S = self.num_steps
        if chain.ndim != 4 or chain.shape[1] != S + 1:
            raise UserError(f"denoising chain has shape {tuple(chain.shape)}; expected (B, {S + 1}, T, Da) "
                            f"for {S} DDIM steps")
        out = []
        for i, (t, t_prev) in enumerate(zip(self.timesteps, self.prev_timesteps)):
            mean, std = self.step_distribution(model_fn, chain[:, i], t, t_prev, eta=eta)
            self._check_positive(std)
            out.append(gaussian_log_prob(chain[:, i + 1], mean, std))
        return torch.stack(out, dim=1)

    def log_prob_of_step(self, model_fn: ModelFn, x_t: torch.Tensor, x_next: torch.Tensor,
                         step: torch.Tensor | int, eta: float | None = None) -> torch.Tensor:
        """Log-prob of individual transitions x_t -> x_next: (B,).

        x_t, x_next: (B, T, Da) = chain[:, i], chain[:, i+1]; step: the step index i in
        [0, S) as an int or a (B,) long tensor (minibatches may mix denoising steps).
        """
        eta = self.eta if eta is None else _check_eta(eta)
        self._check_density(eta)
        t_table, tprev_table = self._step_tables(x_t.device)
        step = torch.as_tensor(step, device=x_t.device, dtype=torch.long)
        mean, std = self.step_distribution(model_fn, x_t, t_table[step], tprev_table[step], eta=eta)
        self._check_positive(std)
        return gaussian_log_prob(x_next, mean, std)

    def _step_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        tables = self._t_tables.get(device)
        if tables is None:
            tables = (torch.tensor(self.timesteps, dtype=torch.long, device=device),
                      torch.tensor(self.prev_timesteps, dtype=torch.long, device=device))
            self._t_tables[device] = tables
        return tables

    @staticmethod
    def _check_density(eta: float) -> None:
        if eta <= 0:
            raise UserError("log-probs need a stochastic sampler but eta=0 makes every DDIM step deterministic; "
                            "use eta > 0 (1.0 for fine-tuning)")

    def _check_positive(self, std: torch.Tensor) -> None:
        if self.min_std <= 0 and bool((std <= 0).any()):
            raise UserError("a DDIM step has std 0 (the last step always does: abar_prev = 1), so it has no "
                            "density; set min_std > 0 (DPPO uses 0.1) to compute log-probs")


def _check_eta(eta: float) -> float:
    if not eta >= 0:
        raise UserError(f"eta={eta} is invalid; use a value >= 0 (0 deterministic DDIM, 1 DDPM-like)")
    return float(eta)
