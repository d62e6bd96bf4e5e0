"""The teacher: a many-step sampler from the same x_T, the reference of the teacher objectives, the guard and the
held-out report; and :func:`default_teacher_steps`, its step count."""

from __future__ import annotations

import copy
from typing import List, Optional, Sequence

import torch

from ..denoiser import NonFiniteOutputError
from ..sampling import grid_timesteps, sample_trajectory
from ..table import matching_indices


class Teacher:
    """A many-step sampler from the same x_T: the reference the teacher objectives and held-out errors use.

    The teacher runs the same (untuned) scheduler configuration with ``num_inference_steps`` steps through
    :func:`~diffusers_timetuner.sampling.sample_trajectory`; stochastic schedulers (DDPM) are replaced by DDIM (eta=0)
    so that "the teacher's sample from x_T" is well defined. A flow-matching Euler teacher integrates on the coarse
    sigma grid (shift, mu and custom sigmas included) with every interval split into ``ceil(M / n)`` equal sigma
    steps, so it passes through every coarse grid time.

    Args:
        denoiser: the same denoiser as the coarse sampler (same guidance).
        scheduler: an untuned scheduler of the coarse sampler's configuration.
        num_inference_steps: the teacher's step count M.
        device: where the teacher's scheduler puts its timesteps.
        coarse_grid: the coarse sampler's grid; when the teacher's own grid misses one of its (integer) times, the
            teacher runs its grid plus the coarse times as a custom grid (so per-step targets exist).
    """

    def __init__(self, denoiser, scheduler, num_inference_steps: int, device=None, coarse_grid=None):
        self.denoiser = denoiser
        self.num_inference_steps = int(num_inference_steps)
        sched = copy.deepcopy(scheduler)
        if "DDPM" in type(sched).__name__:
            from ..schedulers import TimeTunerDDIMScheduler

            sched = TimeTunerDDIMScheduler.from_config(sched.config)
        self.scheduler = sched
        self.device = device
        if "FlowMatch" in type(sched).__name__:
            if coarse_grid is None:
                raise ValueError("A flow-matching teacher refines the coarse sigma grid: pass coarse_grid.")
            self._refine_flow_grid(coarse_grid)
            return
        self.scheduler.set_timesteps(self.num_inference_steps, device=device)
        self.grid = grid_timesteps(self.scheduler).detach().to(torch.float64).cpu()
        if coarse_grid is not None and self.grid_indices(coarse_grid) is None:
            self._add_coarse_times(coarse_grid)

    def _refine_flow_grid(self, coarse_grid) -> None:
        """Flow-matching Euler on the coarse sigmas (t / T, then the terminal 0), each interval split into equal
        sigma steps; an unshifted copy of the config takes these sigmas as they are."""
        total = float(self.scheduler.config.num_train_timesteps)
        nodes = [float(t) / total for t in coarse_grid] + [0.0]
        per = max(1, -(-self.num_inference_steps // len(coarse_grid)))
        sigmas = []
        for hi, lo in zip(nodes[:-1], nodes[1:]):
            sigmas += [hi + (lo - hi) * k / per for k in range(per)]
        self.scheduler = type(self.scheduler).from_config(
            self.scheduler.config, shift=1.0, use_dynamic_shifting=False, shift_terminal=None, use_karras_sigmas=False,
            use_exponential_sigmas=False, use_beta_sigmas=False, stochastic_sampling=False, invert_sigmas=False,
            tuned_timesteps=None, tuned_grids=None, tuning_info=None,
        )
        self.scheduler.set_timesteps(sigmas=sigmas, device=self.device)
        self.grid = grid_timesteps(self.scheduler).detach().to(torch.float64).cpu()
        self.num_inference_steps = len(sigmas)

    def _add_coarse_times(self, coarse_grid) -> None:
        """Make the teacher pass through every (integer) coarse grid time: its own grid plus the coarse one, as a
        custom grid (``set_timesteps(timesteps=...)``). Non-integer coarse times are left out (no per-step target)."""
        own = {int(round(float(t))) for t in self.grid}
        extra = {int(float(t)) for t in coarse_grid if float(t) == int(float(t))}
        times = sorted(own | extra, reverse=True)
        try:
            self.scheduler.set_timesteps(timesteps=times, device=self.device)
        except (TypeError, ValueError):  # a scheduler without custom grids keeps its own
            self.scheduler.set_timesteps(self.num_inference_steps, device=self.device)
            return
        self.grid = grid_timesteps(self.scheduler).detach().to(torch.float64).cpu()
        self.num_inference_steps = len(self.scheduler.timesteps)

    def grid_indices(self, coarse_grid: Sequence[float]) -> Optional[List[int]]:
        """Positions of the coarse grid times in the teacher's grid, or None if one is missing."""
        out = [self._index_of(t) for t in coarse_grid]
        return None if any(k is None for k in out) else out

    @torch.no_grad()
    def trajectory(self, x_T: torch.Tensor, init_noise_sigma: float, cond=None) -> List[torch.Tensor]:
        """All teacher states [x_{s_M}, ..., x_{s_0}] from the coarse sampler's x_T (in its state space)."""
        # Same normalised noise: the coarse state is noise * init_noise_sigma of the coarse scheduler.
        noise = x_T / float(init_noise_sigma)
        sched = copy.deepcopy(self.scheduler)
        try:
            return sample_trajectory(self.denoiser, sched, noise, None, cond,
                                     generator=torch.Generator().manual_seed(0))
        except NonFiniteOutputError as err:  # say that it was the teacher, not a step of the calibrated sampler
            raise err.at(f"in the {len(sched.timesteps)}-step teacher sampler", "timestep(s)") from None

    def targets(self, x_T, init_noise_sigma, cond, coarse_grid: Sequence[float]) -> List[Optional[torch.Tensor]]:
        """Teacher states aligned with the coarse trajectory: entry j is the teacher at coarse grid[j] (None where
        the teacher's grid misses that time), the last entry (index n) the teacher's final sample."""
        states = self.trajectory(x_T, init_noise_sigma, cond)
        idx = [self._index_of(t) for t in coarse_grid]
        return [states[k] if k is not None else None for k in idx] + [states[-1]]

    def _index_of(self, t: float) -> Optional[int]:
        """Position of grid time t in the teacher's grid (the table's timestep tolerance), or None. The last hit: a
        Heun teacher visits each grid time twice, first as its predictor, then corrected."""
        hits = matching_indices(self.grid.numpy(), float(t))
        return int(hits[-1]) if len(hits) else None


def default_teacher_steps(scheduler, num_inference_steps: int, coarse_grid: Optional[Sequence[float]] = None) -> int:
    """About 5 n steps (capped at the training steps), chosen so that the teacher's grid contains the coarse grid
    (then per-step targets and trajectory errors exist): 5 n for "leading" spacing when T is divisible by 5 n,
    m n for "linspace" / "trailing", m (n - 1) + 1 for Euler's n-point linspace, ... The first count from
    5 n, 5 n + 1, ..., 20 n (then 5 n - 1 down to 2 n) whose grid contains ``coarse_grid`` wins, else 5 n (and the
    :class:`Teacher` adds the coarse times to its grid). 5 n keeps the teacher's first-order error at about a fifth
    of the coarse sampler's while the no-argument CLI run stays within a few CPU minutes; pass ``teacher_steps``
    for a more accurate reference.
    """
    n = int(num_inference_steps)
    cap = int(scheduler.config.num_train_timesteps)
    first = min(cap, 5 * n)
    if coarse_grid is None:
        return first
    if "FlowMatch" in type(scheduler).__name__:
        return 5 * n  # the flow teacher refines the coarse grid itself
    probe = copy.deepcopy(scheduler)
    # preferred: 5 n .. 20 n steps; then coarser teachers (down to 2 n) rather than none
    for m in list(range(first, min(cap, 20 * n) + 1)) + list(range(first - 1, 2 * n - 1, -1)):
        probe.set_timesteps(m)
        grid = grid_timesteps(probe).detach().to(torch.float64).cpu()
        if all(len(matching_indices(grid.numpy(), float(t))) for t in coarse_grid):
            return m
    return first
