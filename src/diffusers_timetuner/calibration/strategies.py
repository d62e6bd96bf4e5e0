"""Calibration strategies: where the states x~_{t_i} that tau_i is fitted on come from.

- ``sequential`` (Algorithm 1): x~_T = alpha_T x_0 + sigma_T eps from data, then the already tuned steps
  tau_K .. tau_{i+1} are run to reach x~_{t_i}; i = K .. 1. States are cached, so fitting tau_i costs only
  evaluations of step i (and, for ``endpoint``, the remaining roll-out).
- ``data_free`` (beyond the paper): the same, with x_T ~ N(0, I) as at inference; no images needed.
- ``parallel`` (eq. 11): x_{t_i} = alpha_{t_i} x_0 + sigma_{t_i} eps directly from data; every tau_i is independent.
  Only for one-step solvers (a multistep solver's history is not defined there) and the per-step paper objectives.

The sequential strategies checkpoint after every step and, with ``guard=True``, end by keeping the prefix of the tuned
table (steps K .. k tuned, the rest untuned) with the lowest validation error among those that beat the untuned
sampler by more than ``guard_margin`` paired standard errors on a separate validation set (fresh x_T, teacher's
final samples), or none. The validation error is the endpoint MSE to the teacher for deterministic samplers and the
energy distance to the teacher's samples for stochastic ones (``validation_metric``).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..denoiser import slice_conditioning
from ..sampling import init_noise_sigma
from .distributed import Distributed
from .objectives import Objective, Teacher, per_sample_sq
from .report import StepRecord, metric_value, paired_change
from .rollout import ChunkState, Rollout

STRATEGIES = ("sequential", "data_free", "parallel")
VALIDATION_METRICS = ("endpoint_mse", "energy_distance")


@dataclass
class CalibrationSet:
    """A global set of calibration (or validation) samples, identical on every process.

    Args:
        noise: eps (or x_T noise), shape (N, *sample_shape).
        cond: batch-first network inputs for the N samples, or None.
        x0: data samples (N, *sample_shape) for the data-based strategies, or None.
    """

    noise: torch.Tensor
    cond: Optional[Dict[str, Any]] = None
    x0: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.noise.shape[0]


@dataclass
class StepCountJob:
    """Everything a strategy needs to calibrate one step count n."""

    rollout: Rollout
    objective: Objective
    optimizer: Any
    dist: Distributed
    calib: CalibrationSet
    batch_size: int
    seed: int
    bounds: tuple
    teacher: Optional[Teacher] = None
    validation: Optional[CalibrationSet] = None
    guard: bool = True
    checkpoint: Any = None
    log: Callable[[str], None] = print
    progress: bool = False
    validation_metric: str = "endpoint_mse"
    guard_margin: float = 2.0
    records: List[StepRecord] = field(default_factory=list)

    @property
    def n(self) -> int:
        return self.rollout.num_inference_steps


# ---------------------------------------------------------------------------------------------------- helpers
def _chunks(job: StepCountJob, cset: CalibrationSet, from_data: bool, seed: int,
            teacher: bool) -> Dict[int, ChunkState]:
    """This process's share of ``cset`` as cached states at x_T, keyed by global mini-batch index."""
    r = job.rollout
    chunks = {}
    for c, idx in enumerate(job.dist.shard(len(cset), job.batch_size)):
        noise = cset.noise[idx]
        x_T = r.data_to_state(cset.x0[idx], noise, 0) if from_data else r.noise_to_state(noise)
        cond = slice_conditioning(cset.cond, idx)
        extras = {"x0": cset.x0[idx].to(r.device)} if cset.x0 is not None else {}
        extras["rows"] = idx  # global sample indices (to gather whole sets for the energy distance)
        state = r.initial_state(x_T, cond, seed=seed * 1_000_003 + int(idx[0]), **extras)
        if teacher:
            state.extras["teacher_states"] = job.teacher.targets(
                x_T, float(init_noise_sigma(r.scheduler)), cond, r.grid_list
            )
        chunks[c] = state
    return chunks


def _spacing(grid: Sequence[float], j: int) -> float:
    """Grid spacing around t_i = grid[j] (the trust region's unit)."""
    gaps = [abs(grid[j] - grid[k]) for k in (j - 1, j + 1) if 0 <= k < len(grid)]
    return max(min(gaps) if gaps else 1.0, 1.0)


def _mean_loss(job: StepCountJob, chunks, tau, taus, num_samples: int) -> float:
    with torch.no_grad():
        local = sum((job.objective.losses(job.rollout, s, tau, taus).sum() for s in chunks.values()),
                    torch.zeros((), dtype=torch.float64))
    return float(job.dist.sum(local)) / num_samples


def _endpoint_error(job: StepCountJob, chunks, taus, num_samples: int) -> float:
    """Mean squared distance of the final samples to the teacher's, from the cached states with ``taus``."""
    with torch.no_grad():
        local = torch.zeros((), dtype=torch.float64)
        for s in chunks.values():
            final = job.rollout.run(s, taus)
            local = local + per_sample_sq(final.x, s.extras["teacher_states"][-1]).sum()
    return float(job.dist.sum(local)) / num_samples


def _validation_outputs(job: StepCountJob, chunks, taus, num_samples: int) -> torch.Tensor:
    """Per validation sample (all processes): the squared endpoint error to the teacher's final sample
    (``endpoint_mse``; shape (N,)) or the final sample itself (``energy_distance``; shape (N, *sample_shape))."""
    shape = () if job.validation_metric == "endpoint_mse" else tuple(job.validation.noise.shape[1:])
    out = torch.zeros((num_samples, *shape), dtype=torch.float64)  # this process's rows; zeros elsewhere
    with torch.no_grad():
        for s in chunks.values():
            final = job.rollout.run(s, taus).x
            if shape:
                out[s.extras["rows"]] = final.detach().double().cpu()
            else:
                out[s.extras["rows"]] = per_sample_sq(final, s.extras["teacher_states"][-1]).double().cpu()
    return job.dist.sum(out)


def _teacher_finals(job: StepCountJob, chunks, num_samples: int) -> torch.Tensor:
    out = torch.zeros((num_samples, *job.validation.noise.shape[1:]), dtype=torch.float64)
    for s in chunks.values():
        out[s.extras["rows"]] = s.extras["teacher_states"][-1].detach().double().cpu()
    return job.dist.sum(out)


def _clearly_better(job: StepCountJob, change: float, se: float) -> bool:
    """The guard's rule: a table counts as better only when it beats untuned by more than ``guard_margin`` SE."""
    return change < 0 and -change > job.guard_margin * se


def _forward_backward(job: StepCountJob) -> tuple:
    d = job.rollout.denoiser
    # (forward samples over all processes, 0): nothing sets a backward count on the denoiser; the Adam loops count theirs
    return int(job.dist.sum(torch.tensor(float(d.num_forward_samples)))), 0


# ---------------------------------------------------------------------------------------------------- strategies
class SequentialStrategy:
    """Algorithm 1 (``from_data=True``) or its data-free variant: tau_K, ..., tau_1 one after another."""

    def __init__(self, from_data: bool = True):
        self.from_data = from_data
        self.name = "sequential" if from_data else "data_free"

    def run(self, job: StepCountJob) -> List[float]:
        r, n, obj = job.rollout, job.n, job.objective
        grid = r.grid_list
        taus = list(grid)  # untuned: tau_i = t_i
        chunks = _chunks(job, job.calib, self.from_data, job.seed, obj.needs_teacher)
        val = None
        if job.guard and job.validation is not None:
            val = _chunks(job, job.validation, False, job.seed + 1, True)
        evals = r.num_evaluations  # n, or 2n - 1 for Heun (one tau per model evaluation)
        last = evals if obj.tunes_last_step else evals - 1  # the paper never tunes the last step (t_1 -> t_0)
        if getattr(job.optimizer, "joint", False):
            return _run_joint(job, chunks, val, taus, last)

        start = 0
        snaps: List[Dict[int, ChunkState]] = []  # validation states before each step (for the final guard)

        def advance_validation(j: int) -> None:
            if val is not None:
                snaps.append({c: _snapshot(st) for c, st in val.items()})
                for st in val.values():
                    r.step(st, taus[j], keep=True)

        saved = job.checkpoint.load(n) if job.checkpoint is not None else None
        if saved is not None:
            start = int(saved["next_step"])
            taus[:start] = [float(t) for t in saved["taus"][:start]]
            job.records[:] = [StepRecord(**rec) for rec in saved["records"]]
            for j in range(start):  # recompute the cached states: same seeds, same ops, same numbers
                for st in chunks.values():
                    r.step(st, taus[j], keep=True)
                advance_validation(j)
            job.log(f"n={n}: resumed after {start} tuned steps from {job.checkpoint.path(n)}")

        bar = _bar(job, last, start)
        for j in range(start, last):
            t0 = grid[j]
            fwd0, _ = _forward_backward(job)
            tick = time.perf_counter()
            for st in chunks.values():
                obj.prepare_step(r, st)
            fit_tau, loss_before, loss_after, evals, bwd = _fit_step(job, chunks, j, t0, taus, grid)
            taus[j] = job.dist.broadcast_float(fit_tau)  # identical decision on every process
            for st in chunks.values():
                r.step(st, taus[j], keep=True)
            advance_validation(j)
            fwd1, _ = _forward_backward(job)
            job.records.append(StepRecord(
                step=j, t=t0, tau=taus[j], proposed_tau=taus[j], kept=True, loss_before=loss_before,
                loss_after=loss_after, objective_evaluations=evals, forward_samples=fwd1 - fwd0,
                backward_samples=bwd, seconds=time.perf_counter() - tick,
            ))
            job.log(f"n={n} step {j}: t={t0:g} tau={taus[j]:.2f} loss {loss_before:.5g} -> {loss_after:.5g} "
                    f"({evals} evaluations, {fwd1 - fwd0} forward samples, {time.perf_counter() - tick:.1f} s)")
            if job.checkpoint is not None:
                job.checkpoint.save(n, {"next_step": j + 1, "taus": taus[: j + 1],
                                        "records": [rec.to_dict() for rec in job.records]})
            bar.update(1)
            bar.set_postfix(t=f"{t0:g}", tau=f"{taus[j]:.2f}")
        bar.close()
        if val is not None:
            taus = _guard_prefix(job, val, snaps, taus, grid, last)
        return taus


def _snapshot(state: ChunkState) -> ChunkState:
    return ChunkState(state.x, copy.deepcopy(state.scheduler), state.j, state.cond, state.seed, dict(state.extras))


def _guard_prefix(job: StepCountJob, val, snaps, taus, grid, last) -> List[float]:
    """Never ship a table that is worse than no table on the validation set.

    Candidates: the prefix tables "tau_K .. tau_{k+1} tuned, the rest untuned" for k = 0 .. (all tuned). A prefix is
    judged as a whole (later tuned steps may compensate an earlier one, which a per-step check with the rest untuned
    would wrongly refuse: measured on the MNIST UNet, teacher_local's first step alone doubles the validation error,
    the full table lowers it). Kept: the prefix with the lowest validation error among those that beat untuned by
    more than ``guard_margin`` paired standard errors (the full table on ties), else none (tau = t).
    """
    num = len(job.validation)
    outputs = []
    for k in range(last + 1):
        trial = list(taus[:k]) + list(grid[k:])
        states = snaps[k] if k < last else val  # val states are at the end already
        outputs.append(_validation_outputs(job, states, trial, num))
    teacher = None if job.validation_metric == "endpoint_mse" else _teacher_finals(job, val, num)
    errors = [metric_value(job.validation_metric, o, teacher) for o in outputs]
    changes = [(0.0, 0.0)] + [paired_change(job.validation_metric, o, outputs[0], teacher) for o in outputs[1:]]
    # Keep the lowest-error prefix among those clearly better than untuned (the full table on ties), else none:
    # picking the minimum of n + 1 noisy estimates would otherwise ship tables that are better by chance.
    eligible = [k for k in range(1, last + 1) if _clearly_better(job, *changes[k])]
    best = min(eligible, key=lambda k: (errors[k], -k)) if eligible else 0
    for rec in job.records:
        rec.validation_before, rec.validation_after = errors[0], errors[best]
        if rec.step >= best:
            rec.kept, rec.tau, rec.loss_after = False, rec.t, rec.loss_before
    if best < last:
        change, se = changes[-1]
        job.log(f"n={job.n}: validation guard keeps only the first {best} tuned step(s) ({job.validation_metric}: "
                f"untuned {errors[0]:.4g}, full table {errors[-1]:.4g} ({change:+.3g} +/- {se:.2g} SE), "
                f"kept {errors[best]:.4g}; a table must beat untuned by > {job.guard_margin:g} SE).")
    return list(taus[:best]) + list(grid[best:])


def _fit_step(job, chunks, j, t0, taus, grid):
    """Fit tau_j on the cached states; returns (tau, loss_before, loss_after, evaluations, backward_samples)."""
    opt, num = job.optimizer, len(job.calib)

    def f(tau: float) -> float:
        trial = list(taus)
        trial[j] = tau
        return _mean_loss(job, chunks, tau, trial, num)

    if not getattr(opt, "uses_gradient", False):
        fit = opt.minimize(f, t0, _spacing(grid, j), job.bounds)
        return fit.tau, fit.loss_before, fit.loss_after, fit.evaluations, 0
    return _fit_adam(job, chunks, j, t0, taus, f)


def _fit_adam(job, chunks, j, t0, taus, f):
    """The reference optimiser: Adam on r_j over mini-batches of the cached calibration states."""
    num_global_chunks = -(-len(job.calib) // job.batch_size)
    counter = {"backward": 0}
    d = job.rollout.denoiser

    def minibatch_loss(tau: torch.Tensor, k: int) -> torch.Tensor:
        c = k % num_global_chunks
        size = min(job.batch_size, len(job.calib) - c * job.batch_size)
        state = chunks.get(c)
        if state is None:  # this process holds no row of mini-batch c
            return tau * 0.0
        before = d.num_forward_samples
        trial = list(taus)
        with torch.enable_grad():
            loss = job.objective.losses(job.rollout, state, tau, trial).sum() / size
        counter["backward"] += d.num_forward_samples - before
        return loss

    def reduce_grad(g: torch.Tensor) -> torch.Tensor:
        return job.dist.sum(g).to(torch.float32)

    loss_before = f(t0)
    tau, _history = job.optimizer.minimize(minibatch_loss, reduce_grad, t0, job.bounds)
    loss_after = f(tau)
    backward = int(job.dist.sum(torch.tensor(float(counter["backward"]))))
    return tau, loss_before, loss_after, job.optimizer.num_steps, backward


def _run_joint(job: StepCountJob, chunks, val, taus, last) -> List[float]:
    """All taus jointly by Adam on r through the whole sampler (endpoint objective); guarded as a whole."""
    r_mod, opt_cfg, d = job.rollout, job.optimizer, job.rollout.denoiser
    grid = r_mod.grid_list
    t0 = torch.tensor(grid[:last], dtype=torch.float32)
    r = torch.ones(last, dtype=torch.float32, requires_grad=True)
    adam = torch.optim.Adam([r], lr=opt_cfg.lr, betas=opt_cfg.betas)
    lo = (job.bounds[0] + 1.0) / (t0 + 1.0)
    hi = (job.bounds[1] + 1.0) / (t0 + 1.0)
    num_global_chunks = -(-len(job.calib) // job.batch_size)
    tick, fwd0 = time.perf_counter(), _forward_backward(job)[0]
    loss_before = _endpoint_error(job, chunks, taus, len(job.calib))
    backward = 0
    bar = _bar(job, opt_cfg.num_steps, 0)
    for k in range(opt_cfg.num_steps):
        c = k % num_global_chunks
        size = min(job.batch_size, len(job.calib) - c * job.batch_size)
        adam.zero_grad(set_to_none=True)
        tau = r * (t0 + 1.0) - 1.0  # tau_disc = r (t_disc + 1) - 1, as ReferenceAdam
        state = chunks.get(c)
        if state is None:
            loss = (r * 0.0).sum()
        else:
            before = d.num_forward_samples
            with torch.enable_grad():
                trial = list(tau) + [torch.tensor(t) for t in grid[last:]]
                final = r_mod.run(state, trial)
                loss = per_sample_sq(final.x, state.extras["teacher_states"][-1]).sum() / size
            backward += d.num_forward_samples - before
        loss.backward()
        r.grad = job.dist.sum(r.grad.detach().clone()).to(torch.float32)
        adam.step()
        with torch.no_grad():
            r.copy_(torch.maximum(torch.minimum(r, hi), lo))
        bar.update(1)
    bar.close()
    tuned = [job.dist.broadcast_float(float(v)) for v in (r.detach() * (t0 + 1.0) - 1.0)] + grid[last:]
    loss_after = _endpoint_error(job, chunks, tuned, len(job.calib))
    kept = True
    if val is not None:
        num = len(job.validation)
        before, after = _validation_outputs(job, val, taus, num), _validation_outputs(job, val, tuned, num)
        teacher = None if job.validation_metric == "endpoint_mse" else _teacher_finals(job, val, num)
        metric = job.validation_metric
        before_val, after_val = metric_value(metric, before, teacher), metric_value(metric, after, teacher)
        kept = _clearly_better(job, *paired_change(metric, after, before, teacher))
        if not kept:
            job.log(f"n={job.n}: the jointly tuned table does not beat untuned by > {job.guard_margin:g} SE on the "
                    f"validation {job.validation_metric} "
                    f"({before_val:.4g} -> {after_val:.4g}); keeping tau = t.")
    final_taus = tuned if kept else list(taus)
    fwd = _forward_backward(job)[0] - fwd0
    backward = int(job.dist.sum(torch.tensor(float(backward))))
    for j in range(last):  # one record per step; the run's totals are attributed to step 0
        job.records.append(StepRecord(
            step=j, t=grid[j], tau=final_taus[j], proposed_tau=tuned[j], kept=kept, loss_before=loss_before,
            loss_after=loss_after if kept else loss_before, objective_evaluations=opt_cfg.num_steps if j == 0 else 0,
            forward_samples=fwd if j == 0 else 0, backward_samples=backward if j == 0 else 0,
            seconds=time.perf_counter() - tick if j == 0 else 0.0,
        ))
    return final_taus


class ParallelStrategy:
    """Eq. 11: every tau_i fitted on x_{t_i} = alpha_{t_i} x_0 + sigma_{t_i} eps, independently of the others."""

    name = "parallel"

    def run(self, job: StepCountJob) -> List[float]:
        r, n, obj = job.rollout, job.n, job.objective
        order = int(getattr(r.scheduler.config, "solver_order", 1) or 1)
        if r.num_evaluations != n:
            raise ValueError(f"The parallel strategy needs one model evaluation per step; {type(r.scheduler).__name__} "
                             "makes two. Use strategy='sequential' or 'data_free'.")
        if order > 1:
            raise ValueError(
                f"The parallel strategy needs a one-step solver, but {type(r.scheduler).__name__} has solver_order="
                f"{order} (its history before step i is not defined by eq. 11). Use strategy='sequential' or "
                "solver_order=1."
            )
        grid = r.grid_list
        taus = list(grid)
        bar = _bar(job, n - 1, 0)
        for j in range(n - 1):
            t0 = grid[j]
            fwd0, _ = _forward_backward(job)
            tick = time.perf_counter()
            # fresh (x_0, eps) pairs per step, identical on every process (seeded by step)
            g = torch.Generator().manual_seed(job.seed * 7919 + j)
            noise = torch.randn(job.calib.x0.shape, generator=g)
            chunks = {}
            for c, idx in enumerate(job.dist.shard(len(job.calib), job.batch_size)):
                x_t = r.data_to_state(job.calib.x0[idx], noise[idx], j)
                cond = slice_conditioning(job.calib.cond, idx)
                state = ChunkState(x_t, r.grid_state_scheduler(j), j, cond, job.seed * 1_000_003 + int(idx[0]),
                                   {"x0": job.calib.x0[idx].to(r.device)})
                obj.prepare_step(r, state)
                chunks[c] = state
            fit_tau, loss_before, loss_after, evals, bwd = _fit_step(job, chunks, j, t0, taus, grid)
            taus[j] = job.dist.broadcast_float(fit_tau)
            fwd1, _ = _forward_backward(job)
            job.records.append(StepRecord(
                step=j, t=t0, tau=taus[j], proposed_tau=taus[j], kept=True, loss_before=loss_before,
                loss_after=loss_after, objective_evaluations=evals, forward_samples=fwd1 - fwd0,
                backward_samples=bwd, seconds=time.perf_counter() - tick,
            ))
            bar.update(1)
        bar.close()
        return taus


def _bar(job: StepCountJob, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"calibrating n={job.n}", leave=False,
                disable=not (job.progress and job.dist.is_main_process))


def get_strategy(name: str):
    if name == "sequential":
        return SequentialStrategy(from_data=True)
    if name == "data_free":
        return SequentialStrategy(from_data=False)
    if name == "parallel":
        return ParallelStrategy()
    raise ValueError(f"Unknown strategy {name!r}: choose one of {', '.join(STRATEGIES)}.")
