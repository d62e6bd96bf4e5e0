"""DMN: data-free time steps from a small optimisation in log-SNR (no data, no model evaluation).

Xue, Liu, Chen, Zhang, Hu, Xie, Li, "Accelerating Diffusion Sampling with Optimized Time Steps", CVPR 2024
(arXiv 2402.17376; "DMN" in the LD3 paper's comparisons); public code github.com/scxue/DM-NonUniform, file
``step_optim.py`` (class ``StepOptim``: ``sel_lambdas_lof_obj`` is the objective, ``get_ts_lambdas`` the solve).
Written here from the paper's abstract (minimise the distance between the ground-truth ODE solution and the
solver's approximation; a constrained trust-region method, under 15 s) and the repository's ``step_optim.py`` (its
README: ``get_ts_lambdas(N, t_0, optimized_type)`` inside DPM-Solver / UniPC); the paper's method section was not
available here, so the details below follow the repository. No code copied. The steps:

1. Variables (``get_ts_lambdas``): the half log-SNR lambda = log(alpha / sigma) of the N + 1 grid points
   lambda_0 < lambda_1 < ... < lambda_N; the ends are fixed at the paper's start and end, lambda_0 = lambda(t = T)
   and lambda_N = lambda(t = eps). For discrete-time VP models the repository (via DPM-Solver's ``NoiseScheduleVP``,
   t = (k + 1) / T, eps = 1e-3) uses t = T <-> k = T - 1 and t = eps <-> k = 0: here ``start_time`` = T - 1 and
   ``end_time`` = 0 (diffusers timesteps). The N - 1 interior lambdas are free.
2. Solver weights: the data-prediction solution over the whole trajectory is
   x_eps = (sigma_eps / sigma_T) x_T + sigma_eps int e^lambda x_theta d lambda, and a multistep solver replaces the
   integral over step n (lambda_n -> lambda_{n+1}) by sum_j J_{n,j} x_theta(lambda_j) over its p_n interpolation
   points j = n, n - 1, ..., n - p_n + 1. J is the exact integral of e^lambda times the Lagrange basis polynomial
   (the repository's closed forms with H0 = e^h - 1, H1 = h e^h - H0, H2 = h^2 e^h - 2 H1), computed here from the
   moments int_0^h u^k e^u du for any order. Step orders as in the repository: 1 at the first and last step, 2 at
   the second and second-to-last, 3 elsewhere (its model of a third-order multistep run); ``solver="lagrange3"``.
   The common factor sigma_eps is dropped, as in the repository.
   Following the paper's framework for "a specific numerical ODE solver", ``solver="dpmpp"`` (the default) uses the
   weights of the package's DPM-Solver++(2M) itself (diffusers' midpoint update, orders 1, 2, ..., 2, 1 with
   ``lower_order_final``): J_{n,n} = e^lambda_n (e^h - 1)(1 + h / (2 h_prev)), J_{n,n-1} = -e^lambda_n (e^h - 1)
   h / (2 h_prev); ``solver="ddim"``: every step first order, J_{n,n} = e^lambda_{n+1} - e^lambda_n.
3. Objective (``sel_lambdas_lof_obj``): the error of x_theta at point j is modelled as the scalar w_j = sigma_j^p /
   alpha_j (the repository's ``data_err_vec``: p = 2 in its code; its comment: p = 1 is better for pixel-space
   models; the LD3 repository's DMN baseline, github.com/vinhsuhi/LD3 ``samplers/general_solver.py``
   (``skip_type="dmn"``), uses p = 2 with ``unif_t`` on its VP (latent) models, p = 1 with ``unif`` on its EDM pixel
   models). A first-order step contributes |J w|; a higher-order step s < ``trunc_num`` contributes sqrt(sum_j
   (J_{s,j} w_j)^2); the higher-order steps s >= ``trunc_num`` are summed per point, c_j = sum_s J_{s,j} w_j, and
   contribute sum_j |c_j|. ``trunc_num`` = 3 for N <= 7 and 0 above (the repository's comment; its code fixes 3, the
   LD3 repository's copy uses the N <= 7 rule).
4. Solve: ``scipy.optimize.minimize(method="trust-constr")`` (the paper's constrained trust region) with the linear
   constraints lambda_{i+1} - lambda_i >= 0 (lambda_0, lambda_N fixed), from the log-SNR-uniform grid
   (``init="logsnr"``: the repository's ``unif``, recommended for pixel-space models) or the time-uniform one
   (``init="time"``: its ``unif_t``, recommended for latent models); scipy's defaults otherwise (finite-difference
   gradient, BFGS Hessian). The repository's ``edm`` / ``quad`` initialisations are not offered.

Mapping to this package (what differs): the package's samplers evaluate the model at N timesteps and end at k = -1
(alpha_bar = 1, sigma = 0, ``continuous.FINAL_TIME``), where lambda = +inf: with the factor sigma_eps -> 0 every
term but the last step's vanishes and the objective degenerates. So the optimisation keeps the paper's end lambda(k
= 0); the N model-evaluation times are lambda_0..lambda_{N-1} mapped back to diffusers time (``continuous_times``:
the fractional k whose interpolated alpha_bar has that lambda, ``ContinuousSchedule``'s log-linear interpolation),
and the sampler's last, first-order step returns the data prediction at the last model time (sigma = 0, k = -1)
instead of stepping to k = 0, where sigma = sqrt(1 - alpha_bar_0) (0.01 on the linear schedule). Rounding: each time
to the nearest integer, the first kept at T - 1, then duplicates resolved by a forward pass (k_i <= k_{i-1} - 1) and
a backward pass (k_i >= k_{i+1} + 1, k_{N-1} >= 0); ``rounding_max_shift`` reports the largest move. Defaults here:
``solver="dpmpp"``, p = 1 and ``init="logsnr"`` (the repository's advice for pixel-space models, which the package's
VP testbeds are), where the repository's code uses the ``lagrange3`` weights and p = 2.
"""

from __future__ import annotations

import time
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .continuous import ContinuousSchedule, round_descending

SOLVERS = ("dpmpp", "ddim", "lagrange3")
INITS = ("logsnr", "time")


# ------------------------------------------------------------------------------------------------ time <-> lambda
def _log_ab_table(schedule: ContinuousSchedule) -> np.ndarray:
    """log alpha_bar at k = 0 .. T - 1 (float64)."""
    return schedule.log_ab[1:].numpy()


def lambda_of_time(schedule: ContinuousSchedule, k) -> np.ndarray:
    """Half log-SNR log(alpha / sigma) at diffusers time k (fractional k: the schedule's interpolation)."""
    lab = schedule.log_alpha_bar(torch.as_tensor(k, dtype=torch.float64)).numpy()
    return 0.5 * (lab - np.log(-np.expm1(lab)))


def time_of_lambda(schedule: ContinuousSchedule, lam) -> np.ndarray:
    """Inverse of :func:`lambda_of_time` on [0, T - 1]: log alpha_bar = -log(1 + e^{-2 lambda}), interpolated
    linearly in log alpha_bar between integer timesteps (as ``ContinuousSchedule``)."""
    target = -np.logaddexp(0.0, -2.0 * np.asarray(lam, dtype=np.float64))
    table = _log_ab_table(schedule)
    ks = np.arange(table.size, dtype=np.float64)
    return np.interp(target, table[::-1], ks[::-1])  # the table decreases in k; np.interp needs increasing x


# ---------------------------------------------------------------------------------------------- solver weights
def step_orders(num_steps: int, solver: str) -> List[int]:
    """Interpolation order of each of the ``num_steps`` steps (first step first)."""
    if solver == "ddim":
        return [1] * num_steps
    if solver == "dpmpp":
        return [1 if s in (0, num_steps - 1) else 2 for s in range(num_steps)]
    if solver == "lagrange3":
        return [1 if s in (0, num_steps - 1) else 2 if s in (1, num_steps - 2) else 3 for s in range(num_steps)]
    raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}.")


def _exp_moments(h: float, order: int) -> np.ndarray:
    """int_0^h u^k e^u du for k = 0 .. order - 1 (the repository's H0, H1, H2, ...)."""
    m = [np.expm1(h)]
    for k in range(1, order):
        m.append(h ** k * np.exp(h) - k * m[-1])
    return np.array(m)


def lagrange_weights(lams: Sequence[float], n: int, order: int) -> Dict[int, float]:
    """{j: J_{n,j}}: int_{lambda_n}^{lambda_{n+1}} e^lambda l_j(lambda) d lambda for the Lagrange basis l_j on the
    points lambda_n, lambda_{n-1}, ..., lambda_{n-order+1}."""
    h = lams[n + 1] - lams[n]
    pts = list(range(n, n - order, -1))
    nodes = {j: lams[j] - lams[n] for j in pts}  # u = lambda - lambda_n
    moments = _exp_moments(h, order)
    out = {}
    for j in pts:
        others = [nodes[m] for m in pts if m != j]
        denom = float(np.prod([nodes[j] - u for u in others])) if others else 1.0
        coeffs = np.poly(others)[::-1] if others else np.array([1.0])  # ascending powers of u
        out[j] = float(np.exp(lams[n]) * np.dot(coeffs, moments[:len(coeffs)]) / denom)
    return out


def dpmpp_weights(lams: Sequence[float], n: int, order: int) -> Dict[int, float]:
    """{j: J_{n,j}} of DPM-Solver++(2M)'s midpoint update (diffusers): first order D0, or D0 + D1 / 2 with
    D1 = (x_n - x_{n-1}) h / h_prev."""
    h = lams[n + 1] - lams[n]
    base = np.exp(lams[n]) * np.expm1(h)
    if order == 1:
        return {n: float(base)}
    r = h / (lams[n] - lams[n - 1])
    return {n: float(base * (1.0 + 0.5 * r)), n - 1: float(-base * 0.5 * r)}


def solver_weights(lams: Sequence[float], solver: str) -> List[Dict[int, float]]:
    """J_{n,j} of every step n of `solver` on the grid ``lams`` (N + 1 increasing lambdas)."""
    orders = step_orders(len(lams) - 1, solver)
    rule = dpmpp_weights if solver == "dpmpp" else lagrange_weights
    return [rule(lams, n, p) for n, p in enumerate(orders)]


def dmn_objective(lams: Sequence[float], solver: str = "dpmpp", power: float = 1.0,
                  trunc_num: Optional[int] = None) -> float:
    """The DMN objective (step 3 of the module docstring) of the full grid ``lams`` = [lambda_0 .. lambda_N]."""
    lams = np.asarray(lams, dtype=np.float64)
    n_steps = lams.size - 1
    if trunc_num is None:
        trunc_num = 3 if n_steps <= 7 else 0
    w = np.exp(-power * np.logaddexp(0.0, 2.0 * lams) / 2.0) * np.sqrt(1.0 + np.exp(-2.0 * lams))  # sigma^p / alpha
    res, c = 0.0, np.zeros(n_steps + 1)
    for s, weights in enumerate(solver_weights(lams, solver)):
        terms = {j: J * w[j] for j, J in weights.items()}
        if len(terms) == 1:
            res += abs(next(iter(terms.values())))
        elif s < trunc_num:
            res += float(np.sqrt(sum(v * v for v in terms.values())))
        else:
            for j, v in terms.items():
                c[j] += v
    return float(res + np.abs(c).sum())


# ------------------------------------------------------------------------------------------------------ the peer
def dmn_grid(schedule: ContinuousSchedule, nfe: int, *, solver: str = "dpmpp", power: float = 1.0,
             init: str = "logsnr", trunc_num: Optional[int] = None, start_time: Optional[float] = None,
             end_time: float = 0.0, maxiter: int = 1000) -> dict:
    """DMN's grid for `nfe` model evaluations (the sampler then ends at k = -1).

    Returns {"grid": nfe descending integer timesteps, "continuous_times": the optimised fractional ones,
    "lambdas": the N + 1 optimised lambdas (last: the paper's end, k = ``end_time``), "objective_init",
    "objective", "objective_rounded", "rounding_max_shift", "seconds", "settings"}. No model is called.
    """
    from scipy.optimize import LinearConstraint, minimize

    t0 = time.perf_counter()
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}.")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS} (the repository's 'unif' / 'unif_t'), got {init!r}.")
    T = schedule.T
    if not isinstance(nfe, int) or not 1 <= nfe <= T - 1:
        raise ValueError(f"nfe must be an integer in [1, {T - 1}], got {nfe!r}.")
    start = float(T - 1 if start_time is None else start_time)
    if not 0.0 <= end_time < start <= T - 1:
        raise ValueError(f"need 0 <= end_time < start_time <= {T - 1}; got end_time={end_time}, start_time={start}.")
    lam_start, lam_end = (float(v) for v in lambda_of_time(schedule, [start, end_time]))
    if not np.isfinite(lam_start) or not np.isfinite(lam_end):
        raise ValueError("lambda is infinite at start_time or end_time (alpha_bar is 0 or 1 there, e.g. a "
                         "zero-terminal-SNR schedule); pass a start_time / end_time strictly inside the schedule.")
    table = _log_ab_table(schedule)
    if not np.all(np.diff(table) < 0):
        raise ValueError("alpha_bar must decrease strictly in k for lambda <-> k to be invertible.")

    if init == "logsnr":
        lams0 = np.linspace(lam_start, lam_end, nfe + 1)
    else:
        lams0 = lambda_of_time(schedule, np.linspace(start, end_time, nfe + 1))
    settings = {"solver": solver, "power": power, "init": init, "trunc_num": 3 if nfe <= 7 else 0,
                "start_time": start, "end_time": end_time, "method": "scipy trust-constr", "maxiter": maxiter}
    if trunc_num is not None:
        settings["trunc_num"] = int(trunc_num)

    def full(inner):
        return np.concatenate([[lam_start], inner, [lam_end]])

    def objective(inner):
        return dmn_objective(full(inner), solver, power, settings["trunc_num"])

    obj_init = objective(lams0[1:-1])
    if nfe == 1:
        lams, info = lams0, {"nit": 0, "status": 0, "message": "no free time"}
    else:
        m = nfe - 1  # free lambdas; constraints: lambda_1 - lambda_0 >= 0, ..., lambda_N - lambda_{N-1} >= 0
        a = np.zeros((nfe, m))
        for i in range(m):
            a[i, i] += 1.0
            a[i + 1, i] -= 1.0
        lb = np.zeros(nfe)
        lb[0], lb[-1] = lam_start, -lam_end
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy's "delta_grad == 0.0" notes from the quasi-Newton update
            sol = minimize(objective, lams0[1:-1], method="trust-constr",
                           constraints=[LinearConstraint(a, lb, np.full(nfe, np.inf))],
                           options={"verbose": 0, "maxiter": maxiter})
        lams = full(sol.x)
        info = {"nit": int(sol.nit), "status": int(sol.status), "message": str(sol.message)}
        if not np.all(np.diff(lams) > 0) or not np.isfinite(sol.fun):
            raise ValueError(f"the DMN optimisation left an invalid grid {lams.tolist()}; try init='time'.")
    times = time_of_lambda(schedule, lams)
    times[0] = start  # exact at the fixed ends (the inverse interpolation is exact there up to round-off)
    cont = [float(t) for t in times[:-1]]
    grid = round_descending(cont, T)
    rounded = np.concatenate([lambda_of_time(schedule, grid), [lam_end]])
    settings["optimizer"] = info
    return {"grid": grid, "continuous_times": cont, "lambdas": lams.tolist(), "objective_init": obj_init,
            "objective": objective(lams[1:-1]), "objective_rounded": dmn_objective(rounded, solver, power,
                                                                                   settings["trunc_num"]),
            "rounding_max_shift": float(max(abs(g - c) for g, c in zip(grid, cont))),
            "seconds": time.perf_counter() - t0, "settings": settings}


__all__ = ["dmn_grid", "dmn_objective", "solver_weights", "lagrange_weights", "dpmpp_weights", "step_orders",
           "lambda_of_time", "time_of_lambda", "SOLVERS", "INITS"]
