"""The sampler families the benchmarks compare (DDIM, DDPM, DPM-Solver-2, DPM-Solver++(2M), UniPC; for flow matching
FlowMatchEuler and UniPC; EDM's Heun) and their untuned TimeTuner schedulers on a model's noise schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from diffusers_timetuner import (
    TimeTunerDDIMScheduler,
    TimeTunerDDPMScheduler,
    TimeTunerDPMSolverScheduler,
    TimeTunerDPMSolverSinglestepScheduler,
    TimeTunerFlowMatchEulerDiscreteScheduler,
    TimeTunerHeunDiscreteScheduler,
    TimeTunerUniPCMultistepScheduler,
)
from diffusers_timetuner.sampling import grid_timesteps


@dataclass(frozen=True)
class Family:
    key: str
    label: str
    config: Dict[str, Any]  # scheduler config on top of the model's noise schedule
    eta: Optional[float] = None  # DDIM eta passed to step
    stochastic: bool = False  # needs a generator in step


# Grids: DDIM / DDPM on the uniform grid that starts at T-1 ("trailing"), DPM-Solver++ on the log-SNR-uniform grid
# (use_lu_lambdas, the DPM-Solver paper's choice), DPM-Solver-2 (singlestep, noise prediction, order 2) on diffusers'
# default time-uniform grid (the singlestep scheduler has no log-SNR option; trajectory_error.py covers that grid).
FAMILIES: Dict[str, Family] = {
    "ddim": Family("ddim", "DDIM", {"timestep_spacing": "trailing", "clip_sample": False}, eta=0.0),
    "ddpm": Family("ddpm", "DDPM (eta=1)", {"timestep_spacing": "trailing", "clip_sample": False}, stochastic=True),
    # lower_order_final=True: diffusers forces it for odd n anyway; for even n without it the last second-order step
    # into sigma_min is unstable with noise prediction (exact model: FD 112 at NFE 4, 22.7 at NFE 6, vs 2.1 / 0.74).
    "dpm2": Family(
        "dpm2", "DPM-Solver-2",
        {"solver_order": 2, "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min",
         "lower_order_final": True},
    ),
    "dpmpp": Family("dpmpp", "DPM-Solver++(2M)", {"solver_order": 2, "algorithm_type": "dpmsolver++",
                                                  "use_lu_lambdas": True}),
    # UniPC (bh2, order 2, diffusers' defaults) on diffusers' default time-uniform grid
    "unipc": Family("unipc", "UniPC (bh2)", {"solver_order": 2, "solver_type": "bh2"}),
    # Flow matching (a velocity model whose noise config is its FlowMatchEuler config): Euler with shift 1, and UniPC
    # (bh2, order 2) on the same flow sigmas; the settings of flow_gmm.py / flow_mnist.py.
    "flow_euler": Family("flow_euler", "FlowMatchEuler", {"shift": 1.0}),
    "unipc_flow": Family("unipc_flow", "UniPC (flow, bh2)", {"prediction_type": "flow_prediction",
                                                             "use_flow_sigmas": True, "flow_shift": 1.0,
                                                             "solver_order": 2, "solver_type": "bh2"}),
    # EDM's Heun on Karras sigmas (2 n - 1 evaluations for n steps; heun_gmm.py's setting).
    "heun": Family("heun", "Heun (Karras)", {"use_karras_sigmas": True}),
}
# The families that run on a model's beta (VP) noise schedule with one model evaluation per step: the ones the
# scripts written for the eps testbeds (e.g. inference_overhead.py) loop over.
VP_FAMILIES = ("ddim", "ddpm", "dpm2", "dpmpp")
SCHEDULER_CLASSES = {
    "ddim": TimeTunerDDIMScheduler,
    "ddpm": TimeTunerDDPMScheduler,
    "dpm2": TimeTunerDPMSolverSinglestepScheduler,
    "dpmpp": TimeTunerDPMSolverScheduler,
    "unipc": TimeTunerUniPCMultistepScheduler,
    "flow_euler": TimeTunerFlowMatchEulerDiscreteScheduler,
    "unipc_flow": TimeTunerUniPCMultistepScheduler,
    "heun": TimeTunerHeunDiscreteScheduler,
}
NOISE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")


def make_scheduler(family: str, noise_config: Dict[str, Any], **overrides):
    """An untuned TimeTuner scheduler of `family` on the model's noise schedule (bit-for-bit its diffusers parent)."""
    config = {k: v for k, v in noise_config.items() if k in NOISE_KEYS and v is not None}
    config.update(FAMILIES[family].config)
    config.update(overrides)
    return SCHEDULER_CLASSES[family](**config)


def scheduler_grid(scheduler, nfe: Optional[int], device="cpu", timesteps=None) -> List[float]:
    """The grid t_K > ... > t_1 the scheduler integrates on for `nfe` steps (or the custom grid `timesteps`)."""
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=[int(t) for t in timesteps], device=device)
    else:
        scheduler.set_timesteps(nfe, device=device)
    return [float(t) for t in grid_timesteps(scheduler).cpu()]


def tuned_taus(scheduler, nfe: int) -> Optional[List[float]]:
    table = (scheduler.config.get("tuned_timesteps") or {}).get(str(nfe))
    return None if table is None else [float(t) for t in table]
