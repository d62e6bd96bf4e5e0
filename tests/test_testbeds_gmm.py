"""Exact-score Gaussian-mixture testbed: closed forms, autograd scores, time derivative, sampling, round-trip."""
import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_timetuner import metrics
from diffusers_timetuner.testbeds import load_gmm_model, load_gmm_pipeline
from diffusers_timetuner.testbeds.gmm import GaussianMixtureDenoiser, alpha_bar_at


def _random_spd(d, gen, scale=0.5):
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return scale * (a @ a.T) / d + 0.05 * torch.eye(d, dtype=torch.float64)


@pytest.fixture(scope="module")
def gmm():
    return load_gmm_model()


@pytest.fixture(scope="module")
def small_mixture():
    gen = torch.Generator().manual_seed(1)
    k, d = 3, 4
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    means = torch.randn(k, d, generator=gen, dtype=torch.float64)
    covs = torch.stack([_random_spd(d, gen) for _ in range(k)])
    return weights, means, covs


def _mixture_log_density(x, t, weights, means, covs, alphas_cumprod):
    """log p_t(x) written independently with torch.distributions (x: (B, D) float64, t: (B,))."""
    ab = alpha_bar_at(alphas_cumprod, t)
    out = []
    for i in range(x.shape[0]):
        a, s2 = ab[i].sqrt(), 1 - ab[i]
        eye = torch.eye(x.shape[1], dtype=x.dtype)
        comps = [
            torch.distributions.MultivariateNormal(a * means[k], a * a * covs[k] + s2 * eye)
            for k in range(len(weights))
        ]
        lp = torch.stack([weights[k].log() + c.log_prob(x[i]) for k, c in enumerate(comps)])
        out.append(torch.logsumexp(lp, 0))
    return torch.stack(out)


def test_alpha_bar_at_rule():
    ac = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.double()
    t_int = torch.tensor([0.0, 1.0, 500.0, 999.0], dtype=torch.float64)
    torch.testing.assert_close(alpha_bar_at(ac, t_int), ac[t_int.long()])  # integers: exactly the table
    # Fractional t: linear interpolation between the two neighbouring entries.
    t_frac = torch.tensor(300.25, dtype=torch.float64)
    torch.testing.assert_close(alpha_bar_at(ac, t_frac), 0.75 * ac[300] + 0.25 * ac[301])
    assert float(alpha_bar_at(ac, -1.0)) == 1.0  # clean data
    # Beyond the table: the last beta continues; continuous at N-1 and decreasing.
    last_alpha = ac[999] / ac[998]
    torch.testing.assert_close(alpha_bar_at(ac, torch.tensor(1001.0, dtype=torch.float64)), ac[999] * last_alpha**2)
    assert abs(float(alpha_bar_at(ac, 999.0 + 1e-9)) - float(ac[999])) < 1e-12
    with pytest.raises(ValueError, match=">= -1"):
        alpha_bar_at(ac, torch.tensor([-1.5]))
    with pytest.raises(ValueError, match="finite"):
        alpha_bar_at(ac, torch.tensor([float("nan")]))


def test_single_gaussian_closed_form():
    # One component N(m, S): eps*(x, t) = s (a^2 S + s^2 I)^{-1} (x - a m), the closed form of -s * score.
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(4, generator=gen, dtype=torch.float64)
    cov = _random_spd(4, gen)
    model = GaussianMixtureDenoiser.from_parameters([1.0], m[None], cov[None], sample_size=2)
    m, cov = model.means[0].double(), model.covariances[0].double()  # parameters are stored in float32
    x = torch.randn(6, 1, 2, 2, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.0, 10.5, 250.0, 499.7, 800.0, 999.0], dtype=torch.float64)
    eps = model(x, t).sample.reshape(6, 4)
    ab = alpha_bar_at(model.alphas_cumprod, t)
    for i in range(6):
        a, s = ab[i].sqrt(), (1 - ab[i]).sqrt()
        cov_t = a * a * cov + s * s * torch.eye(4, dtype=torch.float64)
        expected = s * torch.linalg.solve(cov_t, x[i].reshape(4) - a * m)
        torch.testing.assert_close(eps[i], expected, rtol=1e-9, atol=1e-10)


def test_eps_matches_autograd_score_of_mixture_density(small_mixture):
    weights, means, covs = small_mixture
    model = GaussianMixtureDenoiser.from_parameters(weights, means, covs, sample_size=2)
    weights, means, covs = model.weights.double(), model.means.double(), model.covariances.double()  # float32 storage
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64).requires_grad_(True)
    t = torch.tensor([3.0, 100.2, 400.0, 700.9, 990.0], dtype=torch.float64)
    logp = _mixture_log_density(x, t, weights, means, covs, model.alphas_cumprod)
    (score,) = torch.autograd.grad(logp.sum(), x)
    s = (1 - alpha_bar_at(model.alphas_cumprod, t)).sqrt()[:, None]
    eps = model(x.detach().reshape(5, 1, 2, 2), t).sample.reshape(5, 4)
    torch.testing.assert_close(eps, -s * score, rtol=1e-7, atol=1e-9)


def test_bundled_digits_eps_matches_numeric_score(gmm):
    # Central finite differences of log p_t (computed independently) on a few coordinates of the 64-D model.
    x = gmm.sample_data(2, torch.Generator().manual_seed(0)).double().reshape(2, 64)
    t = torch.tensor([50.0, 600.5], dtype=torch.float64)
    x_t = alpha_bar_at(gmm.alphas_cumprod, t).sqrt()[:, None] * x + 0.3 * torch.randn(2, 64, dtype=torch.float64)
    w, mu, cov = gmm.weights.double(), gmm.means.double(), gmm.covariances.double()
    eps = gmm(x_t.reshape(2, 1, 8, 8), t).sample.reshape(2, 64)
    s = (1 - alpha_bar_at(gmm.alphas_cumprod, t)).sqrt()
    h = 1e-5
    for j in (0, 20, 27, 45):
        e = torch.zeros(64, dtype=torch.float64)
        e[j] = h
        fd = (_mixture_log_density(x_t + e, t, w, mu, cov, gmm.alphas_cumprod)
              - _mixture_log_density(x_t - e, t, w, mu, cov, gmm.alphas_cumprod)) / (2 * h)
        torch.testing.assert_close(eps[:, j], -s * fd, rtol=1e-4, atol=1e-5)


def test_differentiable_in_t(small_mixture):
    weights, means, covs = small_mixture
    model = GaussianMixtureDenoiser.from_parameters(weights, means, covs, sample_size=2)
    x = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t = torch.tensor([120.3, 450.6, 870.2], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(model(x, t).sample.sum(), t)
    h = 1e-4
    with torch.no_grad():
        def f(i, ti):
            return model(x[i : i + 1], ti).sample.sum()

        fd = torch.stack([(f(i, t[i : i + 1] + h) - f(i, t[i : i + 1] - h)) / (2 * h) for i in range(3)])
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-8)
    assert (grad.abs() > 0).all()


@pytest.mark.parametrize("kind", ["v_prediction", "sample"])
def test_prediction_types_consistent_with_epsilon(small_mixture, kind):
    weights, means, covs = small_mixture
    eps_model = GaussianMixtureDenoiser.from_parameters(weights, means, covs, sample_size=2)
    other = GaussianMixtureDenoiser.from_parameters(weights, means, covs, sample_size=2, prediction_type=kind)
    x = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    t = torch.tensor([10.0, 200.5, 600.0, 950.0], dtype=torch.float64)
    eps, out = eps_model(x, t).sample, other(x, t).sample
    ab = alpha_bar_at(eps_model.alphas_cumprod, t)[:, None, None, None]
    a, s = ab.sqrt(), (1 - ab).sqrt()
    x0 = (x - s * eps) / a
    torch.testing.assert_close(out, x0 if kind == "sample" else a * eps - s * x0)


def test_sample_data_moments(small_mixture):
    weights, means, covs = small_mixture
    model = GaussianMixtureDenoiser.from_parameters(weights, means, covs, sample_size=2)
    x = model.sample_data(40000, torch.Generator().manual_seed(5)).double().reshape(-1, 4)
    mean = (weights[:, None] * means).sum(0)
    second = sum(weights[k] * (covs[k] + torch.outer(means[k], means[k])) for k in range(3))
    cov = second - torch.outer(mean, mean)
    # Monte-Carlo standard error with 40000 samples is about sqrt(var / 40000) <= 0.01 here; 5 sigma tolerance.
    torch.testing.assert_close(x.mean(0), mean, atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), cov, atol=0.05, rtol=0)
    again = model.sample_data(10, torch.Generator().manual_seed(5))
    torch.testing.assert_close(again, model.sample_data(10, torch.Generator().manual_seed(5)), rtol=0, atol=0)


def test_save_load_roundtrip(tmp_path, small_mixture):
    weights, means, covs = small_mixture
    ac = DDPMScheduler(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2").alphas_cumprod
    model = GaussianMixtureDenoiser.from_parameters(weights, means, covs, sample_size=2, alphas_cumprod=ac,
                                                    prediction_type="v_prediction")
    torch.testing.assert_close(model.alphas_cumprod.float(), ac, rtol=1e-5, atol=1e-7)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["prediction_type"] == "v_prediction" and len(config["trained_betas"]) == 500
    loaded = GaussianMixtureDenoiser.from_pretrained(tmp_path)
    for key in ("n_components", "sample_size", "num_train_timesteps", "prediction_type", "trained_betas"):
        assert loaded.config[key] == model.config[key], key
    x = torch.randn(3, 1, 2, 2)
    t = torch.tensor([1.5, 250.0, 499.0])
    torch.testing.assert_close(loaded(x, t).sample, model(x, t).sample, rtol=0, atol=0)
    torch.testing.assert_close(loaded.covariances, model.covariances, rtol=0, atol=0)


def test_bundled_model_is_the_documented_fit(gmm):
    pytest.importorskip("sklearn")
    refit = GaussianMixtureDenoiser.from_digits(n_components=10, seed=0)
    # Same sklearn fit (k-means init, seed 0); different sklearn versions may differ by round-off only.
    torch.testing.assert_close(refit.means, gmm.means, atol=1e-3, rtol=0)
    torch.testing.assert_close(refit.covariances, gmm.covariances, atol=1e-3, rtol=0)


def test_many_step_ddim_matches_exact_samples():
    pipe = load_gmm_pipeline()
    model = pipe.unet
    exact_a = model.sample_data(1000, torch.Generator().manual_seed(1))
    exact_b = model.sample_data(1000, torch.Generator().manual_seed(2))
    # The bound: what two independent exact sample sets of the same size give (0.286 measured), plus 25%.
    # Measured: DDIM 100 steps 0.273, DDIM 10 steps 0.86 (truncation error), so the check can fail.
    bound = 1.25 * metrics.pixel_frechet_distance(exact_b, exact_a)
    noise = torch.randn(1000, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    many = pipe(num_inference_steps=100, latents=noise, output_type="latent")
    few = pipe(num_inference_steps=10, latents=noise, output_type="latent")
    assert metrics.pixel_frechet_distance(many.images, exact_a) < bound
    assert metrics.pixel_frechet_distance(few.images, exact_a) > bound


def test_bad_inputs_raise(small_mixture):
    weights, means, covs = small_mixture
    model = GaussianMixtureDenoiser.from_parameters(weights, means, covs, sample_size=2)
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.zeros(1, 1, 2, 2), 10, class_labels=torch.tensor([0]))
    with pytest.raises(ValueError, match="4 values"):
        model(torch.zeros(1, 1, 3, 3), 10)
    with pytest.raises(ValueError, match="one entry per sample"):
        model(torch.zeros(2, 1, 2, 2), torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="sum to 1"):
        GaussianMixtureDenoiser.from_parameters([0.5, 0.6, 0.2], means, covs)
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixtureDenoiser.from_parameters(weights, means, torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="prediction_type"):
        GaussianMixtureDenoiser(prediction_type="x0")
