"""One sampling loop, shared by pipelines of the testbeds, calibration, metrics and benchmarks.

It is the loop every diffusers pipeline runs (``scale_model_input`` -> network -> ``step``), written once so that
calibration evaluates exactly the code path used at inference. Like k-diffusion's samplers it has one contract and a
callback with fixed keys:

    callback({"i": i, "t": t_i, "tau": tau_i, "x": x_{t_i}, "model_output": ..., "prev_sample": x_{t_{i-1}}})

where ``t_i`` is the grid time the solver integrates from and ``tau_i`` the time the network saw (equal when untuned).
"""

from __future__ import annotations

import inspect
from typing import Callable, Dict, List, NamedTuple, Optional

import torch
from tqdm.auto import tqdm

from .denoiser import Conditioning

StepCallback = Callable[[Dict[str, object]], None]


def step_kwargs(scheduler, eta: Optional[float] = None, generator: Optional[torch.Generator] = None) -> dict:
    """``eta`` / ``generator`` for schedulers whose ``step`` accepts them (what diffusers pipelines pass)."""
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if eta is not None and "eta" in params:
        kwargs["eta"] = eta
    if generator is not None and "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def grid_timesteps(scheduler) -> torch.Tensor:
    """The grid t_i the solver integrates on: ``grid_timesteps`` for TimeTuner schedulers, else ``timesteps``."""
    grid = getattr(scheduler, "grid_timesteps", None)
    return grid if grid is not None else scheduler.timesteps


def init_noise_sigma(scheduler) -> float:
    """x_T = noise * this: the scheduler's ``init_noise_sigma`` (flow-matching schedulers have none: 1)."""
    return getattr(scheduler, "init_noise_sigma", 1.0)


def scale_model_input(scheduler, x: torch.Tensor, timestep) -> torch.Tensor:
    """``scheduler.scale_model_input`` where it exists (flow-matching schedulers feed the state unscaled)."""
    scale = getattr(scheduler, "scale_model_input", None)
    return x if scale is None else scale(x, timestep)


class StepOutput(NamedTuple):
    """What one sampler step made: x_{t_{i-1}}, the network's output and its input (after ``scale_model_input``)."""

    prev_sample: torch.Tensor
    model_output: torch.Tensor
    model_input: torch.Tensor


def denoising_step(denoiser, scheduler, x: torch.Tensor, timestep, cond: Conditioning = None, *,
                   model_time=None, extra: Optional[dict] = None) -> StepOutput:
    """One step of every sampling loop here: ``scale_model_input`` -> network -> ``scheduler.step``.

    ``timestep`` is what the scheduler is told (it finds its step index from it); the network sees ``model_time``
    (default: ``timestep``). Calibration feeds a candidate tau as ``model_time`` while telling the scheduler the
    grid key, which by the scheduler contract is exactly the step a tuned scheduler takes. ``extra``: ``step``'s
    keyword arguments (:func:`step_kwargs`).
    """
    x_in = scale_model_input(scheduler, x, timestep)
    model_output = denoiser(x_in, timestep if model_time is None else model_time, cond)
    prev = scheduler.step(model_output, timestep, x, **(extra or {})).prev_sample
    return StepOutput(prev, model_output, x_in)


@torch.no_grad()
def sample(
    denoiser: Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor],
    scheduler,
    noise: torch.Tensor,
    num_inference_steps: Optional[int] = None,
    cond: Conditioning = None,
    *,
    eta: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    callback: Optional[StepCallback] = None,
    progress: bool = False,
) -> torch.Tensor:
    """Run ``scheduler`` from ``noise`` (x_T before ``init_noise_sigma`` scaling) to a sample.

    Args:
        denoiser: ``denoiser(x, tau, cond) -> model_output``, usually a :class:`~diffusers_timetuner.denoiser.Denoiser`.
        scheduler: any diffusers scheduler; TimeTuner schedulers feed tau_i, others feed t_i.
        noise: standard normal x_T, shape (B, C, H, W).
        num_inference_steps: calls ``scheduler.set_timesteps(n, device)`` first; ``None`` keeps the current timesteps.
        cond: keyword inputs of the network (``class_labels``, ``encoder_hidden_states``, ...), batch-first.
        eta, generator: passed to ``step`` when its signature accepts them (DDIM's eta, stochastic samplers' noise).
        callback: called after every step with the keys listed in the module docstring.
        progress: show a tqdm bar.
    """
    if num_inference_steps is not None:
        scheduler.set_timesteps(num_inference_steps, device=noise.device)
    extra = step_kwargs(scheduler, eta, generator)
    grid = grid_timesteps(scheduler)
    x = noise * init_noise_sigma(scheduler)
    for i, tau in enumerate(tqdm(scheduler.timesteps, disable=not progress, desc="sampling", leave=False)):
        prev, model_output, _ = denoising_step(denoiser, scheduler, x, tau, cond, extra=extra)
        if callback is not None:
            callback({"i": i, "t": grid[i], "tau": tau, "x": x, "model_output": model_output, "prev_sample": prev})
        x = prev
    return x


def sample_trajectory(denoiser, scheduler, noise, num_inference_steps=None, cond=None, **kwargs) -> List[torch.Tensor]:
    """Like :func:`sample` but returns every state [x_{t_K}, x_{t_{K-1}}, ..., x_{t_0}] (K+1 tensors)."""
    states: List[torch.Tensor] = []

    def keep(info):
        if not states:
            states.append(info["x"])
        states.append(info["prev_sample"])

    user_callback = kwargs.pop("callback", None)

    def both(info):
        keep(info)
        if user_callback is not None:
            user_callback(info)

    sample(denoiser, scheduler, noise, num_inference_steps, cond, callback=both, **kwargs)
    return states


def steps_draw_noise(scheduler, num_inference_steps: int, eta: Optional[float] = None) -> bool:
    """Whether ``scheduler``'s steps draw noise (DDPM, DDIM with ``eta`` > 0, consistency models, SDE solvers).

    Found by taking the first of ``num_inference_steps`` steps twice on a tiny dummy input with two different
    generators (a zero network output; no model call). A flow-matching scheduler with dynamic shifting is probed at
    mu = 0 (the shift does not decide whether a step is stochastic).
    """
    import copy

    probe = copy.deepcopy(scheduler)
    shift = {"mu": 0.0} if probe.config.get("use_dynamic_shifting", False) else {}
    probe.set_timesteps(num_inference_steps, **shift)
    x = torch.ones((1, 1, 2, 2))
    outs = []
    for seed in (0, 1):
        sched = copy.deepcopy(probe)
        gen = torch.Generator().manual_seed(seed)
        zero = lambda x_in, t, cond: torch.zeros_like(x_in)  # noqa: E731
        outs.append(denoising_step(zero, sched, x, sched.timesteps[0], extra=step_kwargs(sched, eta, gen)).prev_sample)
    return not torch.equal(outs[0], outs[1])
