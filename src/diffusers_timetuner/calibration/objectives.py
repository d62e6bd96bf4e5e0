"""Per-step calibration objectives: what a candidate tau_i is scored by.

Every objective returns per-sample losses (the sum of squares over all pixels of one sample, as the reference code
does); the strategy averages them over the whole calibration set (all processes). Notation: sampling-order index
j = K - i, so step j integrates t_i -> t_{i-1} with grid[j] = t_i, grid[j + 1] = t_{i-1}.

- ``paper`` (eq. 9): ``|| eps(f_tau(x~_{t_i}, tau_i), t_{i-1}) - eps(x~_{t_i}, t_i) ||^2``, both network calls at the
  *untuned* grid times; the last step (t_1 -> t_0) is never tuned.
- ``paper_x0`` (eq. 10, Theorem 2): same first term, target ``(x~_{t_i} - alpha_{t_i} x_0) / sigma_{t_i}`` (needs the
  data x_0 each trajectory started from).
- ``teacher_local``: ``|| f_tau(x~_{t_i}, tau_i) - x^teacher_{t_{i-1}} ||^2``, the state after the step vs the state
  of a many-step teacher from the same x_T at the same grid time (the last step included: its target is the teacher's
  final sample).
- ``endpoint``: ``|| x~_0(tau) - x^teacher_0 ||^2``: the final sample of the whole coarse sampler (later steps at their
  current tau) vs the teacher's final sample from the same x_T. Costs a roll-out per candidate; the best objective
  on the exact GMM (held-out error -35 %); on the MNIST UNet at 32 samples nothing was measurable (see
  ``api.DEFAULT_OBJECTIVE``).
"""

from __future__ import annotations

import copy
from typing import List, Optional, Sequence

import torch

from ..sampling import grid_timesteps, sample_trajectory
from .prediction import is_flow_matching
from .rollout import ChunkState, Rollout, alpha_sigma_at

OBJECTIVES = ("paper", "paper_x0", "teacher_local", "endpoint")


def per_sample_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sum of squares over all non-batch dimensions: shape (B,)."""
    return (a.double() - b.double()).pow(2).flatten(1).sum(dim=1)  # float64: sums independent of batch split


class Objective:
    """Base class. Subclasses implement :meth:`prepare_step` (cache what does not depend on tau) and :meth:`losses`."""

    name = "objective"
    needs_data = False  # needs x_0 for every calibration trajectory
    needs_teacher = False
    tunes_last_step = False
    local = True  # evaluates one step only (parallel strategy possible)

    def check(self, rollout: Rollout) -> None:
        """Raise a ValueError if this objective does not apply to the rollout's sampler (before any tuning)."""

    def prepare_step(self, rollout: Rollout, state: ChunkState) -> None:
        """Cache tau-independent quantities of step ``state.j`` in ``state.extras``."""

    def losses(self, rollout: Rollout, state: ChunkState, tau, taus: Sequence[float]) -> torch.Tensor:
        """Per-sample losses (B,) of taking step ``state.j`` with the network fed ``tau``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class PaperObjective(Objective):
    """Eq. 9 of the paper: consistency of the noise prediction across the step (see module docstring)."""

    name = "paper"

    def check(self, rollout: Rollout) -> None:
        """Refuse samplers eq. 9 / 10 are not defined for (a ValueError saying what to use instead)."""
        if rollout.num_evaluations != rollout.num_inference_steps:
            raise ValueError(
                f"objective={self.name!r} compares noise predictions at consecutive grid times t_i -> t_(i-1); "
                f"{type(rollout.scheduler).__name__} evaluates the network twice per step (its predictor state is "
                "not a grid state), so eq. 9 / 10 are not defined for it. Use objective='teacher_local' or 'endpoint'."
            )
        alpha_sigma_at(rollout.scheduler, float(rollout.keys[0]))  # consistency models: refused there

    def prepare_step(self, rollout, state):
        with torch.no_grad():
            # eps_theta(x~_{t_i}, t_i): the untuned time t_i, on the current (already tuned) trajectory.
            state.extras["target"] = rollout.epsilon_at_grid(state)

    def losses(self, rollout, state, tau, taus):
        nxt = rollout.step(state, tau)  # x~_{t_{i-1}} = f_tau(x~_{t_i}, tau_i)
        eps_next = rollout.epsilon_at_grid(nxt)  # eps_theta(x~_{t_{i-1}}, t_{i-1})
        return per_sample_sq(eps_next, state.extras["target"])


class PaperX0Objective(PaperObjective):
    """Eq. 10 (Theorem 2): the target is the true noise of x~_{t_i} w.r.t. the data x_0 it started from."""

    name = "paper_x0"
    needs_data = True

    def prepare_step(self, rollout, state):
        x_in = rollout.model_input(state)  # VP-space x~_{t_i}
        alpha, sigma = alpha_sigma_at(rollout.scheduler, float(rollout.keys[state.j]))
        state.extras["target"] = (x_in - alpha.to(x_in) * state.extras["x0"].to(x_in)) / sigma.to(x_in)


class TeacherLocalObjective(Objective):
    """Match the teacher's state at the next grid time, one step at a time."""

    name = "teacher_local"
    needs_teacher = True
    tunes_last_step = True

    def losses(self, rollout, state, tau, taus):
        nxt = rollout.step(state, tau)
        if nxt.j < rollout.num_evaluations and rollout.mid_step(nxt):
            # Heun's predictor: score the state after its corrector (at the corrector's current tau)
            nxt = rollout.step(nxt, taus[nxt.j])
        return per_sample_sq(nxt.x, state.extras["teacher_states"][nxt.j])


class EndpointObjective(Objective):
    """Match the teacher's final sample after rolling out the remaining steps with their current taus."""

    name = "endpoint"
    needs_teacher = True
    tunes_last_step = True
    local = False

    def losses(self, rollout, state, tau, taus):
        final = rollout.run(rollout.step(state, tau), taus)
        return per_sample_sq(final.x, state.extras["teacher_states"][-1])


def get_objective(name: str) -> Objective:
    classes = {
        "paper": PaperObjective,
        "paper_x0": PaperX0Objective,
        "teacher_local": TeacherLocalObjective,
        "endpoint": EndpointObjective,
    }
    if isinstance(name, Objective):
        return name
    if name not in classes:
        raise ValueError(f"Unknown objective {name!r}: choose one of {', '.join(OBJECTIVES)}.")
    return classes[name]()


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
        if is_flow_matching(sched) and "FlowMatch" in type(sched).__name__:
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
        out = []
        for t in coarse_grid:
            hits = torch.nonzero((self.grid - float(t)).abs() <= 1e-3).flatten()
            if len(hits) == 0:
                return None
            out.append(int(hits[0]))
        return out

    @torch.no_grad()
    def trajectory(self, x_T: torch.Tensor, init_noise_sigma: float, cond=None) -> List[torch.Tensor]:
        """All teacher states [x_{s_M}, ..., x_{s_0}] from the coarse sampler's x_T (in its state space)."""
        # Same normalised noise: the coarse state is noise * init_noise_sigma of the coarse scheduler.
        noise = x_T / float(init_noise_sigma)
        sched = copy.deepcopy(self.scheduler)
        return sample_trajectory(self.denoiser, sched, noise, None, cond, generator=torch.Generator().manual_seed(0))

    def targets(self, x_T, init_noise_sigma, cond, coarse_grid: Sequence[float]) -> List[Optional[torch.Tensor]]:
        """Teacher states aligned with the coarse trajectory: entry j is the teacher at coarse grid[j] (None where
        the teacher's grid misses that time), the last entry (index n) the teacher's final sample."""
        states = self.trajectory(x_T, init_noise_sigma, cond)
        idx = [self._index_of(t) for t in coarse_grid]
        return [states[k] if k is not None else None for k in idx] + [states[-1]]

    def _index_of(self, t: float) -> Optional[int]:
        # The last hit: a Heun teacher visits each grid time twice, first as its predictor, then corrected.
        hits = torch.nonzero((self.grid - float(t)).abs() <= 1e-3).flatten()
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
    if coarse_grid is None or "FlowMatch" in type(scheduler).__name__:
        return 5 * n if coarse_grid is not None else first  # the flow teacher refines the coarse grid itself
    probe = copy.deepcopy(scheduler)
    want = torch.tensor([float(t) for t in coarse_grid], dtype=torch.float64)
    # preferred: 5 n .. 20 n steps; then coarser teachers (down to 2 n) rather than none
    for m in list(range(first, min(cap, 20 * n) + 1)) + list(range(first - 1, 2 * n - 1, -1)):
        probe.set_timesteps(m)
        grid = grid_timesteps(probe).detach().to(torch.float64).cpu()
        if all(bool(((grid - t).abs() <= 1e-3).any()) for t in want):
            return m
    return first
