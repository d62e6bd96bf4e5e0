"""Exact flow-matching Gaussian-mixture testbed: velocity vs finite differences of the exact density, vs a Monte-Carlo
estimate of E[eps - x_0 | x_s], and many-step Euler sampling reaching the mixture."""
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffusers_timetuner import metrics
from diffusers_timetuner.sampling import sample
from diffusers_timetuner.testbeds import FlowMatchingGaussianMixture, load_flow_gmm_model, load_gmm_model


@pytest.fixture(scope="module")
def flow():
    return load_flow_gmm_model()


def _small(seed=1, d=2):
    g = torch.Generator().manual_seed(seed)
    means = 1.5 * torch.randn(3, d, generator=g, dtype=torch.float64)
    covs = []
    for _ in range(3):
        a = torch.randn(d, d, generator=g, dtype=torch.float64)
        covs.append(0.3 * a @ a.T / d + 0.05 * torch.eye(d, dtype=torch.float64))
    return FlowMatchingGaussianMixture.from_parameters([0.5, 0.3, 0.2], means, torch.stack(covs), sample_size=(1, d))


@pytest.mark.parametrize("s", [0.05, 0.3, 0.7, 0.95])
def test_velocity_matches_finite_difference_score(flow, s):
    # For x_s = (1 - s) x_0 + s eps: E[eps | x] = -s grad log p_s(x) and E[x_0 | x] = (x - s E[eps | x]) / (1 - s),
    # so v = (-x - s grad log p_s(x)) / (1 - s); the gradient here is central differences of the exact log density.
    x = flow.sample_data(3, torch.Generator().manual_seed(0)).reshape(3, -1).double()
    x = (1 - s) * x + s * torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sv = torch.full((3,), s, dtype=torch.float64)
    h = 1e-5
    grad = torch.zeros_like(x)
    for i in range(x.shape[1]):
        e = torch.zeros_like(x)
        e[:, i] = h
        grad[:, i] = (flow.log_prob(x + e, sv) - flow.log_prob(x - e, sv)) / (2 * h)
    expected = (-x - s * grad) / (1 - s)
    got = flow.velocity(x, sv)
    # central differences in float64 with h = 1e-5: error ~ h^2 |f'''| + 1e-16 / h, far below 1e-5 of |v| ~ 10
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("s", [0.2, 0.6, 1.0])
def test_velocity_matches_monte_carlo(s):
    # E[eps - x_0 | x_s = x] by self-normalised importance sampling over exact x_0 draws,
    # weights N(x; (1-s) x_0, s^2 I)
    model = _small()
    x0 = model.sample_data(200_000, torch.Generator().manual_seed(2)).reshape(200_000, -1).double()
    x = torch.tensor([[0.3, -0.4], [1.0, 0.5]], dtype=torch.float64)
    sv = torch.full((2,), s, dtype=torch.float64)
    got = model.velocity(x, sv)
    for b in range(2):
        resid = x[b] - (1 - s) * x0
        logw = -0.5 * (resid * resid).sum(1) / s**2
        w = torch.softmax(logw, 0)
        eps = resid / s
        mc = (w[:, None] * (eps - x0)).sum(0)
        ess = 1.0 / float((w * w).sum())
        assert ess > 1000  # enough effective samples for the tolerance below
        # Monte-Carlo error ~ std(eps - x_0 | x) / sqrt(ess) < 3 / sqrt(1000) ~ 0.1
        torch.testing.assert_close(got[b], mc, atol=0.1, rtol=0)


def test_endpoints_are_finite_and_exact(flow):
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    # s = 1: x_1 = eps carries no information about x_0, so v = x - E[x_0] = x - sum_k w_k mu_k.
    one = torch.ones(4, dtype=torch.float64)
    mean = flow.weights.double() @ flow.means.double()
    torch.testing.assert_close(flow.velocity(x, one), x - mean[None])
    assert torch.isfinite(flow.velocity(x, torch.zeros(4, dtype=torch.float64))).all()


def test_call_convention_and_errors(flow):
    x = torch.randn(2, 1, 8, 8)
    out = flow(x, torch.tensor([500.0, 500.0])).sample
    ref = flow.velocity(x.reshape(2, -1).double(), torch.full((2,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(out.reshape(2, -1).double(), ref.float().double())
    assert out.dtype == torch.float32 and out.shape == x.shape
    with pytest.raises(ValueError, match=r"\[0, 1000\]"):
        flow(x, torch.tensor(1000.5))
    with pytest.raises(ValueError, match="unconditional"):
        flow(x, 500.0, class_labels=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="64 values"):
        flow(torch.randn(2, 1, 4, 4), 500.0)


def test_same_mixture_as_vp_testbed(flow):
    vp = load_gmm_model()
    for name in ("weights", "means", "covariances"):
        assert torch.equal(getattr(flow, name), getattr(vp, name))


def test_save_load_roundtrip(tmp_path, flow):
    flow.save_pretrained(tmp_path)
    back = FlowMatchingGaussianMixture.from_pretrained(tmp_path)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(back(x, 300.0).sample, flow(x, 300.0).sample)


def test_many_step_euler_reaches_the_mixture(flow):
    # FlowMatchEuler (shift 1) at 200 steps from N(0, I): its pixel FD to exact samples is close to the FD between two
    # independent exact sample sets of the same size (the finite-sample floor), and far below the 10-step sampler's.
    n = 1000
    noise = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(4))

    def den(x, t, cond):
        return flow(x, t).sample

    exact = flow.sample_data(n, torch.Generator().manual_seed(5)).reshape(n, -1).numpy()
    floor = metrics.pixel_frechet_distance(exact, flow.sample_data(n, torch.Generator().manual_seed(6))
                                           .reshape(n, -1).numpy())
    fine = sample(den, FlowMatchEulerDiscreteScheduler(), noise, 200).reshape(n, -1).numpy()
    coarse = sample(den, FlowMatchEulerDiscreteScheduler(), noise, 5).reshape(n, -1).numpy()
    fd_fine = metrics.pixel_frechet_distance(fine, exact)
    fd_coarse = metrics.pixel_frechet_distance(coarse, exact)
    assert np.isfinite(fd_fine)
    assert fd_fine < 1.5 * floor, (fd_fine, floor)
    assert fd_coarse > 3 * fd_fine, (fd_coarse, fd_fine)
