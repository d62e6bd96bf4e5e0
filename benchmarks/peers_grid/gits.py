"""GITS: the time schedule by dynamic programming over a teacher trajectory.

Chen, Zhou, Ye, Lyu, Wang, Wang, Chen, "On the Trajectory Regularity of ODE-based Diffusion Sampling", ICML 2024;
public code github.com/zju-pi/diff-sampler (``gits-main``). Written here from the paper and the repository's
description of it (no code copied):

1. A fine grid of ``num_steps_tea`` timestamps (the repository's recommended 61; for models trained on discrete
   timesteps its ``discrete`` schedule with rho = 1, i.e. uniform in the training timestep) and a teacher solver on it
   (iPNDM, fourth-order multistep Adams-Bashforth on the noise prediction in the EDM variables y = x / alpha,
   sigma = sqrt(1 - alpha_bar) / sqrt(alpha_bar)) run from ``num_warmup`` warm-up samples (repository default 256).
2. A cost matrix c[i, j] (i < j on the fine grid): the batch mean of ||y_j - (y_i + (sigma_j - sigma_i) d_i)||_2,
   the error of one Euler (= DDIM) step from the teacher's state i to timestamp j, using the teacher's own direction
   d_i (so the matrix costs no extra model evaluation). The repository also offers an L1 and a trajectory-deviation
   metric; the paper's L2 is used here.
3. Dynamic programming: V[i, 1] = c[i, last], V[j, k] = min_{i > j} c[j, i] + coeff * V[i, k - 1] with the cost
   coefficient ``coeff`` (repository default 1.15), and the path with K steps from the first to the last timestamp
   (first minimiser on ties).

The K + 1 chosen timestamps are the grid [t_K, ..., t_1, t_0]; the model is evaluated at the first K, the last is the
sampler's end. The grid does not depend on the student solver, so it is shared by DDIM and DPM-Solver++ (GITS also
applies one DP schedule to several solvers).
"""

from __future__ import annotations

from typing import Callable, List, Sequence

import numpy as np
import torch

from .continuous import FINAL_TIME, ContinuousSchedule

IPNDM_COEFFS = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def fine_grid(num_steps_tea: int, num_train_timesteps: int = 1000) -> List[int]:
    """``num_steps_tea`` integer timestamps, uniform in the training timestep from T - 1 down to the end state -1."""
    if num_steps_tea < 3:
        raise ValueError(f"num_steps_tea must be >= 3, got {num_steps_tea}.")
    grid = [int(round(v)) for v in np.linspace(num_train_timesteps - 1, FINAL_TIME, num_steps_tea)]
    if len(set(grid)) != len(grid):
        raise ValueError(f"num_steps_tea={num_steps_tea} is too fine for {num_train_timesteps} timesteps.")
    return grid


def _sigma(schedule: ContinuousSchedule, k) -> torch.Tensor:
    a, s = schedule.alpha_sigma(torch.tensor(float(k)))
    return s / a


@torch.no_grad()
def teacher_trajectory(model: Callable, x_T: torch.Tensor, grid: Sequence[int], schedule: ContinuousSchedule,
                       max_order: int = 4):
    """iPNDM on `grid` from x_T: (states y_i = x_i / alpha_i, directions d_i = eps_i), both (len(grid), B, ...) and
    (len(grid) - 1, B, ...), float64."""
    ys, ds, history = [], [], []
    a0, s0 = schedule.alpha_sigma(torch.tensor(float(grid[0])))
    y = x_T.to(torch.float64) / a0  # x_T is the sampler's initial state (alpha_T x_0 + sigma_T eps ~ N(0, 1))
    ys.append(y)
    for i in range(len(grid) - 1):
        a_i, _ = schedule.alpha_sigma(torch.tensor(float(grid[i])))
        eps = model((y * a_i).to(x_T.dtype), torch.tensor(float(grid[i]))).to(torch.float64)
        ds.append(eps)
        history = [eps] + history[: max_order - 1]
        coeffs = IPNDM_COEFFS[len(history)]
        d = sum(c * h for c, h in zip(coeffs, history))
        y = y + (_sigma(schedule, grid[i + 1]) - _sigma(schedule, grid[i])) * d
        ys.append(y)
    return torch.stack(ys), torch.stack(ds)


def cost_matrix(ys: torch.Tensor, ds: torch.Tensor, grid: Sequence[int], schedule: ContinuousSchedule) -> np.ndarray:
    """c[i, j] = mean_b ||y_j - (y_i + (sigma_j - sigma_i) d_i)||_2 for i < j (inf elsewhere)."""
    n = len(grid)
    sig = [float(_sigma(schedule, k)) for k in grid]
    cost = np.full((n, n), np.inf)
    for i in range(n - 1):
        for j in range(i + 1, n):
            pred = ys[i] + (sig[j] - sig[i]) * ds[i]
            cost[i, j] = float((pred - ys[j]).flatten(1).norm(dim=1).mean())
    return cost


def dp_path(cost: np.ndarray, num_steps: int, coeff: float = 1.15) -> List[int]:
    """Indices [0, ..., n - 1] of the `num_steps`-step path minimising c[p0, p1] + coeff c[p1, p2] + coeff^2 ...

    (the recursion V[j, k] = min_i c[j, i] + coeff V[i, k - 1] of GITS). Ties go to the smallest index."""
    n = cost.shape[0]
    if cost.shape != (n, n):
        raise ValueError(f"cost must be square, got shape {cost.shape}.")
    if not 1 <= num_steps <= n - 1:
        raise ValueError(f"num_steps must be in [1, {n - 1}] for {n} timestamps, got {num_steps}.")
    V = np.full((n, num_steps + 1), np.inf)
    choice = np.full((n, num_steps + 1), -1, dtype=np.int64)
    V[:, 1] = cost[:, n - 1]
    choice[:, 1] = n - 1
    for k in range(2, num_steps + 1):
        for j in range(n - 1):
            candidates = cost[j, j + 1:n - 1] + coeff * V[j + 1:n - 1, k - 1]
            if candidates.size == 0:
                continue
            best = int(np.argmin(candidates))
            V[j, k] = candidates[best]
            choice[j, k] = j + 1 + best
    path, w = [0], 0
    for k in range(num_steps, 0, -1):
        w = int(choice[w, k])
        if w < 0:
            raise ValueError("no path with that many steps on this cost matrix.")
        path.append(w)
    return path


def gits_grid(model: Callable, x_warmup: torch.Tensor, nfe: int, schedule: ContinuousSchedule, *,
              num_steps_tea: int = 61, coeff: float = 1.15, batch_size: int = 256) -> dict:
    """GITS's grid for `nfe` steps: {"grid": [t_K..t_1] (integers), "path", "fine_grid", "teacher_evaluations"}."""
    grid = fine_grid(num_steps_tea, schedule.T)
    cost = np.zeros((num_steps_tea, num_steps_tea))
    n = x_warmup.shape[0]
    for start in range(0, n, batch_size):
        ys, ds = teacher_trajectory(model, x_warmup[start:start + batch_size], grid, schedule)
        part = x_warmup[start:start + batch_size].shape[0]
        cost = cost + cost_matrix(ys, ds, grid, schedule) * (part / n)
    path = dp_path(cost, nfe, coeff)
    times = [grid[p] for p in path]
    return {"grid": times[:-1], "end": times[-1], "path": path, "fine_grid": grid,
            "teacher_evaluations": n * (num_steps_tea - 1)}
