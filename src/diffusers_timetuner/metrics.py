"""Generic distribution and trajectory metrics used by the tests, the calibration reports and the benchmarks.

FD-MNIST and the MNIST classifier belong to the MNIST testbed: `diffusers_timetuner.testbeds.mnist.classifier`.

- `frechet_distance`: the Frechet (2-Wasserstein) distance between two Gaussians, the formula behind FID.
- `pixel_frechet_distance`: FD of pixel statistics (for the Gaussian-mixture testbed, whose exact samples are free).
- `energy_distance`: a sample-efficient distance between two sample sets (no covariance to estimate), what the
  calibration guard compares for stochastic samplers, whose per-sample errors reward shrinking the sample spread.
- `trajectory_error`: per-step L2 distance between a few-step sampling trajectory and a many-step reference
  started from the same x_T (the paper's Fig. 2 measure).
- `paired_difference`: mean of per-sample differences between two samplers run from the same x_T, and its standard
  error (what `timetuner-evaluate`'s verdict rests on).
"""
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]


# ----------------------------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------------------------
def _as_float64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix via eigh (round-off negative eigenvalues are set to 0)."""
    w, v = np.linalg.eigh((cov + cov.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: ArrayLike, cov1: ArrayLike, mu2: ArrayLike, cov2: ArrayLike) -> float:
    """Frechet distance between N(mu1, cov1) and N(mu2, cov2).

    d^2 = |mu1 - mu2|^2 + tr(C1) + tr(C2) - 2 tr((C1^{1/2} C2 C1^{1/2})^{1/2}).

    The cross term is computed from the eigenvalues of the symmetric PSD matrix C1^{1/2} C2 C1^{1/2} (eigh, float64),
    which avoids the complex parts and instability of `scipy.linalg.sqrtm` on the non-symmetric product C1 C2.
    Like FID, the value returned is d^2 (not d).

    Args:
        mu1, mu2: means, shape (D,).
        cov1, cov2: covariances, shape (D, D); symmetric positive semi-definite.

    Returns:
        The squared Frechet distance as a Python float (>= 0 up to round-off).
    """
    mu1, mu2, cov1, cov2 = map(_as_float64, (mu1, mu2, cov1, cov2))
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    cov1, cov2 = np.atleast_2d(cov1), np.atleast_2d(cov2)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(
            f"frechet_distance needs means of shape (D,) and covariances of shape (D, D) with one D; got "
            f"{mu1.shape}, {cov1.shape}, {mu2.shape}, {cov2.shape}."
        )
    s1 = _psd_sqrt(cov1)
    cross = s1 @ cov2 @ s1
    eig = np.linalg.eigvalsh((cross + cross.T) / 2.0)
    tr_sqrt = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt)


def feature_statistics(features: ArrayLike) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of features of shape (N, D), in float64."""
    feats = _as_float64(features)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"feature_statistics needs an (N, D) array with N >= 2, got shape {feats.shape}.")
    return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def frechet_distance_from_features(features1: ArrayLike, features2: ArrayLike) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets of shapes (N1, D) and (N2, D)."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def pixel_frechet_distance(samples1: ArrayLike, samples2: ArrayLike) -> float:
    """Frechet distance of pixel statistics: both sample sets flattened to (N, C*H*W).

    Meant for low-dimensional data (the 64-D Gaussian-mixture testbed); with N samples the estimate is biased
    upwards by roughly D^2 / N-order terms, so compare values only at equal sample sizes.
    """
    a, b = _as_float64(samples1), _as_float64(samples2)
    return frechet_distance_from_features(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))


def energy_distance(samples1: ArrayLike, samples2: ArrayLike) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| between two sample sets (flattened, Euclidean norm).

    Zero iff the two distributions are equal (Szekely & Rizzo). The within-set means leave out the diagonal
    (U-statistics), so the estimate is unbiased and can be slightly negative for equal distributions. Needs no
    covariance, so it stays usable with a few dozen samples in high dimension, where a pixel FD does not.
    """
    a = torch.as_tensor(_as_float64(samples1))
    b = torch.as_tensor(_as_float64(samples2))
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    if a.shape[0] < 2 or b.shape[0] < 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"energy_distance needs two sets of >= 2 samples of the same size, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}.")

    def within(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        return torch.cdist(x, x).sum() / (n * (n - 1))

    return float(2 * torch.cdist(a, b).mean() - within(a) - within(b))


# ----------------------------------------------------------------------------------------------------------------
# Trajectory error (paper Fig. 2)
# ----------------------------------------------------------------------------------------------------------------
def trajectory_error(
    trajectory: Sequence[torch.Tensor],
    reference: Sequence[torch.Tensor],
    times: Optional[Sequence[float]] = None,
    reference_times: Optional[Sequence[float]] = None,
    atol: float = 1e-4,
) -> torch.Tensor:
    """Per-step L2 distance between a few-step trajectory and a many-step reference from the same x_T.

    State j of `trajectory` is compared with the reference state at the same time: with `times` /
    `reference_times` given (one label per state, e.g. the scheduler's grid timesteps before each step and -1 for
    the final clean sample), each time in `times` is looked up in `reference_times` (which must contain it, as
    DDIM's 1000-step grid contains every few-step "leading" grid); without them, both sequences must already be
    aligned and of equal length.

    Returns:
        float64 tensor (len(trajectory),): batch mean of the per-sample L2 norm ||x_j - x_ref(t_j)||_2.
    """
    if times is None and reference_times is None:
        if len(trajectory) != len(reference):
            raise ValueError(
                f"Without times, trajectory ({len(trajectory)} states) and reference ({len(reference)}) must be "
                "aligned; pass times= and reference_times= to select reference states at the trajectory's times."
            )
        matched = list(reference)
    elif times is None or reference_times is None:
        raise ValueError("Pass both times= and reference_times=, or neither.")
    else:
        if len(times) != len(trajectory) or len(reference_times) != len(reference):
            raise ValueError("times and reference_times need one label per state of their trajectory.")
        ref_t = np.asarray([float(t) for t in reference_times])
        matched = []
        for t in times:
            hits = np.flatnonzero(np.abs(ref_t - float(t)) <= atol)
            if len(hits) != 1:
                raise ValueError(
                    f"Time {float(t)} occurs {len(hits)} times in reference_times; the reference grid must contain "
                    "each trajectory time exactly once (e.g. run the reference with 1000 DDIM steps)."
                )
            matched.append(reference[hits[0]])
    errors = []
    for x, ref in zip(trajectory, matched):
        if x.shape != ref.shape:
            raise ValueError(f"State shapes differ: {tuple(x.shape)} vs reference {tuple(ref.shape)}.")
        errors.append((x.double() - ref.double()).flatten(1).norm(dim=1).mean())
    return torch.stack(errors)


# ----------------------------------------------------------------------------------------------------------------
# Paired comparison
# ----------------------------------------------------------------------------------------------------------------
def paired_difference(errors_a: ArrayLike, errors_b: ArrayLike) -> Tuple[float, float]:
    """(mean(a - b), its standard error) for per-sample errors of two samplers run from the same x_T.

    Pairing removes the spread between x_T that both samplers share, so the SE is that of the per-sample differences:
    std(a - b) / sqrt(N) (unbiased std). Needs N >= 2 pairs.
    """
    a, b = _as_float64(errors_a).reshape(-1), _as_float64(errors_b).reshape(-1)
    if a.shape != b.shape or a.shape[0] < 2:
        raise ValueError(f"paired_difference needs two equally long sets of >= 2 per-sample errors, got {a.shape[0]} "
                         f"and {b.shape[0]}.")
    diff = a - b
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(diff.shape[0]))
