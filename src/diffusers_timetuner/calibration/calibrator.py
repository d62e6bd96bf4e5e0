"""One step count's calibration: :class:`StepCountCalibrator` holds what fitting the table for n steps needs (the
rollout, objective, optimiser, calibration / validation sets, teacher, process group, checkpoint store) and offers
the strategies (``strategies.py``) the operations they are built from: cached states, losses, optimiser calls
through the protocols of ``optimizers.py``, the validation guard (``guard.py``) and the per-step records.

It stays whole (about 300 lines): the class is one step count's state and the operations on it; splitting the
losses from the guard's validation roll-outs would pass that state between files again, which the class replaced.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..denoiser import slice_conditioning
from ..sampling import init_noise_sigma
from ..table import timesteps_close
from .distributed import Distributed
from .guard import choose_prefix
from .objectives import Objective, per_sample_sq
from .optimizers import JointOptimizer, JointProblem, StepFit, StepProblem
from .report import StepRecord
from .rollout import ChunkState, Rollout
from .teacher import Teacher


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


class StepCountCalibrator:
    """Calibrates the table of one step count n; ``run(strategy)`` returns the taus, ``records`` the per-step log.

    Args:
        rollout: the coarse sampler for n steps (its grid and cached stepping).
        objective, optimizer: what each candidate is scored by, and how taus are searched
            (a :class:`~.optimizers.StepOptimizer` or a :class:`~.optimizers.JointOptimizer`).
        dist: the process group.
        calib: the calibration set; ``validation``: the guard's set (None: no guard).
        batch_size: samples per network call and process.
        seed: the run's seed (chunk step noise, the parallel strategy's draws).
        bounds: the model's time range (0, T - 1).
        teacher: the many-step reference (teacher objectives, the guard).
        guard: run the validation guard (needs ``validation``).
        checkpoint: a :class:`~.checkpoint.CheckpointStore` or None.
        log: where progress lines go; ``progress``: tqdm bars.
        validation_metric: ``endpoint_mse`` or ``energy_distance``; ``guard_margin``: the guard's margin in SE.
    """

    def __init__(self, rollout: Rollout, objective: Objective, optimizer, dist: Distributed, calib: CalibrationSet,
                 batch_size: int, seed: int, bounds: tuple, *, teacher: Optional[Teacher] = None,
                 validation: Optional[CalibrationSet] = None, guard: bool = True, checkpoint: Any = None,
                 log: Callable[[str], None] = print, progress: bool = False,
                 validation_metric: str = "endpoint_mse", guard_margin: float = 2.0):
        self.rollout, self.objective, self.optimizer, self.dist = rollout, objective, optimizer, dist
        self.calib, self.batch_size, self.seed, self.bounds = calib, batch_size, seed, bounds
        self.teacher, self.validation, self.checkpoint = teacher, validation, checkpoint
        self.guard = guard and validation is not None
        self.log, self.progress = log, progress
        self.validation_metric, self.guard_margin = validation_metric, float(guard_margin)
        self.records: List[StepRecord] = []

    @property
    def n(self) -> int:
        return self.rollout.num_inference_steps

    @property
    def joint(self) -> bool:
        """Whether the optimiser fits all steps at once (``fit_all``) rather than step by step (``fit_step``)."""
        return isinstance(self.optimizer, JointOptimizer)

    def run(self, strategy) -> List[float]:
        """The table for n: ``strategy.run(self)``, its taus made distinct (:func:`distinct_taus`); the taus as
        fitted stay in ``self.fitted`` (a Heun table left at tau = t repeats grid times)."""
        self.fitted = [float(t) for t in strategy.run(self)]
        return distinct_taus(self.fitted, self.bounds, self.log)

    # ------------------------------------------------------------------------------------------------ states
    def chunks(self, cset: CalibrationSet, from_data: bool, seed: int, teacher: bool) -> Dict[int, ChunkState]:
        """This process's share of ``cset`` as cached states at x_T, keyed by global mini-batch index."""
        r = self.rollout
        chunks = {}
        for c, idx in enumerate(self.dist.shard(len(cset), self.batch_size)):
            noise = cset.noise[idx]
            x_T = r.data_to_state(cset.x0[idx], noise, 0) if from_data else r.noise_to_state(noise)
            cond = slice_conditioning(cset.cond, idx)
            extras = {"x0": cset.x0[idx].to(r.device)} if cset.x0 is not None else {}
            extras["rows"] = idx  # global sample indices (to gather whole sets for the energy distance)
            state = r.initial_state(x_T, cond, seed=seed * 1_000_003 + int(idx[0]), **extras)
            if teacher:
                state.extras["teacher_states"] = self.teacher.targets(
                    x_T, float(init_noise_sigma(r.scheduler)), cond, r.grid_list
                )
            chunks[c] = state
        return chunks

    def forward_samples(self) -> int:
        """Samples pushed through the network so far (all processes; a collective)."""
        return int(self.dist.sum(torch.tensor(float(self.rollout.denoiser.num_forward_samples))))

    # ------------------------------------------------------------------------------------------------ losses
    def mean_loss(self, chunks, tau, taus) -> float:
        """The objective of step ``state.j`` at ``tau``, averaged over the calibration set (all processes)."""
        with torch.no_grad():
            local = sum((self.objective.losses(self.rollout, s, tau, taus).sum() for s in chunks.values()),
                        torch.zeros((), dtype=torch.float64))
        return float(self.dist.sum(local)) / len(self.calib)

    def endpoint_error(self, chunks, taus) -> float:
        """Mean squared distance of the final samples to the teacher's, from the cached states with ``taus``."""
        with torch.no_grad():
            local = torch.zeros((), dtype=torch.float64)
            for s in chunks.values():
                final = self.rollout.run(s, taus)
                local = local + per_sample_sq(final.x, s.extras["teacher_states"][-1]).sum()
        return float(self.dist.sum(local)) / len(self.calib)

    def _minibatch(self, chunks, k: int):
        """(this process's state of global mini-batch k mod their count, or None; the mini-batch's global size)."""
        c = k % -(-len(self.calib) // self.batch_size)
        return chunks.get(c), min(self.batch_size, len(self.calib) - c * self.batch_size)

    def _reduce_grad(self, g: torch.Tensor) -> torch.Tensor:
        return self.dist.sum(g).to(torch.float32)

    # ------------------------------------------------------------------------------------------------ optimisers
    def fit_step(self, chunks, j: int, taus: Sequence[float]) -> StepFit:
        """Fit tau_j on the cached states ``chunks`` (the others at ``taus``) with the step optimiser."""
        grid, d = self.rollout.grid_list, self.rollout.denoiser
        backward = {"samples": 0}

        def loss(tau: float) -> float:
            trial = list(taus)
            trial[j] = tau
            return self.mean_loss(chunks, tau, trial)

        def minibatch_loss(tau: torch.Tensor, k: int) -> torch.Tensor:
            state, size = self._minibatch(chunks, k)
            if state is None:  # this process holds no row of the mini-batch
                return tau * 0.0
            before = d.num_forward_samples
            with torch.enable_grad():
                out = self.objective.losses(self.rollout, state, tau, list(taus)).sum() / size
            backward["samples"] += d.num_forward_samples - before
            return out

        problem = StepProblem(
            t0=grid[j], spacing=_spacing(grid, j), bounds=self.bounds, loss=loss, minibatch_loss=minibatch_loss,
            reduce_grad=self._reduce_grad,
            backward_samples=lambda: int(self.dist.sum(torch.tensor(float(backward["samples"])))),
        )
        return self.optimizer.fit_step(problem)

    def fit_all(self, chunks, val, last: int) -> List[float]:
        """All taus jointly with the joint optimiser (endpoint objective); guarded as a whole. Records every step."""
        grid, d = self.rollout.grid_list, self.rollout.denoiser
        backward = {"samples": 0}

        def minibatch_loss(tau: torch.Tensor, k: int) -> torch.Tensor:
            state, size = self._minibatch(chunks, k)
            if state is None:
                return (tau * 0.0).sum()
            before = d.num_forward_samples
            with torch.enable_grad():
                trial = list(tau) + [torch.tensor(t) for t in grid[last:]]
                final = self.rollout.run(state, trial)
                out = per_sample_sq(final.x, state.extras["teacher_states"][-1]).sum() / size
            backward["samples"] += d.num_forward_samples - before
            return out

        tick, fwd0 = time.perf_counter(), self.forward_samples()
        problem = JointProblem(
            grid=list(grid), num_tuned=last, bounds=self.bounds, num_minibatches=-(-len(self.calib) // self.batch_size),
            loss=lambda taus: self.endpoint_error(chunks, taus), minibatch_loss=minibatch_loss,
            reduce_grad=self._reduce_grad, broadcast=self.dist.broadcast_float,
            backward_samples=lambda: int(self.dist.sum(torch.tensor(float(backward["samples"])))),
            progress=lambda total: self.bar(total, 0),
        )
        fit = self.optimizer.fit_all(problem)
        kept = True
        if val is not None:
            untuned_out, tuned_out = self.validation_outputs(val, grid), self.validation_outputs(val, fit.taus)
            decision = choose_prefix([untuned_out, tuned_out], self.validation_metric, self.guard_margin,
                                     self.teacher_finals(val))
            kept = decision.keep == 1
            if not kept:
                self.log(f"n={self.n}: the jointly tuned table does not beat untuned by > {self.guard_margin:g} SE on "
                         f"the validation {self.validation_metric} "
                         f"({decision.errors[0]:.4g} -> {decision.errors[1]:.4g}); keeping tau = t.")
        final_taus = fit.taus if kept else list(grid)
        fwd = self.forward_samples() - fwd0
        seconds = time.perf_counter() - tick
        for j in range(last):  # one record per step; the run's totals are attributed to step 0
            self.record(j, final_taus[j], fit.loss_before, fit.loss_after if kept else fit.loss_before,
                        evaluations=fit.evaluations if j == 0 else 0, forward_samples=fwd if j == 0 else 0,
                        backward_samples=fit.backward_samples if j == 0 else 0, seconds=seconds if j == 0 else 0.0,
                        proposed_tau=fit.taus[j], kept=kept)
        return final_taus

    # ------------------------------------------------------------------------------------------------ the guard
    def validation_outputs(self, chunks, taus) -> torch.Tensor:
        """Per validation sample (all processes): the squared endpoint error to the teacher's final sample
        (``endpoint_mse``; shape (N,)) or the final sample itself (``energy_distance``; shape (N, *sample_shape))."""
        num = len(self.validation)
        shape = () if self.validation_metric == "endpoint_mse" else tuple(self.validation.noise.shape[1:])
        out = torch.zeros((num, *shape), dtype=torch.float64)  # this process's rows; zeros elsewhere
        with torch.no_grad():
            for s in chunks.values():
                final = self.rollout.run(s, taus).x
                if shape:
                    out[s.extras["rows"]] = final.detach().double().cpu()
                else:
                    out[s.extras["rows"]] = per_sample_sq(final, s.extras["teacher_states"][-1]).double().cpu()
        return self.dist.sum(out)

    def teacher_finals(self, chunks) -> Optional[torch.Tensor]:
        """The teacher's final validation samples (all processes); None for ``endpoint_mse`` (not needed)."""
        if self.validation_metric == "endpoint_mse":
            return None
        out = torch.zeros((len(self.validation), *self.validation.noise.shape[1:]), dtype=torch.float64)
        for s in chunks.values():
            out[s.extras["rows"]] = s.extras["teacher_states"][-1].detach().double().cpu()
        return self.dist.sum(out)

    def guard_prefix(self, val, snaps, taus, last: int) -> List[float]:
        """Never ship a table that is worse than no table on the validation set: keep the prefix ``guard.py``
        chooses from the validation states before each step (``snaps``) and at the end (``val``)."""
        grid = self.rollout.grid_list
        outputs = []
        for k in range(last + 1):
            trial = list(taus[:k]) + list(grid[k:])
            states = snaps[k] if k < last else val  # val states are at the end already
            outputs.append(self.validation_outputs(states, trial))
        decision = choose_prefix(outputs, self.validation_metric, self.guard_margin, self.teacher_finals(val))
        best, errors = decision.keep, decision.errors
        for rec in self.records:
            rec.validation_before, rec.validation_after = errors[0], errors[best]
            if rec.step >= best:
                rec.kept, rec.tau, rec.loss_after = False, rec.t, rec.loss_before
        if best < last:
            change, se = decision.changes[-1]
            self.log(f"n={self.n}: validation guard keeps only the first {best} tuned step(s) "
                     f"({self.validation_metric}: untuned {errors[0]:.4g}, full table {errors[-1]:.4g} "
                     f"({change:+.3g} +/- {se:.2g} SE), kept {errors[best]:.4g}; a table must beat untuned by > "
                     f"{self.guard_margin:g} SE).")
        return list(taus[:best]) + list(grid[best:])

    # ------------------------------------------------------------------------------------------------ records
    def record(self, j: int, tau: float, loss_before: float, loss_after: float, *, evaluations: int,
               forward_samples: int, backward_samples: int, seconds: float, proposed_tau: Optional[float] = None,
               kept: bool = True) -> StepRecord:
        """Append the record of step j (the one place a :class:`~.report.StepRecord` is made during a run)."""
        rec = StepRecord(
            step=j, t=self.rollout.grid_list[j], tau=tau, proposed_tau=tau if proposed_tau is None else proposed_tau,
            kept=kept, loss_before=loss_before, loss_after=loss_after, objective_evaluations=evaluations,
            forward_samples=forward_samples, backward_samples=backward_samples, seconds=seconds,
        )
        self.records.append(rec)
        return rec

    def record_fit(self, j: int, tau: float, fit: StepFit, forward_samples: int, seconds: float) -> StepRecord:
        """The record of a step fitted by a step optimiser."""
        return self.record(j, tau, fit.loss_before, fit.loss_after, evaluations=fit.evaluations,
                           forward_samples=forward_samples, backward_samples=fit.backward_samples, seconds=seconds)

    def bar(self, total: int, initial: int):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=f"calibrating n={self.n}", leave=False,
                    disable=not (self.progress and self.dist.is_main_process))


def _spacing(grid: Sequence[float], j: int) -> float:
    """Grid spacing around t_i = grid[j] (the trust region's unit)."""
    gaps = [abs(grid[j] - grid[k]) for k in (j - 1, j + 1) if 0 <= k < len(grid)]
    return max(min(gaps) if gaps else 1.0, 1.0)


def distinct_taus(taus: Sequence[float], bounds, log=None) -> List[float]:
    """Make every tau distinct (the scheduler finds the step from the tau it gets back, so a table must not repeat a
    value): a tau equal to an earlier one (``table.timesteps_close``, the scheduler's lookup tolerance, at most about
    1e-3) moves by 0.01 timestep, far below any measurable effect.
    Happens when a search ends on a neighbouring grid time that another step kept (its trust region's edge)."""
    out: List[float] = []
    for j, tau in enumerate(float(t) for t in taus):
        moved = tau
        step = 0.01 if tau + 0.01 <= bounds[1] else -0.01
        while any(timesteps_close(moved, prev) for prev in out):
            moved += step
        if moved != tau and log is not None:
            log(f"step {j}: tau {tau:g} repeats another step's tau; using {moved:g}")
        out.append(moved)
    return out
