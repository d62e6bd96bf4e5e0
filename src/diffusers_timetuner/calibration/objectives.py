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
  the measured defaults noted in ``api.py``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .nonfinite import finite_losses
from .prediction import alpha_sigma_at
from .rollout import ChunkState, Rollout

# Teacher moved to teacher.py; re-exported for callers that import it from here.
from .teacher import Teacher  # noqa: F401

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

    @finite_losses
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

    @finite_losses
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

    @finite_losses
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
