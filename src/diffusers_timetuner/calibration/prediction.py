"""What a network output means and where a state lives, per scheduler family: the conversions calibration needs.

Two noise processes are supported, both of the form x_t = alpha_t x_0 + sigma_t eps in the network's input space:

- VP (DDPM-trained eps / v / x_0 models; DDIM, DDPM, DPM-Solver, Euler, Heun, UniPC): alpha_t = sqrt(abar_t),
  sigma_t = sqrt(1 - abar_t), with abar at fractional t by ``noise_schedule.alpha_bar_at``;
- flow matching (rectified flow; `FlowMatchEulerDiscreteScheduler`, UniPC with ``use_flow_sigmas``): a timestep t is
  s = t / num_train_timesteps, x_s = (1 - s) x_0 + s eps, and the network predicts the velocity v = eps - x_0
  (``prediction_type`` "flow_prediction" in UniPC; FlowMatchEuler has no such key and always means it). Then
  eps = x_s + (1 - s) v and x_0 = x_s - s v.

Consistency models (`CMStochasticIterativeScheduler`) fit neither: their network output is turned into x_0 by the
scheduler's own boundary scalings, so the eps-based objectives refuse them with a ValueError.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ..noise_schedule import alpha_bar_at

FLOW_PREDICTION = "flow_prediction"


def is_flow_matching(scheduler) -> bool:
    """Whether ``scheduler`` integrates the rectified flow x_s = (1 - s) x_0 + s eps (timesteps = s * T)."""
    name = type(scheduler).__name__
    if "FlowMatch" in name:
        return True
    cfg = scheduler.config
    return bool(cfg.get("use_flow_sigmas", False)) or cfg.get("prediction_type") == FLOW_PREDICTION


def is_consistency_model(scheduler) -> bool:
    return "CMStochasticIterative" in type(scheduler).__name__


def prediction_type(scheduler) -> str:
    """The scheduler's ``prediction_type``; flow-matching Euler (which has no such key) predicts the velocity."""
    if "FlowMatch" in type(scheduler).__name__:
        return FLOW_PREDICTION
    return scheduler.config.get("prediction_type", "epsilon")


def timestep_bounds(scheduler) -> Tuple[float, float]:
    """The range a tuned tau may take: [0, T - 1] for VP timesteps, [0, T] (s in [0, 1]) for flow matching, up to
    250 log sigma_max for consistency models (the TimeTuner class's own table bound)."""
    if is_consistency_model(scheduler):
        return 0.0, float(scheduler.sigma_to_t(scheduler.config.sigma_max))
    top = int(scheduler.config.num_train_timesteps)
    return (0.0, float(top)) if is_flow_matching(scheduler) else (0.0, float(top - 1))


def alpha_sigma_at(scheduler, t) -> Tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) of x_t = alpha_t x_0 + sigma_t eps in the network's input space at a (fractional) time t."""
    if is_consistency_model(scheduler):
        raise ValueError(
            f"{type(scheduler).__name__}: a consistency model's output is turned into x_0 by the scheduler's "
            "boundary scalings (c_skip, c_out), not through a noise prediction, so the paper's eps objectives "
            "(eq. 9 / 10) do not apply; use objective='teacher_local' or 'endpoint'."
        )
    if is_flow_matching(scheduler):
        s = torch.as_tensor(t, dtype=torch.float64) / float(scheduler.config.num_train_timesteps)
        return (1.0 - s).float(), s.float()
    a = alpha_bar_at(scheduler.alphas_cumprod.to(torch.float64), t)  # the package's one fractional-time rule
    return a.sqrt().float(), (1 - a).sqrt().float()


def to_epsilon(model_output: torch.Tensor, x_in: torch.Tensor, t, scheduler) -> torch.Tensor:
    """A network output in the scheduler's prediction type as a noise prediction eps at time t.

    ``x_in`` is the network input (after ``scale_model_input``): x_t = alpha_t x_0 + sigma_t eps.
    """
    kind = prediction_type(scheduler)
    if kind == "epsilon":
        return model_output
    alpha, sigma = alpha_sigma_at(scheduler, t)
    alpha, sigma = alpha.to(x_in), sigma.to(x_in)
    if kind == FLOW_PREDICTION:
        return x_in + alpha * model_output  # eps = x_s + (1 - s) v
    if kind == "sample":
        return (x_in - alpha * model_output) / sigma
    if kind == "v_prediction":
        return alpha * model_output + sigma * x_in
    raise ValueError(f"Unsupported prediction_type {kind!r}: expected 'epsilon', 'sample', 'v_prediction' or "
                     f"{FLOW_PREDICTION!r}.")


def noisy_state(scheduler, x0: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """x_t from data and noise at grid time(s) ``timestep`` (B,), in the scheduler's state space, through the
    scheduler's own method (``add_noise``, or ``scale_noise`` for flow-matching Euler)."""
    if hasattr(scheduler, "add_noise"):
        return scheduler.add_noise(x0, noise, timestep)
    if hasattr(scheduler, "scale_noise"):
        return scheduler.scale_noise(x0, timestep, noise)
    raise ValueError(f"{type(scheduler).__name__} cannot put data at a noise level (no add_noise / scale_noise): "
                     "use strategy='data_free'.")


def set_grid(scheduler, num_inference_steps: int, device=None, *, timesteps: Optional[Sequence[int]] = None,
             sigmas: Optional[Sequence[float]] = None, mu: Optional[float] = None) -> None:
    """``set_timesteps`` for a calibration grid: the scheduler's own for n steps, a custom ``timesteps`` /
    ``sigmas`` grid, and the dynamic shift ``mu`` (flow matching) where given."""
    kwargs = {"device": device}
    if mu is not None:
        kwargs["mu"] = mu
    if sigmas is not None:
        scheduler.set_timesteps(sigmas=list(sigmas), **kwargs)
    elif timesteps is not None:
        scheduler.set_timesteps(timesteps=list(timesteps), **kwargs)
    else:
        scheduler.set_timesteps(num_inference_steps, **kwargs)
