"""Differentiable few-step samplers in continuous diffusers time, for the grid-learning peers.

Time is in the units of ``scheduler.timesteps`` (0 .. T-1) extended by one point below: ``k = -1`` is the state the
package's samplers end in (``alpha_bar = 1``: DDIM's ``final_alpha_cumprod`` with ``set_alpha_to_one=True``,
DPM-Solver++'s ``final_sigmas_type="zero"``). ``log alpha_bar`` is interpolated linearly between integer timesteps,
so a grid of integers reproduces the package schedulers' arithmetic (checked in tests/test_grid_side_by_side.py) and
a fractional grid can be differentiated.

A grid here is ``times = [t_K, ..., t_1, t_0]`` (K + 1 points, the model evaluated at the first K) and the model
input times ``taus = [tau_K, ..., tau_1]`` (TimeTuner's table; ``taus = times[:-1]`` when not decoupled).

Solvers (``SOLVERS``): "ddim", "dpmpp" (DPM-Solver++(2M)) and "unipc" (UniPC-2, bh2, data prediction, with its
corrector), each with the settings of the package's scheduler of that name on a VP model.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import torch

FINAL_TIME = -1.0  # the end state of the package samplers: alpha_bar = 1, sigma = 0
SOLVERS = ("ddim", "dpmpp", "unipc")


class ContinuousSchedule:
    """``alpha_bar(k)`` of a diffusers noise schedule at fractional k in [-1, T-1] (log-linear interpolation)."""

    def __init__(self, alphas_cumprod: torch.Tensor, final_alpha_cumprod: float = 1.0):
        if float(final_alpha_cumprod) != 1.0:
            raise ValueError("the continuous samplers end at alpha_bar = 1 (set_alpha_to_one=True / "
                             "final_sigmas_type='zero'); got final_alpha_cumprod != 1.")
        ab = alphas_cumprod.detach().to(torch.float64)
        self.log_ab = torch.cat([torch.zeros(1, dtype=torch.float64), ab.log()])  # index j <-> k = j - 1
        self.T = int(ab.numel())

    @classmethod
    def from_scheduler(cls, scheduler) -> "ContinuousSchedule":
        return cls(scheduler.alphas_cumprod)

    def log_alpha_bar(self, k: torch.Tensor) -> torch.Tensor:
        k = torch.as_tensor(k, dtype=torch.float64)
        pos = (k + 1.0).clamp(0.0, float(self.T))
        lo = pos.detach().floor().clamp(max=self.T - 1).long()
        w = pos - lo.to(pos.dtype)
        return self.log_ab[lo] * (1.0 - w) + self.log_ab[lo + 1] * w

    def alpha_sigma(self, k):
        """(alpha_k, sigma_k) = (sqrt(alpha_bar), sqrt(1 - alpha_bar)), float64, differentiable in k."""
        lab = self.log_alpha_bar(k)
        alpha = (0.5 * lab).exp()
        sigma = (-torch.expm1(lab)).clamp(min=0.0).sqrt()
        return alpha, sigma


Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, tau) -> eps prediction


def _data_prediction(x, eps, alpha, sigma):
    return (x - sigma * eps) / alpha


def _log_snr(alpha, sigma):
    return alpha.log() - sigma.log()


def _unipc(model: Model, x_T: torch.Tensor, times: torch.Tensor, taus: torch.Tensor,
           schedule: ContinuousSchedule) -> torch.Tensor:
    """UniPC as diffusers' ``UniPCMultistepScheduler`` with solver_order=2, solver_type="bh2", predict_x0=True,
    lower_order_final=True, no disabled corrector, final_sigmas_type="zero".

    Step i: the network at x_i gives the data prediction m_i (from the uncorrected x_i); for i > 0 the corrector
    UniC (order of the previous predictor) recomputes x_i from x_{i-1} with m_i; then the predictor UniP of order
    min(2, K - i, i + 1) goes to t_{i+1}. With data prediction and bh2, h phi_1 and B(h) are both expm1(-h), h the
    log-SNR step.
    """
    K = times.shape[0] - 1
    x = x_T.to(torch.float64)
    sigmas, lams, ms = [], [], []
    x_last, order_last = None, 0
    for i in range(K):
        a_s, s_s = schedule.alpha_sigma(times[i])
        lam_s = _log_snr(a_s, s_s)
        eps = model(x.to(x_T.dtype), taus[i]).to(torch.float64)
        m = _data_prediction(x, eps, a_s, s_s)
        final = i == K - 1 and float(times[i + 1].detach()) <= FINAL_TIME
        if final:
            # diffusers: the corrector still runs, but the order-1 step into sigma = 0 is exactly m (0 * x + m)
            return m.to(x_T.dtype)
        if i > 0:  # UniC from x_{i-1} to t_i, with order `order_last` (that of the predictor it corrects)
            h = lam_s - lams[-1]
            hh = -h
            h_phi_1 = torch.expm1(hh)
            b_h = h_phi_1
            x_c = (s_s / sigmas[-1]) * x_last - a_s * h_phi_1 * ms[-1]
            d1_t = m - ms[-1]
            if order_last == 1:
                x = x_c - a_s * b_h * 0.5 * d1_t
            else:  # rhos_c = solve([[1, 1], [r, 1]], [b_1, b_2]) with diffusers' b_k = h_phi_k k! / B(h)
                r = (lams[-2] - lams[-1]) / h
                d1 = (ms[-2] - ms[-1]) / r
                h_phi_k = h_phi_1 / hh - 1.0
                b1 = h_phi_k / b_h
                b2 = (h_phi_k / hh - 0.5) * 2.0 / b_h
                rho0 = (b1 - b2) / (1.0 - r)
                rho1 = b1 - rho0
                x = x_c - a_s * b_h * (rho0 * d1 + rho1 * d1_t)
        sigmas.append(s_s)
        lams.append(lam_s)
        ms.append(m)
        order = min(2, K - i, i + 1)
        a_t, s_t = schedule.alpha_sigma(times[i + 1])
        h = _log_snr(a_t, s_t) - lam_s
        b_h = torch.expm1(-h)  # = h_phi_1 with predict_x0
        x_last = x
        x = (s_t / s_s) * x - a_t * b_h * m
        if order == 2:  # rhos_p = 0.5 (diffusers' order-2 shortcut)
            r = (lams[-2] - lam_s) / h
            x = x - a_t * b_h * 0.5 * (ms[-2] - m) / r
        order_last = order
    return x.to(x_T.dtype)


def sample(model: Model, x_T: torch.Tensor, times: torch.Tensor, taus: Optional[torch.Tensor], solver: str,
           schedule: ContinuousSchedule) -> torch.Tensor:
    """Run ``solver`` from x_T over ``times``; the model sees ``taus``.

    "ddim"; "dpmpp": DPM-Solver++(2M), midpoint, first order at the first and last step, as diffusers' multistep
    scheduler with ``lower_order_final``; "unipc": UniPC-2 (bh2) predictor-corrector as diffusers'
    ``UniPCMultistepScheduler`` defaults (see :func:`_unipc`). The update uses only the grid's alpha / sigma
    (TimeTuner's rule); everything is differentiable in x_T, times and taus. The last step into ``k = -1`` returns
    the data prediction, as the package samplers do.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}.")
    K = times.shape[0] - 1
    if taus is None:
        taus = times[:-1]
    if taus.shape[0] != K:
        raise ValueError(f"{K} steps need {K} model times, got {taus.shape[0]}.")
    if solver == "unipc":
        return _unipc(model, x_T, times, taus, schedule)
    x = x_T.to(torch.float64)
    prev_x0, prev_lambda = None, None
    for i in range(K):
        a_s, s_s = schedule.alpha_sigma(times[i])
        a_t, s_t = schedule.alpha_sigma(times[i + 1])
        eps = model(x.to(x_T.dtype), taus[i]).to(torch.float64)
        x0 = _data_prediction(x, eps, a_s, s_s)
        if i == K - 1 and float(times[i + 1].detach()) <= FINAL_TIME:
            x = x0
            break
        if solver == "ddim":
            x = a_t * x0 + s_t * eps
        else:
            lam_s = a_s.log() - s_s.log()
            lam_t = a_t.log() - s_t.log()
            h = lam_t - lam_s
            x = (s_t / s_s) * x - a_t * torch.expm1(-h) * x0
            if prev_x0 is not None and i < K - 1:  # second order: the multistep correction
                r0 = (lam_s - prev_lambda) / h
                d1 = (x0 - prev_x0) / r0
                x = x - 0.5 * a_t * torch.expm1(-h) * d1
            prev_x0, prev_lambda = x0, lam_s
    return x.to(x_T.dtype)


def round_descending(times: Sequence[float], num_train_timesteps: int) -> List[int]:
    """Fractional model times -> the nearest integer timesteps, strictly descending, in [0, T - 1]: each rounded
    (half up) and clipped, then collisions pushed apart by a forward pass (k_i <= k_{i-1} - 1) and a backward pass
    (k_i >= k_{i+1} + 1, the last >= 0)."""
    n = len(times)
    if n > num_train_timesteps:
        raise ValueError(f"{n} distinct timesteps do not fit in [0, {num_train_timesteps - 1}].")
    ks = [min(max(int(math.floor(t + 0.5)), 0), num_train_timesteps - 1) for t in times]
    for i in range(1, n):
        ks[i] = min(ks[i], ks[i - 1] - 1)
    for i in range(n - 1, -1, -1):
        ks[i] = max(ks[i], 0 if i == n - 1 else ks[i + 1] + 1)
    return ks
