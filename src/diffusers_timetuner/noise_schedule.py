"""The noise level alpha_bar(t) at a possibly fractional timestep t: the package's one rule.

Diffusers tables ``alphas_cumprod`` only at integer timesteps; TimeTuner feeds networks fractional taus, and the
testbed models and calibration's prediction-type conversions need alpha_bar there. With N = len(alphas_cumprod):

- 0 <= t <= N-1: linear interpolation of alphas_cumprod between floor(t) and floor(t) + 1 (integers: the table);
- -1 <= t < 0: linear interpolation between alpha_bar(-1) = 1 (clean data) and alphas_cumprod[0];
- t > N-1: the schedule continues with its last beta, alpha_bar(t) = alphas_cumprod[N-1] * (1 - beta_{N-1})^(t-N+1);
- t < -1 or non-finite: ValueError.

It is continuous and piecewise differentiable in t (gradient-based calibration differentiates through it). Tables
keep taus inside [0, N-1] (``table.py``), so calibration only evaluates the first case; the edges make the testbed
models total functions of t.
"""

from __future__ import annotations

from typing import Union

import torch


def alpha_bar_at(alphas_cumprod: torch.Tensor, t: Union[float, torch.Tensor]) -> torch.Tensor:
    """alpha_bar at a possibly fractional timestep t (see the module docstring for the exact rule).

    Args:
        alphas_cumprod: (N,) table of a Diffusers scheduler (float32 or float64).
        t: timestep(s), any shape; differentiable when it is a floating tensor that requires grad.

    Returns:
        alpha_bar(t) with t's shape, in alphas_cumprod's dtype.
    """
    ac = alphas_cumprod
    t = t.to(ac.device, ac.dtype) if torch.is_tensor(t) else torch.tensor(t, dtype=ac.dtype, device=ac.device)
    if not torch.isfinite(t).all() or (t < -1).any():
        raise ValueError(
            f"Timesteps must be finite and >= -1 (alpha_bar(-1) = 1 is clean data); got min {t.min().item()}."
        )
    n = ac.shape[0]
    lo = t.detach().floor().clamp(0, n - 2).long()
    frac = t - lo.to(t.dtype)
    inside = ac[lo] * (1 - frac) + ac[lo + 1] * frac
    below = 1.0 + (ac[0] - 1.0) * (t + 1.0)  # between alpha_bar(-1) = 1 and alphas_cumprod[0]
    last_alpha = ac[n - 1] / ac[n - 2]  # 1 - beta_{N-1}
    above = ac[n - 1] * torch.pow(last_alpha, (t - (n - 1)).clamp(min=0))
    return torch.where(t < 0, below, torch.where(t > n - 1, above, inside))
