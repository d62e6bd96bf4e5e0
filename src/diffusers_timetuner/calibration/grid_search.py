"""Learning the grid t_K > ... > t_1 itself (``tune="grid"`` / ``"grid+tau"``), beyond the paper's tau tables.

Two stages, both measured against an accurate teacher (:class:`FineTeacher`, a second-order solver at many steps)
from the same x_T, over a fixed calibration batch (common random numbers):

1. :func:`dynamic_programming_grid` (as GITS, Chen et al., ICML 2024): on the teacher's fine trajectory, the cost
   of a one-step jump s -> t is the distance between a first-order (DDIM) step from the teacher's state at s, with
   the teacher's own noise prediction there, and the teacher's state at t. One network evaluation per fine time
   serves every jump, so the whole cost matrix is free once the teacher has run; the cheapest path of n jumps to the
   clean end is the initial grid. Its start is free too (starting x_T at a lower t costs the distance of x_T to the
   teacher's state there).
2. :func:`pattern_search` of each integer grid point (monotone, both ends free) on the endpoint error of the real
   sampler: every candidate grid runs through ``scheduler.set_timesteps(timesteps=grid)`` and the same ``step`` as
   inference (multistep history included). Network outputs of the unchanged prefix of a candidate are reused from
   the current grid's roll-out, so moving t_i costs only the evaluations after it.

:func:`guarded_choice` then keeps the promise of the validation guard for the shipped (grid, tau) table: it must
beat the untuned sampler (the scheduler's *default* grid, tau = t) on a separate validation set by more than
``guard_margin`` paired standard errors, else the tau-only table on the default grid if that does, else tau = t.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..denoiser import slice_conditioning
from ..sampling import grid_timesteps, sample
from .guard import clearly_better
from .stats import metric_value, paired_change
from .teacher import FineTeacher, FineTrajectory

TUNE_MODES = ("tau", "grid", "grid+tau")
# How the pattern search scores a candidate grid from the per-sample squared endpoint errors e_i to the teacher:
# "mean" (mean e_i) or "log_mean" (mean log e_i, the log of their geometric mean: a few x_T that end as another mode
# no longer outweigh the rest; docs/facts.md, 6). Both are sums over samples, so they reduce across processes.
GRID_CRITERIA = ("mean", "log_mean")
# The mean: on 256 fresh x_T at MNIST DPM-Solver++@5 only the mean-searched grid lowered both the mean and the median
# error of the default grid (log_mean lowered the median only; docs/facts.md, 6; DDIM@10 not measured yet).
DEFAULT_GRID_CRITERION = "mean"
_LOG_FLOOR = 1e-12  # keeps log finite for a sample that matches the teacher exactly


def resolve_grid_criterion(setting: str, metric: str) -> str:
    """The search's criterion for ``grid_search_criterion=setting`` on a sampler judged by ``metric``: "auto" is
    ``DEFAULT_GRID_CRITERION`` for the endpoint error and the energy distance itself for stochastic samplers (a set
    statistic, with no per-sample errors to transform), where an explicit criterion is refused."""
    if metric != "endpoint_mse":
        if setting != "auto":
            raise ValueError(f"grid_search_criterion={setting!r} scores per-sample endpoint errors, but this sampler "
                             f"is stochastic and judged by the {metric} of its final samples: leave "
                             "grid_search_criterion='auto', or use a deterministic sampler (e.g. DDIM with eta=0).")
        return metric
    return DEFAULT_GRID_CRITERION if setting == "auto" else setting


def per_sample_score(errors: torch.Tensor, criterion: str) -> torch.Tensor:
    """What each sample adds to the search's criterion (``GRID_CRITERIA``) for its squared endpoint error."""
    if criterion == "mean":
        return errors
    if criterion == "log_mean":
        return torch.log(errors + _LOG_FLOOR)
    raise ValueError(f"grid_search_criterion must be one of {', '.join(GRID_CRITERIA)}, got {criterion!r}.")


def check_grid_tunable(scheduler) -> None:
    """Refuse a scheduler the search cannot price (no VP noise schedule) or whose solver cannot run on a custom
    integer grid (before any evaluation; ``teacher="same"`` is refused with the other settings in validate.py)."""
    if not FineTeacher.supports(scheduler):
        # the dynamic programme prices DDIM jumps on the VP noise schedule (alphas_cumprod)
        raise ValueError(
            f"tune='grid' / 'grid+tau' searches grids on a variance-preserving noise schedule (betas); "
            f"{type(scheduler).__name__} with this config has none (flow matching, Heun or a consistency model). "
            "Use tune='tau'.")
    probe = copy.deepcopy(scheduler)
    T = int(probe.config.num_train_timesteps)
    grid = [T - 1, T // 2, 0]
    try:
        probe.set_timesteps(timesteps=grid)
    except TypeError as err:  # the parent's set_timesteps has no `timesteps` argument
        raise ValueError(
            f"tune='grid' / 'grid+tau' needs a solver that runs on a custom grid (`set_timesteps(timesteps=...)`); "
            f"{type(scheduler).__name__} has none. Use tune='tau', or DDIM, DDPM, DPM-Solver (multistep or "
            "singlestep), Euler or UniPC.") from err
    except ValueError as err:
        raise ValueError(f"tune='grid' / 'grid+tau': {type(scheduler).__name__} refuses custom grids ({err}); "
                         "use tune='tau'.") from err
    if len(probe.timesteps) != len(grid):
        raise ValueError(
            f"tune='grid' / 'grid+tau' needs one model evaluation per grid time; {type(scheduler).__name__} makes "
            f"{len(probe.timesteps)} on a grid of {len(grid)} (a second-order single-step solver). Use tune='tau'.")


# ------------------------------------------------------------------------------------------------- stage 1: DP
def jump_costs(alphas: torch.Tensor, trajectories: Sequence[FineTrajectory], noises: Sequence[torch.Tensor]):
    """cost[a, b] (a < b, nodes 0..M with M the clean end): summed squared error of a DDIM jump s_a -> s_b from the
    teacher's state, against the teacher's state at s_b; start[a]: summed squared distance of x_T to the teacher's
    state at s_a (what starting the coarse sampler at s_a costs). Returns (cost, start, num_samples)."""
    times = trajectories[0].times
    M = len(times)
    cost = torch.full((M + 1, M + 1), math.inf, dtype=torch.float64)
    start = torch.zeros(M + 1, dtype=torch.float64)
    start[M] = math.inf
    count = 0
    a_all = torch.tensor([float(alphas[t]) for t in times] + [1.0], dtype=torch.float64)
    for traj, noise in zip(trajectories, noises):
        xs = torch.stack([s.double().flatten(1) for s in traj.states])  # (M + 1, B, D)
        es = torch.stack([e.double().flatten(1) for e in traj.eps])  # (M, B, D)
        count += xs.shape[1]
        x_T = noise.double().flatten(1).to(xs.device)
        start[:M] += (xs[:M] - x_T).pow(2).sum(-1).sum(-1).cpu()
        for a in range(M):
            x0 = (xs[a] - (1 - a_all[a]).sqrt() * es[a]) / a_all[a].sqrt()
            at = a_all[a + 1:].to(xs).view(-1, 1, 1)
            pred = at.sqrt() * x0 + (1 - at).sqrt() * es[a]
            c = (pred - xs[a + 1:]).pow(2).sum(-1).sum(-1).cpu()
            cost[a, a + 1:] = torch.where(torch.isinf(cost[a, a + 1:]), c, cost[a, a + 1:] + c)
    return cost, start, count


def dynamic_programming_grid(times: Sequence[int], cost: torch.Tensor, start: torch.Tensor, n: int,
                             free_start: bool = True) -> List[int]:
    """The n fine times whose path of jumps to the clean end has the least total cost (GITS's dynamic programme)."""
    M = len(times)
    if n > M:
        raise ValueError(f"the fine teacher grid has {M} times, fewer than the {n} grid points to choose.")
    best = torch.full((n + 1, M + 1), math.inf, dtype=torch.float64)
    back = torch.full((n + 1, M + 1), -1, dtype=torch.long)
    best[0, 0] = 0.0
    if free_start:
        best[0, :M] = start[:M]
    for k in range(1, n + 1):
        for b in range(1, M + 1):
            cand = best[k - 1, :b] + cost[:b, b]
            a = int(torch.argmin(cand))
            best[k, b], back[k, b] = cand[a], a
    path, b = [], M
    for k in range(n, 0, -1):
        b = int(back[k, b])
        path.append(b)
    return [int(times[a]) for a in reversed(path)]


# --------------------------------------------------------------------------------------- stage 2: pattern search
class GridEvaluator:
    """Endpoint error of a candidate grid over a fixed batch, through the real scheduler (``set_timesteps(timesteps=
    grid)`` and ``step``), reusing the network outputs of the unchanged prefix of the current grid's roll-out."""

    def __init__(self, denoiser, scheduler, chunks: Sequence[Dict[str, Any]], metric: str = "endpoint_mse",
                 eta=None, dist=None, criterion: str = "mean"):
        self.denoiser, self.scheduler, self.chunks = denoiser, scheduler, list(chunks)
        self.metric, self.eta, self.dist, self.criterion = metric, eta, dist, criterion
        self.cached: Dict[int, List[torch.Tensor]] = {}  # chunk -> network outputs of the current grid
        self.evaluations = 0

    def finals(self, grid: Sequence[int], reuse: int = 0, keep: bool = False):
        outs, finals = {}, []
        for c, ch in enumerate(self.chunks):
            old = self.cached.get(c, [])
            record: List[torch.Tensor] = []

            def net(x, t, cond, _old=old, _record=record):
                k = len(_record)
                out = _old[k] if k < reuse and k < len(_old) else self.denoiser(x, t, cond)
                _record.append(out)
                return out

            sched = copy.deepcopy(self.scheduler)
            sched.set_timesteps(timesteps=[int(t) for t in grid], device=ch["noise"].device)
            gen = torch.Generator().manual_seed(int(ch["seed"]))
            finals.append(sample(net, sched, ch["noise"], None, ch["cond"], eta=self.eta, generator=gen))
            outs[c] = record
        self.evaluations += 1
        if keep:
            self.cached = outs
        return finals, outs

    def loss_of(self, finals) -> torch.Tensor:
        if self.metric == "endpoint_mse":
            per = torch.cat([(f - ch["target"]).double().pow(2).flatten(1).sum(1)
                             for f, ch in zip(finals, self.chunks)])
            total = per_sample_score(per, self.criterion).sum()
            if self.dist is not None:
                total = self.dist.sum(total)
            return total
        allf = torch.cat([f.double() for f in finals])
        ref = torch.cat([ch["target"].double() for ch in self.chunks])
        return torch.tensor(metric_value(self.metric, allf, ref))

    def loss(self, grid: Sequence[int], reuse: int = 0) -> float:
        finals, self._last = self.finals(grid, reuse)
        return float(self.loss_of(finals))

    def adopt_last(self) -> None:
        """The grid of the last :meth:`loss` call becomes the current one (its outputs serve later prefixes)."""
        self.cached = self._last

    def accept(self, grid: Sequence[int]) -> float:
        finals, _ = self.finals(grid, 0, keep=True)
        return float(self.loss_of(finals))


@dataclass
class SearchRecord:
    grid: List[int]
    loss: float
    evaluations: int
    history: List[Dict[str, Any]] = field(default_factory=list)


def pattern_search(evaluator: GridEvaluator, grid: Sequence[int], upper: int, *, max_evaluations: int,
                   min_step: int = 1, log: Callable[[str], None] = lambda m: None, progress=None,
                   num_samples: int = 1) -> SearchRecord:
    """Coordinate search over integer grid points t_K > ... > t_1 in [0, upper], strictly descending.

    Each point starts with a step of a quarter of its smallest neighbouring gap; a move that lowers the evaluator's
    criterion is kept (and tried again, doubled), a point whose two moves both fail halves its step; ends when every
    step is below ``min_step`` or after ``max_evaluations`` candidate roll-outs.
    """
    grid = [int(t) for t in grid]
    n = len(grid)
    best = evaluator.accept(grid)
    used = 1
    history = [{"grid": list(grid), "loss": best}]

    def gap(j):
        hi = upper + 1 if j == 0 else grid[j - 1]
        lo = -1 if j == n - 1 else grid[j + 1]
        return min(hi - grid[j], grid[j] - lo)

    steps = [max(min_step, gap(j) // 4) for j in range(n)]
    improved_any = True
    while improved_any and used < max_evaluations:
        improved_any = False
        for j in range(n):
            if steps[j] < min_step or used >= max_evaluations:
                continue
            moved = False
            for sign in (-1, 1):
                if used >= max_evaluations:
                    break
                hi = upper if j == 0 else grid[j - 1] - 1
                lo = 0 if j == n - 1 else grid[j + 1] + 1
                t = min(hi, max(lo, grid[j] + sign * steps[j]))
                if t == grid[j]:
                    continue
                trial = list(grid)
                trial[j] = t
                loss = evaluator.loss(trial, reuse=j)  # steps before j see the same inputs: outputs reused
                used += 1
                if progress is not None:
                    progress(1)
                if loss < best:
                    grid, best, moved = trial, loss, True
                    evaluator.adopt_last()
                    history.append({"grid": list(grid), "loss": best})
                    log(f"grid search: t[{j}] -> {t} (calibration score {best / num_samples:.5g})")
                    steps[j] *= 2
                    break
            if moved:
                improved_any = True
            else:
                steps[j] //= 2
                improved_any = improved_any or steps[j] >= min_step
    return SearchRecord(grid, best, used, history)


# -------------------------------------------------------------------------------------------------------- guard
@torch.no_grad()
def sampler_finals(denoiser, scheduler, n: int, noise: torch.Tensor, cond, batch_size: int, eta=None, seed=1):
    """Final samples of ``scheduler`` at ``set_timesteps(n)`` (its table, and its learned grid, if any)."""
    out = []
    for start in range(0, noise.shape[0], batch_size):
        idx = torch.arange(start, min(start + batch_size, noise.shape[0]))
        sched = copy.deepcopy(scheduler)
        out.append(sample(denoiser, sched, noise[idx], n, slice_conditioning(cond, idx), eta=eta,
                          generator=torch.Generator().manual_seed(seed + start)))
    return torch.cat(out)


def compare(metric: str, finals: torch.Tensor, untuned: torch.Tensor, teacher: torch.Tensor):
    """(error, error of untuned, change, paired SE) of ``finals`` against the teacher's final samples."""
    if metric == "endpoint_mse":
        per = (finals - teacher).double().pow(2).flatten(1).sum(1)
        base = (untuned - teacher).double().pow(2).flatten(1).sum(1)
        change, se = paired_change(metric, per, base)
        return float(per.mean()), float(base.mean()), change, se
    change, se = paired_change(metric, finals.double(), untuned.double(), teacher.double())
    return (metric_value(metric, finals.double(), teacher.double()),
            metric_value(metric, untuned.double(), teacher.double()), change, se)


def guarded_choice(candidates: Sequence[tuple], untuned_finals, teacher_finals, metric: str, margin: float,
                   log: Callable[[str], None]) -> tuple:
    """The first (name, scheduler, finals) candidate that beats untuned by more than ``margin`` paired SEs on the
    validation set, or ("untuned", None, ...). Returns (name, scheduler, verdicts per candidate)."""
    verdicts = {}
    for name, sched, finals in candidates:
        if finals is None:
            continue
        err, base, change, se = compare(metric, finals, untuned_finals, teacher_finals)
        ok = clearly_better(change, se, margin)
        verdicts[name] = {"validation": err, "validation_untuned": base, "change": change, "change_se": se,
                          "passed": bool(ok)}
        log(f"guard: {name}: validation {metric} {base:.5g} (untuned) -> {err:.5g} ({change:+.3g} +/- {se:.2g} SE)"
            f" {'passes' if ok else 'fails'} the {margin:g}-SE margin")
        if ok:
            return name, sched, verdicts
    return "untuned", None, verdicts


# ------------------------------------------------------------------------------------------------------ driver
@dataclass
class GridPlan:
    """The learned grid of one step count and how it was found (for the report)."""

    grid: List[int]
    default_grid: List[int]
    dp_grid: List[int]
    start: str  # which initial grid the search started from ("dp" or "default")
    criterion: str  # what the losses below are (GRID_CRITERIA): per sample, the mean of e_i or of log e_i
    loss_default: float  # calibration criterion (per sample) of the default grid
    loss_dp: float
    loss: float  # ... of the learned grid
    evaluations: int  # candidate roll-outs of the search
    forward_samples: int  # network evaluations x samples spent by the search (the teacher's are not included)

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


def learn_grid(denoiser, untuned, n: int, calib, teacher: FineTeacher, *, dist, batch_size: int, seed: int,
               eta=None, metric: str = "endpoint_mse", max_evaluations: Optional[int] = None,
               criterion: str = DEFAULT_GRID_CRITERION, log: Callable[[str], None] = lambda m: None,
               progress: bool = False) -> GridPlan:
    """Stage 1 (dynamic programme on the teacher's trajectory) then stage 2 (pattern search) for n steps; the
    start (programme or default grid) and every move are judged by ``criterion`` over the calibration errors."""
    from tqdm.auto import tqdm

    device = teacher.device
    chunks, trajs, noises = [], [], []
    for idx in dist.shard(len(calib), batch_size):
        noise = calib.noise[idx].to(device)
        cond = slice_conditioning(calib.cond, idx)
        traj = teacher.fine_trajectory(noise, cond)
        trajs.append(traj)
        noises.append(noise)
        chunks.append(dict(noise=noise, cond=cond, seed=seed * 1_000_003 + int(idx[0]), target=traj.states[-1]))
    cost, start, _ = jump_costs(teacher.alphas, trajs, noises)
    cost, start = dist.sum(cost), dist.sum(start)
    dp = dynamic_programming_grid(teacher.times, cost, start, n)
    default = copy.deepcopy(untuned)
    default.set_timesteps(n)
    default_grid = [int(round(float(t))) for t in grid_timesteps(default)]
    fwd0 = denoiser.num_forward_samples
    evaluator = GridEvaluator(denoiser, untuned, chunks, metric, eta, dist, criterion)
    num = len(calib)
    loss_default = evaluator.loss(default_grid) / num
    loss_dp = evaluator.loss(dp) / num
    init, start_name = (dp, "dp") if loss_dp <= loss_default else (default_grid, "default")
    log(f"n={n}: grid search starts from the {start_name} grid {init} (calibration {criterion} endpoint error: "
        f"default grid {default_grid} {loss_default:.5g}, dynamic programme {dp} {loss_dp:.5g})")
    budget = int(max_evaluations if max_evaluations is not None else 4 * n)
    bar = tqdm(total=budget, desc=f"grid search n={n}", leave=False, disable=not (progress and dist.is_main_process))
    upper = int(untuned.config.num_train_timesteps) - 1
    if budget > 0:
        rec = pattern_search(evaluator, init, upper, max_evaluations=budget, log=log, progress=bar.update,
                             num_samples=num)
    else:  # the dynamic programme's grid (or the default) as it is
        rec = SearchRecord(list(init), min(loss_dp, loss_default) * num, 0)
    bar.close()
    fwd = int(dist.sum(torch.tensor(float(denoiser.num_forward_samples - fwd0))))
    log(f"n={n}: learned grid {rec.grid}: calibration {criterion} endpoint error {rec.loss / num:.5g} "
        f"({rec.evaluations + 2} roll-outs, {fwd} forward samples)")
    return GridPlan(rec.grid, default_grid, dp, start_name, criterion, loss_default, loss_dp, rec.loss / num,
                    rec.evaluations + 2, fwd)


def guard_grid_table(n: int, candidates: Sequence[tuple], untuned, denoiser, validation, teacher: FineTeacher,
                     metric: str, batch_size: int, eta, guard: bool, margin: float, log: Callable[[str], None],
                     fallback: Callable[[], tuple], records: list) -> tuple:
    """Keep the guard's promise for a learned-grid table: it ships only if it beats the untuned sampler (default
    grid, tau = t) on the validation set by more than ``margin`` paired SEs; else the tau-only table on the default
    grid (``fallback()`` calibrates it, its records replace ``records``) if that does; else tau = t.

    Returns (chosen: the candidate's name, "tau" or "untuned"; table grid; taus; validation verdicts).
    """
    name, sched = candidates[0]
    table = sched.tau_tables[n]
    if not guard or validation is None:
        log(f"n={n}: no validation guard: shipping the {name} table unchecked")
        return name, [float(t) for t in table.grid], list(table.taus), {}
    noise, cond = validation.noise, validation.cond
    teacher_finals = torch.cat([
        teacher.fine_trajectory(noise[i:i + batch_size].to(teacher.device),
                                slice_conditioning(cond, torch.arange(i, min(i + batch_size, len(noise))))).states[-1]
        for i in range(0, len(noise), batch_size)])
    untuned_finals = sampler_finals(denoiser, untuned, n, noise, cond, batch_size, eta)
    cands = [(c, s, sampler_finals(denoiser, s, n, noise, cond, batch_size, eta)) for c, s in candidates]
    chosen, sched, verdicts = guarded_choice(cands, untuned_finals, teacher_finals, metric, margin, log)
    if sched is not None:
        table = sched.tau_tables[n]
        return chosen, [float(t) for t in table.grid], list(table.taus), verdicts
    log(f"n={n}: the learned-grid table does not beat the untuned sampler by > {margin:g} SE on the validation set; "
        "falling back to tau alone on the scheduler's own grid")
    rollout, job, taus, _ = fallback()
    records[:] = list(job.records)
    grid = rollout.grid_list
    if any(abs(a - b) > 1e-6 for a, b in zip(taus, grid)):
        tau_sched = untuned.with_tuned_timesteps(n, taus, grid=grid)
        chosen, sched, more = guarded_choice([("tau", tau_sched, sampler_finals(denoiser, tau_sched, n, noise, cond,
                                                                                 batch_size, eta))],
                                             untuned_finals, teacher_finals, metric, margin, log)
        verdicts.update(more)
        if sched is not None:
            return "tau", grid, list(taus), verdicts
    log(f"n={n}: no table beats the untuned sampler on the validation set: keeping tau = t on the default grid")
    return "untuned", grid, list(grid), verdicts
