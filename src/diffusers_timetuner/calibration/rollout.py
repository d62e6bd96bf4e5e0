"""Step-by-step sampling with cached states: the engine every objective and optimiser evaluates candidates on.

A :class:`Rollout` holds one *untuned* copy of the scheduler for n steps (its ``timesteps`` are the grid t_i) and
advances :class:`ChunkState` objects (a mini-batch of states x~_{t_i} plus the scheduler's own history, needed by
multistep solvers) one step at a time through the very function :func:`diffusers_timetuner.sampling.sample` uses at
inference (``sampling.denoising_step``: ``scale_model_input`` -> network -> ``scheduler.step``). The only difference: the network is fed
a candidate tau_i while ``step`` is told the grid time t_i to find its step index. By the scheduler contract the
update t_i -> t_{i-1} depends only on that index, never on tau, so this is exactly the step a tuned scheduler takes
(``tests/test_calibration.py`` checks that the cached states equal ``sample()`` with the tuned scheduler).

Indices: ``j = 0 .. n-1`` in sampling order; step j integrates from grid[j] = t_{K-j} to t_{K-j-1}.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from ..denoiser import Conditioning
from ..sampling import denoising_step, grid_timesteps, init_noise_sigma, scale_model_input, step_kwargs
from .nonfinite import names_the_step
from .prediction import alpha_sigma_at, noisy_state, set_grid, to_epsilon  # noqa: F401  (re-exported)


@dataclass
class ChunkState:
    """A mini-batch of calibration samples at one point of the coarse trajectory.

    Args:
        x: the state x~_{t_i} in the scheduler's state space (what ``step`` receives as ``sample``).
        scheduler: the scheduler object after the steps already taken (multistep history lives here).
        j: index of the next step to take (0 = at x_T).
        cond: network keyword inputs for these samples.
        seed: base seed of this chunk's step noise (stochastic schedulers only).
        extras: per-chunk tensors objectives need (x0 for eq. 10, teacher states, ...).
    """

    x: torch.Tensor
    scheduler: object
    j: int
    cond: Conditioning = None
    seed: int = 0
    extras: Dict[str, object] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.x.shape[0]


class Rollout:
    """Advance calibration states through the coarse sampler of ``num_inference_steps`` steps.

    Args:
        denoiser: ``denoiser(x, tau, cond) -> model_output`` (a :class:`~diffusers_timetuner.denoiser.Denoiser`).
        scheduler: an untuned scheduler (any diffusers scheduler works for stepping; TimeTuner schedulers are
            untuned when their table has no entry for n).
        num_inference_steps: n, the number of model evaluations of the coarse sampler.
        eta: DDIM's eta (passed to ``step`` when accepted).
        device: where states live.
        timesteps: a custom grid t_K > ... > t_1 (integers, ``set_timesteps(timesteps=...)``) instead of the
            scheduler's own grid for ``num_inference_steps``; its length must be ``num_inference_steps``.
        sigmas: a custom sigma grid (flow matching: ``set_timesteps(sigmas=...)``, shifted by the scheduler).
        mu: the dynamic time shift of flow-matching schedulers with ``use_dynamic_shifting`` (what Flux pipelines
            compute from the image size).
    """

    def __init__(self, denoiser, scheduler, num_inference_steps: int, *, eta: Optional[float] = None, device=None,
                 timesteps: Optional[Sequence[int]] = None, sigmas: Optional[Sequence[float]] = None,
                 mu: Optional[float] = None):
        self.denoiser = denoiser
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.num_inference_steps = num_inference_steps
        self.custom_grid = None if timesteps is None else [int(t) for t in timesteps]
        self.custom_sigmas = None if sigmas is None else [float(s) for s in sigmas]
        self.mu = mu
        # The untuned sampler (the baseline: exactly the parent scheduler) ...
        self.scheduler = copy.deepcopy(scheduler)
        self.set_grid(self.scheduler)
        # t_K, ..., t_1 in sampling order: what the solver integrates on.
        self.grid = grid_timesteps(self.scheduler).detach().to(torch.float64).cpu()
        # ... and the stepping scheduler: the same config with the identity table tau_i = t_i, so that every step
        # takes the tuned scheduler's code path (for DDIM with "trailing"/"linspace" spacing the untuned parent
        # steps off the grid, a tuned table always lands on it).
        # A sampler with two evaluations per step (Heun) repeats grid times, so it has no identity table; its parent
        # finds the step from its own counter, and the untuned scheduler steps for it.
        self.stepper = self.scheduler
        grid = self.grid.tolist()
        if hasattr(scheduler, "with_tuned_timesteps") and len(set(grid)) == len(grid):
            self.stepper = scheduler.with_tuned_timesteps(num_inference_steps, grid, grid=grid)
            self.set_grid(self.stepper)
        # Step-index keys: what `step` is told (tau_i = t_i in float32 for the identity table).
        self.keys = self.stepper.timesteps
        count = getattr(scheduler, "_num_evaluations", lambda n: n)(num_inference_steps)
        if self.custom_grid is None and self.custom_sigmas is None and len(self.keys) != count:
            raise ValueError(
                f"{type(scheduler).__name__} makes {len(self.keys)} model evaluations for num_inference_steps="
                f"{num_inference_steps}, expected {count}; calibration needs one timestep per model evaluation."
            )
        self.eta = eta

    def set_grid(self, scheduler) -> None:
        """``set_timesteps`` for this rollout's grid: the scheduler's own for n steps, or the custom one (and mu)."""
        set_grid(scheduler, self.num_inference_steps, self.device, timesteps=self.custom_grid,
                 sigmas=self.custom_sigmas, mu=self.mu)

    @property
    def num_evaluations(self) -> int:
        """Model evaluations of the coarse sampler (n; 2n - 1 for Heun): one tau each, indexed j = 0 .. E - 1."""
        return len(self.keys)

    def mid_step(self, state: ChunkState) -> bool:
        """Whether ``state`` is a two-evaluation solver's intermediate (Heun's predictor, before its corrector)."""
        return not getattr(state.scheduler, "state_in_first_order", True)

    @functools.cached_property
    def stochastic(self) -> bool:
        """Whether the solver's steps draw noise (DDPM, DDIM with eta > 0, SDE variants of DPM-Solver, ...).

        Found by taking the first step twice on a tiny dummy input with two different generators (any scheduler,
        no network call): a stochastic sampler's per-sample error to a deterministic teacher rewards shrinking the
        sample spread, so the guard and held-out report judge such samplers by a distribution distance instead.
        """
        x = torch.ones((1, 1, 2, 2), device=self.device)
        key = self.keys[0]
        outs = []
        for seed in (0, 1):
            sched = copy.deepcopy(self.stepper)
            gen = torch.Generator(device=self.device).manual_seed(seed)
            no_network = lambda x_in, t, cond: torch.zeros_like(x_in)  # noqa: E731
            outs.append(denoising_step(no_network, sched, x, key, extra=step_kwargs(sched, self.eta, gen)).prev_sample)
        return not torch.equal(outs[0], outs[1])

    # ------------------------------------------------------------------ states
    def initial_state(self, x_T: torch.Tensor, cond: Conditioning = None, seed: int = 0, **extras) -> ChunkState:
        """A chunk at x_T (already in the scheduler's state space, e.g. ``noise * init_noise_sigma``)."""
        return ChunkState(x_T.to(self.device), copy.deepcopy(self.stepper), 0, cond, seed, dict(extras))

    def noise_to_state(self, noise: torch.Tensor) -> torch.Tensor:
        """x_T from standard normal noise, as ``sample()`` does (data-free mode)."""
        return noise.to(self.device) * init_noise_sigma(self.scheduler)

    def data_to_state(self, x0: torch.Tensor, noise: torch.Tensor, j: int = 0) -> torch.Tensor:
        """x_{t} = alpha_t x_0 + sigma_t eps at grid[j] through the scheduler's own ``add_noise`` (Alg. 1 / eq. 11;
        ``scale_noise`` for flow matching: x_s = (1 - s) x_0 + s eps)."""
        t = self.scheduler.timesteps[j : j + 1].expand(x0.shape[0]).to(self.device)
        return noisy_state(self.scheduler, x0.to(self.device), noise.to(self.device), t)

    def grid_state_scheduler(self, j: int):
        """A scheduler positioned at step j without history (parallel strategy, one-step solvers only)."""
        sched = copy.deepcopy(self.stepper)
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(j)
        return sched

    # ------------------------------------------------------------------ one step
    @names_the_step("tau")
    def step(self, state: ChunkState, tau, *, keep: bool = False) -> ChunkState:
        """Take step j = ``state.j`` with the network fed ``tau`` (a float or a 0-d tensor, may require grad).

        Returns the new state at j + 1. The input state is left untouched (its scheduler is deep-copied) unless
        ``keep=True``, which advances it in place (used once tau_j is decided).
        """
        j = state.j
        sched = state.scheduler if keep else copy.deepcopy(state.scheduler)
        tau = tau if torch.is_tensor(tau) else torch.tensor(float(tau), dtype=torch.float32)
        # Stochastic steps (DDPM, eta > 0) draw their noise from a generator seeded per (chunk, step).
        extra = step_kwargs(sched, self.eta, self._generator(state))
        prev, model_output, x_in = denoising_step(self.denoiser, sched, state.x, self.keys[j], state.cond,
                                                  model_time=tau.to(self.device, torch.float32), extra=extra)
        new = ChunkState(prev, sched, j + 1, state.cond, state.seed, state.extras)
        new.extras = dict(state.extras, last_model_output=model_output, last_model_input=x_in)
        if keep:
            state.x, state.j, state.extras = prev, j + 1, new.extras
            return state
        return new

    def run(self, state: ChunkState, taus: Sequence[float], stop: Optional[int] = None) -> ChunkState:
        """Roll ``state`` forward with ``taus[j]`` for j = state.j .. stop - 1 (default: to the end)."""
        stop = self.num_evaluations if stop is None else stop
        while state.j < stop:
            state = self.step(state, taus[state.j])
        return state

    def model_input(self, state: ChunkState) -> torch.Tensor:
        """The network input at state j (VP space), without touching the state's scheduler."""
        sched = copy.deepcopy(state.scheduler)
        return scale_model_input(sched, state.x, self.keys[state.j])

    @names_the_step("the grid time")
    def epsilon_at_grid(self, state: ChunkState) -> torch.Tensor:
        """eps_theta(x~_{t_i}, t_i): the network at the untuned grid time of state j, converted to eps."""
        x_in = self.model_input(state)
        t = self.keys[state.j]
        out = self.denoiser(x_in, torch.as_tensor(t, dtype=torch.float32), state.cond)
        return to_epsilon(out, x_in, float(t), self.scheduler)

    def _generator(self, state: ChunkState) -> torch.Generator:
        # Common random numbers: the same step noise for every candidate tau of step j of this chunk.
        return torch.Generator(device=self.device).manual_seed(int(state.seed) * 1009 + state.j)

    @property
    def grid_list(self) -> List[float]:
        return [float(t) for t in self.grid]
