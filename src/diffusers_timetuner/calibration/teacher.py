"""The teacher: a many-step sampler from the same x_T, the reference of the teacher objectives, the guard and the
held-out report. :class:`FineTeacher` (the default, ``teacher="dpmsolver++"``): DPM-Solver++ 2M on a fine grid, one
per calibration run, trajectories cached per batch, with its own error; :class:`Teacher` and
:func:`default_teacher_steps` (``teacher="same"``): the calibrated sampler itself at about 5 n steps."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from ..denoiser import NonFiniteOutputError
from ..sampling import grid_timesteps, sample, sample_trajectory
from ..table import matching_indices
from .prediction import to_epsilon


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


# The fine teacher's steps when none are given: DPM-Solver++ 2M at 100 steps is within ~5e-5 of a 400-step run
# (relative squared endpoint distance) on the exact GMM; see FineTeacher.self_error, reported with every run.
DEFAULT_FINE_TEACHER_STEPS = 100
FINE_TEACHER_NAME = "DPM-Solver++ 2M"  # recorded in tuning_info[n]["teacher"]


def _vp_alphas(scheduler) -> torch.Tensor:
    return scheduler.alphas_cumprod.detach().to("cpu", torch.float64)


# ------------------------------------------------------------------------------------------------------ teacher
def fine_teacher_scheduler(scheduler):
    """DPM-Solver++ 2M (data prediction, linspace grid, final sigma 0) on ``scheduler``'s noise schedule and
    prediction type: the fine teacher's solver (also the evaluation's teacher for latent VP pipelines)."""
    from diffusers import DPMSolverMultistepScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
    cfg = {k: scheduler.config[k] for k in keys if k in scheduler.config}
    return DPMSolverMultistepScheduler(**cfg, algorithm_type="dpmsolver++", solver_order=2,
                                       timestep_spacing="linspace", final_sigmas_type="zero", lower_order_final=True)


@dataclass
class FineTrajectory:
    """One batch of teacher trajectories: states (VP space) at the fine times and the noise prediction at each."""

    times: List[int]  # s_0 > s_1 > ... > s_{M-1} (integer training times); the clean end is index M
    states: List[torch.Tensor]  # M + 1 tensors: x at s_0 .. s_{M-1}, then the final sample
    eps: List[torch.Tensor]  # M tensors: eps_theta(x_{s_k}, s_k)


class FineTeacher:
    """An accurate reference: DPM-Solver++ (2M, data prediction) on a fine grid of ``num_steps`` integer times.

    It runs the same network (same guidance) on the same noise schedule and prediction type as the coarse sampler,
    from the same normalised x_T; the trajectory of a batch is computed once and cached (keyed by the batch's
    noise), so every stage of a calibration (grid search, tau, guard, held-out report) reuses it. States between
    fine times are first-order (DDIM) steps from the fine state above, over less than one fine spacing.

    Args:
        denoiser: the coarse sampler's denoiser.
        scheduler: the coarse (untuned) scheduler; its noise schedule and prediction type are copied.
        num_steps: fine steps M (the yardstick's accuracy; see :meth:`self_error`).
    """

    def __init__(self, denoiser, scheduler, num_steps: int, device=None):
        self.denoiser = denoiser
        self.device = device
        self.num_inference_steps = int(num_steps)
        self.scheduler = fine_teacher_scheduler(scheduler)
        self.scheduler.set_timesteps(self.num_inference_steps, device=device)
        self.times = [int(t) for t in self.scheduler.timesteps.tolist()]
        self.alphas = _vp_alphas(self.scheduler)
        self.coarse_scheduler = scheduler
        self._cache: Dict[tuple, FineTrajectory] = {}

    @staticmethod
    def supports(scheduler) -> bool:
        """A variance-preserving noise schedule (betas) whose states the fine teacher's can be mapped to: DDIM,
        DDPM, DPM-Solver, Euler, UniPC; not flow matching, consistency models or Heun (their own teacher)."""
        cfg = scheduler.config
        return ("beta_schedule" in cfg and getattr(scheduler, "alphas_cumprod", None) is not None
                and not cfg.get("use_flow_sigmas", False) and "Heun" not in type(scheduler).__name__)

    @staticmethod
    def _key(noise: torch.Tensor, cond) -> tuple:
        flat = noise.detach().reshape(-1).double().cpu()
        c = None if cond is None else tuple(sorted((k, float(torch.as_tensor(v).double().sum()))
                                                   for k, v in cond.items() if torch.is_tensor(v)))
        return tuple(noise.shape), float(flat.sum()), float(flat.abs().sum()), float(flat[:7].sum()), c

    @torch.no_grad()
    def fine_trajectory(self, noise: torch.Tensor, cond=None) -> FineTrajectory:
        """The teacher's trajectory from standard normal ``noise`` (cached)."""
        key = self._key(noise, cond)
        if key in self._cache:
            return self._cache[key]
        states, eps = [], []

        def keep(info):
            states.append(info["x"])
            x_in = info["x"]  # DPM-Solver's state is the VP network input (scale_model_input is the identity)
            eps.append(to_epsilon(info["model_output"], x_in, float(info["t"]), self.scheduler))
            if len(states) == self.num_inference_steps:
                states.append(info["prev_sample"])

        sched = copy.deepcopy(self.scheduler)
        try:
            sample(self.denoiser, sched, noise.to(self.device), None, cond, callback=keep)
        except NonFiniteOutputError as err:  # say that it was the teacher, not a step of the calibrated sampler
            raise err.at(f"in the {len(sched.timesteps)}-step teacher sampler", "timestep(s)") from None
        traj = FineTrajectory(list(self.times), states, eps)
        self._cache[key] = traj
        return traj

    def state_at(self, traj: FineTrajectory, t: float) -> torch.Tensor:
        """The teacher's VP state at integer time t (a fine state, or a DDIM step from the fine state above)."""
        for k, s in enumerate(traj.times):
            if abs(s - t) < 1e-6:
                return traj.states[k]
        above = [k for k, s in enumerate(traj.times) if s > t]
        if not above:  # above the teacher's start: the start state (x_T) is the best there is
            return traj.states[0]
        k = above[-1]
        return ddim_jump(self.alphas, traj.times[k], t, traj.states[k], traj.eps[k])

    # The interface the tau machinery uses (``Teacher``): states in the coarse scheduler's state space.
    def targets(self, x_T, init_noise_sigma, cond, coarse_grid: Sequence[float]) -> List[Optional[torch.Tensor]]:
        traj = self.fine_trajectory(x_T / float(init_noise_sigma), cond)
        out = [self._to_coarse_space(self.state_at(traj, float(t)), float(t)) for t in coarse_grid]
        return out + [traj.states[-1]]

    def grid_indices(self, coarse_grid: Sequence[float]) -> List[int]:
        """Every integer time has a teacher state (see :meth:`state_at`)."""
        return list(range(len(coarse_grid)))

    def _to_coarse_space(self, x_vp: torch.Tensor, t: float) -> torch.Tensor:
        sched = self.coarse_scheduler
        if float(getattr(sched, "init_noise_sigma", 1.0)) == 1.0:
            return x_vp
        # sigma-space samplers (Euler): x = x_vp / alpha_t
        return x_vp / float(self.alphas[int(round(t))].sqrt())

    @torch.no_grad()
    def self_error(self, noise: torch.Tensor, cond=None, factor: int = 2) -> Dict[str, float]:
        """Mean squared endpoint distance (sum over pixels) of this teacher to the same solver at ``factor`` times
        the steps, from the same noise, beside the typical squared norm of a sample: the yardstick's own error."""
        mine = self.fine_trajectory(noise, cond).states[-1]
        longer = copy.deepcopy(self.scheduler)
        longer.set_timesteps(min(self.num_inference_steps * factor, int(self.scheduler.config.num_train_timesteps)),
                             device=self.device)
        try:
            ref = sample(self.denoiser, longer, noise.to(self.device), None, cond)
        except NonFiniteOutputError as err:
            raise err.at(f"in the {len(longer.timesteps)}-step teacher sampler", "timestep(s)") from None
        err = (mine - ref).double().pow(2).flatten(1).sum(1)
        return {"teacher_steps": self.num_inference_steps, "reference_steps": len(longer.timesteps),
                "endpoint_mse": float(err.mean()), "endpoint_mse_se": float(err.std() / max(len(err), 2) ** 0.5),
                "sample_sq_norm": float(ref.double().pow(2).flatten(1).sum(1).mean())}


def ddim_jump(alphas: torch.Tensor, s: float, t: float, x_s: torch.Tensor, eps_s: torch.Tensor) -> torch.Tensor:
    """First-order (DDIM, eta = 0) step from time s to t (t < 0: the clean end, alpha = 1), VP space."""
    a_s = float(alphas[int(round(s))])
    a_t = 1.0 if t < 0 else float(alphas[int(round(t))])
    x0 = (x_s - math.sqrt(1 - a_s) * eps_s) / math.sqrt(a_s)
    return math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * eps_s
