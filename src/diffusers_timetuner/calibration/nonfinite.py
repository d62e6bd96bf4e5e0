"""Stop a calibration at the first non-finite value, saying at which step of which sampler it appeared.

The :class:`~diffusers_timetuner.denoiser.Denoiser` refuses a non-finite network output but does not know the step;
:func:`names_the_step` wraps the :class:`~.rollout.Rollout` methods that call it and adds the step index, its grid
time and whether the network was fed a tuned tau or the grid time. A finite output can still give a non-finite loss
(a huge output overflows the step's float32 arithmetic): :func:`finite_losses` wraps an objective's ``losses``.
"""

from __future__ import annotations

import functools

import torch

from ..denoiser import NonFiniteOutputError


def _step(rollout, j: int) -> str:
    return f"at step {j} of the {rollout.num_inference_steps}-step sampler (grid t = {rollout.grid_list[j]:g})"


def names_the_step(fed: str):
    """Decorate a Rollout method ``(self, state, ...)`` that evaluates the network at step ``state.j``; ``fed`` says
    what the network got there ("tau" or "the grid time")."""

    def decorate(method):
        @functools.wraps(method)
        def wrapper(self, state, *args, **kwargs):
            try:
                return method(self, state, *args, **kwargs)
            except NonFiniteOutputError as err:
                if err.where is not None:  # a nested call already said where
                    raise
                raise err.at(_step(self, state.j), fed) from None

        return wrapper

    return decorate


def finite_losses(losses):
    """Decorate ``Objective.losses(self, rollout, state, tau, taus)``: refuse NaN / inf losses."""

    @functools.wraps(losses)
    def wrapper(self, rollout, state, tau, taus):
        out = losses(self, rollout, state, tau, taus)
        if not bool(torch.isfinite(out.detach()).all()):
            bad = int((~torch.isfinite(out.detach())).sum())
            raise ValueError(
                f"The {self.name} loss is not finite (NaN or inf) for {bad} of {out.numel()} samples "
                f"{_step(rollout, state.j)} with tau = {float(torch.as_tensor(tau).detach()):g}, although the "
                "network's outputs there were finite: the step overflowed float32 (outputs near 3.4e38 or a "
                "scheduler that divides by ~0). Check the network's output scale and its prediction_type against the "
                "scheduler's."
            )
        return out

    return wrapper
