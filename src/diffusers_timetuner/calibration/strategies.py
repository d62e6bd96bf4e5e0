"""Calibration strategies: where the states x~_{t_i} that tau_i is fitted on come from.

- ``sequential`` (Algorithm 1): x~_T = alpha_T x_0 + sigma_T eps from data, then the already tuned steps
  tau_K .. tau_{i+1} are run to reach x~_{t_i}; i = K .. 1. States are cached, so fitting tau_i costs only
  evaluations of step i (and, for ``endpoint``, the remaining roll-out).
- ``data_free`` (beyond the paper): the same, with x_T ~ N(0, I) as at inference; no images needed.
- ``parallel`` (eq. 11): x_{t_i} = alpha_{t_i} x_0 + sigma_{t_i} eps directly from data; every tau_i is independent.
  Only for one-step solvers (a multistep solver's history is not defined there) and the per-step paper objectives.

Each strategy's ``run(calibrator)`` drives a :class:`~.calibrator.StepCountCalibrator`. The sequential strategies
checkpoint after every step and, with the guard on, end with the validation guard (``guard.py``).
"""

from __future__ import annotations

import copy
import time
from typing import Dict, List

import torch

from ..denoiser import slice_conditioning
from .calibrator import StepCountCalibrator
from .report import StepRecord
from .rollout import ChunkState

STRATEGIES = ("sequential", "data_free", "parallel")


class SequentialStrategy:
    """Algorithm 1 (``from_data=True``) or its data-free variant: tau_K, ..., tau_1 one after another."""

    def __init__(self, from_data: bool = True):
        self.from_data = from_data
        self.name = "sequential" if from_data else "data_free"

    def run(self, cal: StepCountCalibrator) -> List[float]:
        r, n, obj = cal.rollout, cal.n, cal.objective
        grid = r.grid_list
        taus = list(grid)  # untuned: tau_i = t_i
        chunks = cal.chunks(cal.calib, self.from_data, cal.seed, obj.needs_teacher)
        val = cal.chunks(cal.validation, False, cal.seed + 1, True) if cal.guard else None
        evals = cal.rollout.num_evaluations  # n, or 2n - 1 for Heun (one tau per model evaluation)
        last = evals if obj.tunes_last_step else evals - 1  # the paper never tunes the last step (t_1 -> t_0)
        if cal.joint:
            return cal.fit_all(chunks, val, last)

        start = 0
        snaps: List[Dict[int, ChunkState]] = []  # validation states before each step (for the final guard)

        def advance_validation(j: int) -> None:
            if val is not None:
                snaps.append({c: _snapshot(st) for c, st in val.items()})
                for st in val.values():
                    r.step(st, taus[j], keep=True)

        saved = cal.checkpoint.load(n) if cal.checkpoint is not None else None
        if saved is not None:
            start = int(saved["next_step"])
            taus[:start] = [float(t) for t in saved["taus"][:start]]
            cal.records[:] = [StepRecord(**rec) for rec in saved["records"]]
            for j in range(start):  # recompute the cached states: same seeds, same ops, same numbers
                for st in chunks.values():
                    r.step(st, taus[j], keep=True)
                advance_validation(j)
            cal.log(f"n={n}: resumed after {start} tuned steps from {cal.checkpoint.path(n)}")

        bar = cal.bar(last, start)
        for j in range(start, last):
            t0 = grid[j]
            fwd0 = cal.forward_samples()
            tick = time.perf_counter()
            for st in chunks.values():
                obj.prepare_step(r, st)
            fit = cal.fit_step(chunks, j, taus)
            taus[j] = cal.dist.broadcast_float(fit.tau)  # identical decision on every process
            for st in chunks.values():
                r.step(st, taus[j], keep=True)
            advance_validation(j)
            fwd = cal.forward_samples() - fwd0
            cal.record_fit(j, taus[j], fit, fwd, time.perf_counter() - tick)
            cal.log(f"n={n} step {j}: t={t0:g} tau={taus[j]:.2f} loss {fit.loss_before:.5g} -> {fit.loss_after:.5g} "
                    f"({fit.evaluations} evaluations, {fwd} forward samples, {time.perf_counter() - tick:.1f} s)")
            if cal.checkpoint is not None:
                cal.checkpoint.save(n, {"next_step": j + 1, "taus": taus[: j + 1],
                                        "records": [rec.to_dict() for rec in cal.records]})
            bar.update(1)
            bar.set_postfix(t=f"{t0:g}", tau=f"{taus[j]:.2f}")
        bar.close()
        if val is not None:
            taus = cal.guard_prefix(val, snaps, taus, last)
        return taus


def _snapshot(state: ChunkState) -> ChunkState:
    return ChunkState(state.x, copy.deepcopy(state.scheduler), state.j, state.cond, state.seed, dict(state.extras))


class ParallelStrategy:
    """Eq. 11: every tau_i fitted on x_{t_i} = alpha_{t_i} x_0 + sigma_{t_i} eps, independently of the others."""

    name = "parallel"

    def run(self, cal: StepCountCalibrator) -> List[float]:
        r, n, obj = cal.rollout, cal.n, cal.objective
        order = int(getattr(r.scheduler.config, "solver_order", 1) or 1)
        if r.num_evaluations != n:
            raise ValueError("The parallel strategy needs one model evaluation per step; "
                             f"{type(r.scheduler).__name__} makes two. Use strategy='sequential' or 'data_free'.")
        if order > 1:
            raise ValueError(
                f"The parallel strategy needs a one-step solver, but {type(r.scheduler).__name__} has solver_order="
                f"{order} (its history before step i is not defined by eq. 11). Use strategy='sequential' or "
                "solver_order=1."
            )
        grid = r.grid_list
        taus = list(grid)
        bar = cal.bar(n - 1, 0)
        for j in range(n - 1):
            fwd0 = cal.forward_samples()
            tick = time.perf_counter()
            # fresh (x_0, eps) pairs per step, identical on every process (seeded by step)
            g = torch.Generator().manual_seed(cal.seed * 7919 + j)
            noise = torch.randn(cal.calib.x0.shape, generator=g)
            chunks = {}
            for c, idx in enumerate(cal.dist.shard(len(cal.calib), cal.batch_size)):
                x_t = r.data_to_state(cal.calib.x0[idx], noise[idx], j)
                cond = slice_conditioning(cal.calib.cond, idx)
                state = ChunkState(x_t, r.grid_state_scheduler(j), j, cond, cal.seed * 1_000_003 + int(idx[0]),
                                   {"x0": cal.calib.x0[idx].to(r.device)})
                obj.prepare_step(r, state)
                chunks[c] = state
            fit = cal.fit_step(chunks, j, taus)
            taus[j] = cal.dist.broadcast_float(fit.tau)
            cal.record_fit(j, taus[j], fit, cal.forward_samples() - fwd0, time.perf_counter() - tick)
            bar.update(1)
        bar.close()
        return taus


def get_strategy(name: str):
    if name == "sequential":
        return SequentialStrategy(from_data=True)
    if name == "data_free":
        return SequentialStrategy(from_data=False)
    if name == "parallel":
        return ParallelStrategy()
    raise ValueError(f"Unknown strategy {name!r}: choose one of {', '.join(STRATEGIES)}.")
