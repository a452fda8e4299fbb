"""Noise schedules, the denoising loss, DDIM sampling and per-step log-probabilities."""

import math

import pytest
import torch

from sodp3d.diffusion import (DDIMSampler, NoiseSchedule, cosine_betas, ddim_timesteps, gaussian_log_prob,
                              linear_betas)
from sodp3d.errors import UserError

B, T, Da = 4, 8, 3




def _f(t, s=0.008):
    return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2


# ----------------------------------------------------------------------------- schedules

def test_cosine_betas_match_closed_form():
    K = 100
    betas = cosine_betas(K)
    assert betas.dtype == torch.float32 and betas.shape == (K,)
    expected = torch.tensor([min(1 - _f((k + 1) / K) / _f(k / K), 0.999) for k in range(K)])
    torch.testing.assert_close(betas, expected, rtol=1e-5, atol=1e-7)
    assert betas.max().item() == pytest.approx(0.999)  # the last beta (alpha_bar(1) = 0) is capped
    assert betas[-2].item() < 0.999


def test_cosine_alphas_cumprod_telescopes_and_decreases():
    K = 100
    sched = NoiseSchedule(K, "cosine")
    abar = sched.alphas_cumprod
    assert abar.dtype == torch.float32 and abar.device.type == "cpu"
    # the ratio construction telescopes: abar_k = alpha_bar((k+1)/K) / alpha_bar(0) until the cap
    closed = torch.tensor([_f((k + 1) / K) / _f(0) for k in range(K - 1)])
    torch.testing.assert_close(abar[:-1], closed, rtol=1e-4, atol=1e-6)
    assert (abar[1:] < abar[:-1]).all()
    assert abar[0] > 0.999 and abar[-1] < 1e-5
    torch.testing.assert_close(sched.alphas, 1 - sched.betas)
    torch.testing.assert_close(abar, torch.cumprod(sched.alphas.double(), 0).float())


def test_linear_betas():
    K = 50
    betas = linear_betas(K)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    torch.testing.assert_close(betas[1:] - betas[:-1], torch.full((K - 1,), (0.02 - 1e-4) / (K - 1)))
    sched = NoiseSchedule(K, "linear")
    torch.testing.assert_close(sched.alphas_cumprod[10], torch.prod(1 - betas[:11].double()).float())
    assert (sched.alphas_cumprod[1:] < sched.alphas_cumprod[:-1]).all()


@pytest.mark.parametrize("kwargs", [{"beta_schedule": "quadratic"}, {"prediction_type": "v_prediction"},
                                    {"num_train_steps": 0}])
def test_schedule_rejects_bad_settings(kwargs):
    with pytest.raises(UserError, match="valid|positive"):
        NoiseSchedule(**kwargs)


# ----------------------------------------------------------------------------- forward process and loss

def test_add_noise_formula():
    sched = NoiseSchedule(100)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(B, T, Da, generator=g), torch.randn(B, T, Da, generator=g)
    k = torch.tensor([0, 17, 50, 99])
    xk = sched.add_noise(x0, noise, k)
    for b in range(B):
        a = sched.alphas_cumprod[k[b]]
        torch.testing.assert_close(xk[b], a.sqrt() * x0[b] + (1 - a).sqrt() * noise[b])
    # int k broadcasts
    torch.testing.assert_close(sched.add_noise(x0, noise, 17)[1], xk[1])


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_target_and_loss(prediction_type):
    sched = NoiseSchedule(100, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(1)
    x0, noise, out = (torch.randn(B, T, Da, generator=g) for _ in range(3))
    target = noise if prediction_type == "epsilon" else x0
    assert sched.target(x0, noise) is target
    loss = sched.loss(out, x0, noise)
    assert loss.ndim == 0
    torch.testing.assert_close(loss, ((out - target) ** 2).mean())
    torch.testing.assert_close(sched.loss(out, x0, noise, reduction="none"), ((out - target) ** 2).mean(dim=(1, 2)))
    assert sched.loss(target, x0, noise).item() == 0.0


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_to_x0_eps_inverts_add_noise(prediction_type):
    sched = NoiseSchedule(100, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(B, T, Da, generator=g), torch.randn(B, T, Da, generator=g)
    k = torch.tensor([0, 30, 60, 90])
    xk = sched.add_noise(x0, noise, k)
    x0_hat, eps_hat = sched.to_x0_eps(sched.target(x0, noise), xk, k)
    torch.testing.assert_close(x0_hat, x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(eps_hat, noise, atol=2e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- DDIM

def test_ddim_timesteps():
    assert ddim_timesteps(100, 10) == [90, 80, 70, 60, 50, 40, 30, 20, 10, 0]
    assert ddim_timesteps(100, 3) == [66, 33, 0]
    assert ddim_timesteps(5, 5) == [4, 3, 2, 1, 0]
    assert ddim_timesteps(100, 1) == [0]
    for bad in (0, 101):
        with pytest.raises(UserError, match="1 <= S <= 100"):
            ddim_timesteps(100, bad)


@pytest.mark.parametrize("kwargs", [{"num_steps": 200}, {"eta": -1.0}, {"min_std": -0.1}, {"clip_sample": 0.0},
                                    {"noise_clamp": -3.0}])
def test_sampler_rejects_bad_settings(kwargs):
    with pytest.raises(UserError):
        DDIMSampler(NoiseSchedule(100), **kwargs)


def _linear_model(seed=0, scale=0.3):
    """A random model_fn that depends on x and k, with parameters for gradient checks."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(Da, Da)
    with torch.no_grad():
        lin.weight.mul_(scale)

    def model_fn(x, k):
        assert k.shape == (x.shape[0],) and k.dtype == torch.long
        return lin(x) + 0.01 * k.float()[:, None, None]
    return lin, model_fn


def _oracle(sched, x_star):
    """The exact predictor for a data distribution that is a single point x_star."""
    def model_fn(x, k):
        a = sched.alphas_cumprod[k][:, None, None]
        if sched.prediction_type == "sample":
            return x_star.expand_as(x)
        return (x - a.sqrt() * x_star) / (1 - a).sqrt()
    return model_fn


def test_ddim_eta0_is_deterministic():
    sched = NoiseSchedule(100)
    _, model_fn = _linear_model()
    sampler = DDIMSampler(sched, 10, eta=0.0, min_std=0.5)
    x_init = torch.randn(B, T, Da, generator=torch.Generator().manual_seed(3))
    a = sampler.sample(model_fn, (B, T, Da), generator=torch.Generator().manual_seed(10), x_init=x_init)
    b = sampler.sample(model_fn, (B, T, Da), generator=torch.Generator().manual_seed(11), x_init=x_init)
    assert torch.equal(a, b)
    # the same sampler with eta = 1 is not
    c = sampler.sample(model_fn, (B, T, Da), generator=torch.Generator().manual_seed(10), x_init=x_init, eta=1.0)
    d = sampler.sample(model_fn, (B, T, Da), generator=torch.Generator().manual_seed(11), x_init=x_init, eta=1.0)
    assert not torch.allclose(c, d)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_with_oracle_lands_on_the_data_point(prediction_type, eta):
    sched = NoiseSchedule(100, prediction_type=prediction_type)
    x_star = torch.randn(1, T, Da, generator=torch.Generator().manual_seed(4)) * 1.5  # outside [-1, 1] too
    sampler = DDIMSampler(sched, 10, eta=eta, clip_sample=None)
    g = torch.Generator().manual_seed(5)
    x_init = 3 * torch.randn(B, T, Da, generator=g)
    x0, chain = sampler.sample(_oracle(sched, x_star), (B, T, Da), generator=g, x_init=x_init, return_chain=True)
    torch.testing.assert_close(x0, x_star.expand(B, T, Da), atol=1e-4, rtol=0)
    assert chain.shape == (B, 11, T, Da)
    assert torch.equal(chain[:, 0], x_init) and torch.equal(chain[:, -1], x0)
    assert not torch.allclose(chain[:, -2], x_star.expand(B, T, Da), atol=1e-3)  # not there before the end


def _reference_step(sched, model_fn, x, t, t_prev, eta, min_std, clip=None):
    """DDIM step in float64 written from the formulas (epsilon prediction)."""
    a_t = sched.alphas_cumprod[t].double().item()
    a_p = 1.0 if t_prev < 0 else sched.alphas_cumprod[t_prev].double().item()
    eps = model_fn(x, torch.full((x.shape[0],), t, dtype=torch.long)).double()
    x0 = (x.double() - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
        eps = (x.double() - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
    sigma = eta * math.sqrt((1 - a_p) / (1 - a_t)) * math.sqrt(1 - a_t / a_p)
    mean = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - sigma ** 2) * eps
    return mean, max(sigma, min_std)


def test_eta1_log_prob_matches_independent_gaussian_density():
    sched = NoiseSchedule(100)
    lin, model_fn = _linear_model(seed=6)
    sampler = DDIMSampler(sched, 10, eta=1.0, min_std=0.05, clip_sample=None)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        x0, chain, lp = sampler.sample(model_fn, (B, T, Da), generator=g, return_chain=True, return_log_prob=True)
    assert lp.shape == (B, 10) and torch.isfinite(lp).all()
    for i, (t, t_prev) in enumerate(zip(sampler.timesteps, sampler.prev_timesteps)):
        with torch.no_grad():
            mean, std = _reference_step(sched, model_fn, chain[:, i], t, t_prev, 1.0, 0.05)
        ref = torch.distributions.Normal(mean, std).log_prob(chain[:, i + 1].double()).mean(dim=(1, 2))
        torch.testing.assert_close(lp[:, i].double(), ref, rtol=1e-4, atol=1e-4)
    # the last step: sigma = 0 (abar_prev = 1) so its std is the floor
    _, std_last = sampler.step_distribution(model_fn, chain[:, -2], 0, -1)
    assert torch.all(std_last == 0.05)
    # the mid steps are truly stochastic: sigma well above the floor
    _, std_first = sampler.step_distribution(model_fn, chain[:, 0], 90, 80)
    assert std_first.min() > 0.2

    # a stored chain reproduces the sampler's per-step values, with gradients
    lp_again = sampler.log_prob(model_fn, chain)
    torch.testing.assert_close(lp_again, lp, rtol=1e-5, atol=1e-5)
    # and so do single transitions with mixed step indices
    steps = torch.tensor([0, 3, 9, 5])
    lp_steps = sampler.log_prob_of_step(model_fn, chain[torch.arange(B), steps], chain[torch.arange(B), steps + 1], steps)
    torch.testing.assert_close(lp_steps, lp[torch.arange(B), steps], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sampler.log_prob_of_step(model_fn, chain[:, 4], chain[:, 5], 4), lp[:, 4],
                               rtol=1e-5, atol=1e-5)


def test_clip_sample_clamps_x0_and_keeps_eps_consistent():
    sched = NoiseSchedule(100)
    _, lin_fn = _linear_model(seed=13)
    model_fn = lambda x, k: 4.0 * lin_fn(x, k)  # noqa: E731  (x0_hat far outside [-1, 1])
    x = 2.0 * torch.randn(B, T, Da, generator=torch.Generator().manual_seed(14))
    sampler = DDIMSampler(sched, 10, eta=1.0, min_std=0.1, clip_sample=1.0)
    for t, t_prev in [(90, 80), (40, 30), (0, -1)]:
        mean, std = sampler.step_distribution(model_fn, x, t, t_prev)
        ref_mean, ref_std = _reference_step(sched, model_fn, x, t, t_prev, 1.0, 0.1, clip=1.0)
        torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(std, torch.full_like(std, ref_std))
    assert mean.abs().max() <= 1.0  # the last step returns the clamped x0_hat
    unclipped, _ = DDIMSampler(sched, 10, eta=1.0, clip_sample=None).step_distribution(model_fn, x, 0, -1)
    assert unclipped.abs().max() > 1.5


def test_log_prob_is_differentiable_in_model_parameters():
    sched = NoiseSchedule(100)
    lin, model_fn = _linear_model(seed=8)
    sampler = DDIMSampler(sched, 10, eta=1.0, min_std=0.1)
    with torch.no_grad():
        _, chain = sampler.sample(model_fn, (B, T, Da), generator=torch.Generator().manual_seed(9), return_chain=True)
    lp = sampler.log_prob(model_fn, chain)
    lp.mean().backward()
    for p in lin.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # finite-difference check on one weight
    w = lin.weight
    with torch.no_grad():
        base = sampler.log_prob(model_fn, chain).mean().item()
        w[0, 1] += 1e-3
        bumped = sampler.log_prob(model_fn, chain).mean().item()
        w[0, 1] -= 1e-3
    assert (bumped - base) / 1e-3 == pytest.approx(w.grad[0, 1].item(), rel=0.05, abs=1e-3)


def test_min_std_floors_the_std_only_when_stochastic():
    sched = NoiseSchedule(100)
    _, model_fn = _linear_model()
    x = torch.randn(B, T, Da)
    free = DDIMSampler(sched, 10, eta=1.0, min_std=0.0)
    floored = DDIMSampler(sched, 10, eta=1.0, min_std=0.5)
    for t, t_prev in zip(free.timesteps, free.prev_timesteps):
        m0, s0 = free.step_distribution(model_fn, x, t, t_prev)
        m1, s1 = floored.step_distribution(model_fn, x, t, t_prev)
        torch.testing.assert_close(s1, s0.clamp(min=0.5))
        torch.testing.assert_close(m1, m0)  # the floor changes the spread, not the mean
    assert (s0 == 0).all()  # the last step of the unfloored sampler
    _, s_det = DDIMSampler(sched, 10, eta=0.0, min_std=0.5).step_distribution(model_fn, x, 90, 80)
    assert (s_det == 0).all()


@pytest.mark.parametrize("noise_clamp", [3.0, None])
def test_noise_clamp_bounds_the_sampled_noise(noise_clamp):
    sched = NoiseSchedule(100)
    sampler = DDIMSampler(sched, 10, eta=1.0, min_std=0.1, noise_clamp=noise_clamp)
    model_fn = lambda x, k: torch.zeros_like(x)  # noqa: E731
    x_t = torch.zeros(64, 64, 4)  # 16384 draws: about 44 beyond |z| = 3
    mean, std = sampler.step_distribution(model_fn, x_t, 90, 80)
    x_next = sampler._draw(mean, std, torch.Generator().manual_seed(12))
    z = (x_next - mean) / std
    if noise_clamp is None:
        assert z.abs().max() > 3.0
    else:
        assert z.abs().max() <= 3.0 + 1e-5
        assert (z.abs() > 3.0 - 1e-5).sum() > 10  # the clamp was active


def test_log_prob_needs_a_density():
    sched = NoiseSchedule(100)
    _, model_fn = _linear_model()
    chain = torch.randn(B, 11, T, Da)
    with pytest.raises(UserError, match="eta"):
        DDIMSampler(sched, 10, eta=0.0, min_std=0.1).log_prob(model_fn, chain)
    with pytest.raises(UserError, match="eta"):
        DDIMSampler(sched, 10, eta=1.0, min_std=0.1).log_prob(model_fn, chain, eta=0.0)
    with pytest.raises(UserError, match="min_std"):  # the last step has std 0 without a floor
        DDIMSampler(sched, 10, eta=1.0, min_std=0.0).log_prob(model_fn, chain)
    with pytest.raises(UserError, match="chain"):
        DDIMSampler(sched, 10, eta=1.0, min_std=0.1).log_prob(model_fn, chain[:, :5])


def test_gaussian_log_prob_averages_over_actions():
    x, mean, std = torch.randn(2, 5, 3), torch.randn(2, 5, 3), torch.rand(2, 5, 3) + 0.1
    ref = torch.distributions.Normal(mean, std).log_prob(x)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), ref.mean(dim=(1, 2)))


def test_sample_with_the_unet_and_x_init_shape():
    from sodp3d.unet import build_unet
    unet = build_unet("tiny", Da, 6)
    cond = torch.randn(2, 6)
    sampler = DDIMSampler(NoiseSchedule(100), 10, eta=1.0, min_std=0.1)
    with torch.no_grad():
        x0, chain, lp = sampler.sample(lambda x, k: unet(x, k, cond), (2, 4, Da), return_chain=True,
                                       return_log_prob=True, generator=torch.Generator().manual_seed(0))
    assert x0.shape == (2, 4, Da) and chain.shape == (2, 11, 4, Da) and lp.shape == (2, 10)
    assert x0.dtype == torch.float32 and torch.isfinite(lp).all()
    with pytest.raises(UserError, match="x_init"):
        sampler.sample(lambda x, k: unet(x, k, cond), (2, 4, Da), x_init=torch.zeros(2, 8, Da))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampling_and_log_prob_on_cuda():
    from sodp3d.unet import build_unet
    dev = torch.device("cuda")
    unet = build_unet("tiny", Da, 6).to(dev)
    cond = torch.randn(2, 6, device=dev)
    model_fn = lambda x, k: unet(x, k, cond)  # noqa: E731
    sampler = DDIMSampler(NoiseSchedule(100), 10, eta=1.0, min_std=0.1)
    with torch.no_grad():
        x0, chain, lp = sampler.sample(model_fn, (2, 4, Da), return_chain=True, return_log_prob=True,
                                       generator=torch.Generator(device=dev).manual_seed(0))
    assert x0.device.type == "cuda" and lp.device.type == "cuda"
    torch.testing.assert_close(sampler.log_prob(model_fn, chain), lp, rtol=1e-4, atol=1e-4)
    sched = sampler.schedule
    xk = sched.add_noise(x0, torch.randn_like(x0), torch.tensor([3, 50], device=dev))
    assert xk.device.type == "cuda"
