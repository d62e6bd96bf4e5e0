"""Optimisers of the taus, behind two protocols the calibrator calls.

- :class:`StepOptimizer` ``fit_step(problem: StepProblem) -> StepFit``: one tau_i (a scalar) at a time;
- :class:`JointOptimizer` ``fit_all(problem: JointProblem) -> JointFit``: every tuned tau_i at once.

The problems hold what the calibrator knows (losses over the calibration set, mini-batch losses, the process
reduction); the optimisers hold how to search.

This file stays whole (about 320 lines): it is the one job "how taus are searched", the two protocols with their
problem / fit records and the three optimisers implementing them, read together (ReferenceAdam and JointAdam share
the r = tau / t parameterisation); each optimiser alone is under 100 lines.

- :class:`LocalSearch` (default, derivative-free): on a FIXED calibration batch (common random numbers: the same
  states, conditions and step noise for every candidate) start at tau = t_i (r = 1), open a bracket by an expanding
  search (a trust region: at most ``max_shift`` grid spacings away), then refine it with Brent's bounded method
  (``scipy.optimize.minimize_scalar``) to ``xtol`` timestep units. It returns the best point it evaluated, so the
  calibration loss never ends above its value at t_i. Local on purpose (docs/facts.md, 1): a wide
  (global) search lands in other, worse minima on trained networks, whose loss in tau is not unimodal.
- :class:`JointAdam` (beyond the paper): every tau_i at once, by gradient of the endpoint error through the sampler.
- :class:`ReferenceAdam` (the authors' procedure): tau_i = r_i * t_i in continuous time t = (t_disc + 1) / N, i.e.
  ``tau_disc = r (t_disc + 1) - 1``; r_i = 1 initially, Adam(lr 2e-3, betas (0.9, 0.999)) for ``num_steps``
  mini-batches, the gradient flowing through the network w.r.t. its timestep input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Protocol, Sequence, Tuple, runtime_checkable

import torch

OPTIMIZERS = ("local_search", "adam", "adam_joint")


@dataclass
class StepProblem:
    """Fitting tau_j of one step, as the calibrator poses it.

    Attributes:
        t0: the grid time t_i (tau = t0 is untuned).
        spacing: the grid spacing around t_i (the local search's trust-region unit).
        bounds: the model's time range.
        loss: ``loss(tau) -> float``, the mean calibration loss over the whole set (all processes).
        minibatch_loss: ``minibatch_loss(tau, k) -> tensor``, differentiable mean loss of mini-batch k (this
            process's share, divided by the global mini-batch size).
        reduce_grad: sums a gradient over processes.
        backward_samples: samples back-propagated so far by ``minibatch_loss`` (all processes; collective).
    """

    t0: float
    spacing: float
    bounds: Tuple[float, float]
    loss: Callable[[float], float]
    minibatch_loss: Callable[[torch.Tensor, int], torch.Tensor]
    reduce_grad: Callable[[torch.Tensor], torch.Tensor]
    backward_samples: Callable[[], int]


@dataclass
class StepFit:
    """Outcome of fitting one tau_i."""

    tau: float
    loss_before: float  # calibration loss at tau = t_i
    loss_after: float
    evaluations: int  # objective evaluations (each one pass over the calibration set) or Adam iterations
    backward_samples: int = 0  # samples back-propagated (gradient optimisers)


@dataclass
class JointProblem:
    """Fitting tau_0 .. tau_{num_tuned - 1} jointly through the whole sampler (endpoint objective).

    Attributes:
        grid: the grid t_K .. t_1 (untuned taus); steps from ``num_tuned`` on stay untuned.
        num_tuned: how many leading steps are tuned.
        bounds: the model's time range.
        num_minibatches: global mini-batches of the calibration set (iteration k uses k mod this).
        loss: ``loss(taus) -> float``, the mean endpoint error over the calibration set (all processes).
        minibatch_loss: ``minibatch_loss(tuned_taus, k) -> tensor``: differentiable endpoint loss of mini-batch k
            with the first ``num_tuned`` steps fed ``tuned_taus`` (a tensor), the rest their grid times.
        reduce_grad: sums a gradient over processes.
        broadcast: makes a float identical on every process.
        backward_samples: samples back-propagated so far (all processes; collective).
        progress: ``progress(total)`` -> a tqdm-like bar.
    """

    grid: List[float]
    num_tuned: int
    bounds: Tuple[float, float]
    num_minibatches: int
    loss: Callable[[Sequence[float]], float]
    minibatch_loss: Callable[[torch.Tensor, int], torch.Tensor]
    reduce_grad: Callable[[torch.Tensor], torch.Tensor]
    broadcast: Callable[[float], float]
    backward_samples: Callable[[], int]
    progress: Callable[[int], Any]


@dataclass
class JointFit:
    """Outcome of a joint fit: the full table (tuned steps, then the untuned rest) and the run's totals."""

    taus: List[float]
    loss_before: float
    loss_after: float
    evaluations: int
    backward_samples: int


@runtime_checkable
class StepOptimizer(Protocol):
    """Fits one tau_i at a time (the sequential and parallel strategies call it once per step)."""

    name: str

    def settings(self) -> Dict[str, Any]: ...

    def fit_step(self, problem: StepProblem) -> StepFit: ...


@runtime_checkable
class JointOptimizer(Protocol):
    """Fits every tuned tau_i at once (the sequential strategies call it once per step count)."""

    name: str

    def settings(self) -> Dict[str, Any]: ...

    def fit_all(self, problem: JointProblem) -> JointFit: ...


class LocalSearch:
    """Bounded local 1-D search around t_i (see module docstring).

    Args:
        xtol: final bracket width in timestep units.
        initial_step: first trial offset, as a fraction of the grid spacing around t_i.
        max_shift: trust region: |tau - t_i| <= max_shift * spacing.
        max_evaluations: hard cap of objective evaluations per step.
        min_improvement: keep tau = t_i unless the loss drops by more than this fraction of its value at t_i.
    """

    name = "local_search"

    def __init__(self, xtol: float = 0.5, initial_step: float = 0.05, max_shift: float = 1.0,
                 max_evaluations: int = 30, min_improvement: float = 1e-4):
        if xtol <= 0 or initial_step <= 0 or max_shift <= 0 or max_evaluations < 3:
            raise ValueError("LocalSearch needs xtol > 0, initial_step > 0, max_shift > 0 and max_evaluations >= 3.")
        self.xtol = float(xtol)
        self.initial_step = float(initial_step)
        self.max_shift = float(max_shift)
        self.max_evaluations = int(max_evaluations)
        self.min_improvement = float(min_improvement)

    def settings(self) -> Dict[str, float]:
        return {"xtol": self.xtol, "initial_step": self.initial_step, "max_shift": self.max_shift,
                "max_evaluations": self.max_evaluations, "min_improvement": self.min_improvement}

    def fit_step(self, problem: StepProblem) -> StepFit:
        return self.minimize(problem.loss, problem.t0, problem.spacing, problem.bounds)

    def minimize(self, f: Callable[[float], float], t0: float, spacing: float, bounds: Tuple[float, float]) -> StepFit:
        """Minimise ``f(tau)`` near ``t0``; ``spacing``: the grid spacing at t_i; ``bounds``: the model's range."""
        lo = max(bounds[0], t0 - self.max_shift * spacing)
        hi = min(bounds[1], t0 + self.max_shift * spacing)
        cache: Dict[float, float] = {}

        def g(tau: float) -> float:
            tau = float(min(max(tau, lo), hi))
            key = round(tau, 6)
            if key not in cache:
                if len(cache) >= self.max_evaluations:
                    return math.inf  # budget spent: never chosen, stops the search
                cache[key] = float(f(tau))
            return cache[key]

        f0 = g(t0)
        h = max(self.initial_step * spacing, self.xtol)
        a, b = self._bracket(g, t0, f0, h, lo, hi)
        if b - a > self.xtol and len(cache) < self.max_evaluations:
            from scipy.optimize import minimize_scalar

            minimize_scalar(g, bounds=(a, b), method="bounded",
                            options={"xatol": self.xtol, "maxiter": self.max_evaluations})
        best = min(cache.items(), key=lambda kv: (kv[1], abs(kv[0] - t0)))
        if best[1] >= f0 - self.min_improvement * abs(f0):  # a flat objective: round-off must not move tau
            best = (t0, f0)
        return StepFit(best[0], f0, best[1], len(cache))

    @staticmethod
    def _bracket(g, t0, f0, h, lo, hi) -> Tuple[float, float]:
        """Expanding search from t0: returns [a, b] holding a local minimum (or reaching the trust region's edge)."""
        fp, fm = g(t0 + h), g(t0 - h)
        if f0 <= fp and f0 <= fm:
            return max(lo, t0 - h), min(hi, t0 + h)
        d = 1.0 if fp < fm else -1.0
        prev, cur, fcur = t0, t0 + d * h, min(fp, fm)
        while True:
            h *= 2.0
            nxt = min(max(t0 + d * h, lo), hi)
            if nxt == cur:  # at the trust region's edge
                return (min(prev, cur), max(prev, cur)) if d > 0 else (min(cur, prev), max(cur, prev))
            fn = g(nxt)
            if fn >= fcur or math.isinf(fn):
                return min(prev, nxt), max(prev, nxt)
            prev, cur, fcur = cur, nxt, fn


class ReferenceAdam:
    """The reference code's optimiser for one r_i (see module docstring).

    Args:
        num_steps: Adam iterations (mini-batches) per tuned step; the reference uses 500.
        lr, betas: Adam's settings (reference: 2e-3, (0.9, 0.999)).
    """

    name = "adam"

    def __init__(self, num_steps: int = 500, lr: float = 2e-3, betas=(0.9, 0.999)):
        if num_steps < 1 or lr <= 0:
            raise ValueError("ReferenceAdam needs num_steps >= 1 and lr > 0.")
        self.num_steps = int(num_steps)
        self.lr = float(lr)
        self.betas = tuple(float(b) for b in betas)

    def settings(self) -> Dict[str, float]:
        return {"num_steps": self.num_steps, "lr": self.lr, "betas": list(self.betas),
                "parameterisation": "tau_disc = r * (t_disc + 1) - 1, r init 1"}

    @staticmethod
    def tau_of(r: torch.Tensor, t0: float) -> torch.Tensor:
        # tau_cont = r * t_cont with t_cont = (t_disc + 1) / N  =>  tau_disc = r * (t_disc + 1) - 1.
        return r * (t0 + 1.0) - 1.0

    def fit_step(self, problem: StepProblem) -> StepFit:
        loss_before = problem.loss(problem.t0)
        tau = self.minimize(problem.minibatch_loss, problem.reduce_grad, problem.t0, problem.bounds)
        loss_after = problem.loss(tau)
        return StepFit(tau, loss_before, loss_after, self.num_steps, problem.backward_samples())

    def minimize(self, minibatch_loss: Callable[[torch.Tensor, int], torch.Tensor],
                 reduce_grad: Callable[[torch.Tensor], torch.Tensor], t0: float,
                 bounds: Tuple[float, float]) -> float:
        """``minibatch_loss(tau, k)`` returns the differentiable mean loss of mini-batch k (this process's share,
        already divided by the global mini-batch size); ``reduce_grad`` sums a gradient over processes.
        Returns the final tau."""
        r = torch.ones((), dtype=torch.float32, requires_grad=True)
        opt = torch.optim.Adam([r], lr=self.lr, betas=self.betas)
        for k in range(self.num_steps):
            opt.zero_grad(set_to_none=True)
            tau = self.tau_of(r, t0)
            loss = minibatch_loss(tau, k)
            loss.backward()
            r.grad = reduce_grad(r.grad.detach().clone())
            opt.step()
            with torch.no_grad():  # keep tau inside the model's time range
                r.clamp_(min=(bounds[0] + 1.0) / (t0 + 1.0), max=(bounds[1] + 1.0) / (t0 + 1.0))
        return float(self.tau_of(r.detach(), t0))


class JointAdam:
    """All tau_i at once by gradient through the whole sampler (beyond the paper; ``objective="endpoint"`` only).

    Same parameterisation as :class:`ReferenceAdam` (one r_i per tuned step, r = 1 initially); each iteration rolls
    one mini-batch of calibration x_T through every step with the network fed tau_i(r_i), compares the final sample
    with the teacher's and back-propagates through all network calls and ``scheduler.step`` updates.

    Args:
        num_steps: Adam iterations (mini-batches).
        lr, betas: Adam's settings.
    """

    name = "adam_joint"

    def __init__(self, num_steps: int = 200, lr: float = 5e-3, betas=(0.9, 0.999)):
        if num_steps < 1 or lr <= 0:
            raise ValueError("JointAdam needs num_steps >= 1 and lr > 0.")
        self.num_steps = int(num_steps)
        self.lr = float(lr)
        self.betas = tuple(float(b) for b in betas)

    def settings(self) -> Dict[str, float]:
        return {"num_steps": self.num_steps, "lr": self.lr, "betas": list(self.betas),
                "parameterisation": "tau_disc = r * (t_disc + 1) - 1 per step, r init 1, all steps jointly"}


    def fit_all(self, problem: JointProblem) -> JointFit:
        last, grid = problem.num_tuned, problem.grid
        t0 = torch.tensor(grid[:last], dtype=torch.float32)
        r = torch.ones(last, dtype=torch.float32, requires_grad=True)
        adam = torch.optim.Adam([r], lr=self.lr, betas=self.betas)
        lo = (problem.bounds[0] + 1.0) / (t0 + 1.0)
        hi = (problem.bounds[1] + 1.0) / (t0 + 1.0)
        loss_before = problem.loss(list(grid))
        bar = problem.progress(self.num_steps)
        for k in range(self.num_steps):
            adam.zero_grad(set_to_none=True)
            tau = r * (t0 + 1.0) - 1.0  # tau_disc = r (t_disc + 1) - 1, as ReferenceAdam
            loss = problem.minibatch_loss(tau, k)
            loss.backward()
            r.grad = problem.reduce_grad(r.grad.detach().clone())
            adam.step()
            with torch.no_grad():
                r.copy_(torch.maximum(torch.minimum(r, hi), lo))
            bar.update(1)
        bar.close()
        tuned = [problem.broadcast(float(v)) for v in (r.detach() * (t0 + 1.0) - 1.0)] + list(grid[last:])
        loss_after = problem.loss(tuned)
        return JointFit(tuned, loss_before, loss_after, self.num_steps, problem.backward_samples())


def get_optimizer(name_or_obj, **kwargs):
    """An optimiser by name (``kwargs`` go to its constructor), or an instance implementing a protocol."""
    if not isinstance(name_or_obj, str):
        if not isinstance(name_or_obj, (StepOptimizer, JointOptimizer)):
            raise ValueError(f"optimizer {name_or_obj!r} implements neither fit_step(problem) (StepOptimizer) nor "
                             f"fit_all(problem) (JointOptimizer): pass one of {', '.join(OPTIMIZERS)} or such an "
                             "object.")
        return name_or_obj
    if name_or_obj == "local_search":
        return LocalSearch(**kwargs)
    if name_or_obj == "adam":
        return ReferenceAdam(**kwargs)
    if name_or_obj == "adam_joint":
        return JointAdam(**kwargs)
    raise ValueError(f"Unknown optimizer {name_or_obj!r}: choose one of {', '.join(OPTIMIZERS)}.")
