"""Timestep grids of the paper's Fig. 2 (uniform, quadratic, log-SNR) for each sampler family.

A grid is either expressed through the scheduler config or, where the scheduler has no such option (or where
calibrate's 10n-step teacher could not use it: quadratic spacing has duplicates beyond ~29 steps), as a fixed
custom grid: `calibrate(..., timesteps=grid)` tunes on it and sampling passes ``timesteps=grid`` to the scheduler.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from diffusers_timetuner.sampling import grid_timesteps
from diffusers_timetuner.schedulers import quadratic_timesteps

from . import families

GRID_KINDS = ("uniform", "quadratic", "logsnr")


def logsnr_grid(noise_config: Dict, nfe: int) -> List[int]:
    """The log-SNR-uniform integer grid of diffusers' DPM-Solver (``use_lu_lambdas=True``) for this noise schedule."""
    sched = families.make_scheduler("dpmpp", noise_config, use_lu_lambdas=True)
    sched.set_timesteps(nfe)
    return [int(t) for t in grid_timesteps(sched)]


def quadratic_grid(nfe: int, num_train_timesteps: int = 1000) -> List[int]:
    return [int(t) for t in quadratic_timesteps(nfe, num_train_timesteps)]


def grid_spec(family: str, kind: str, noise_config: Dict, nfe: int) -> Tuple[Dict, Optional[List[int]]]:
    """(scheduler config overrides, custom grid or None) for `family` on grid `kind`.

    Overrides equal to the family's own config are dropped, so that the calibration-table cache key is the same as
    the other scripts' for the same scheduler."""
    overrides, custom = _grid_spec(family, kind, noise_config, nfe)
    base = families.FAMILIES[family].config
    return {k: v for k, v in overrides.items() if base.get(k, _MISSING) != v}, custom


_MISSING = object()


def _grid_spec(family: str, kind: str, noise_config: Dict, nfe: int) -> Tuple[Dict, Optional[List[int]]]:
    if kind not in GRID_KINDS:
        raise ValueError(f"grid kind must be one of {GRID_KINDS}, got {kind!r}.")
    T = int(noise_config.get("num_train_timesteps", 1000))
    if family in ("ddim", "ddpm"):
        if kind == "uniform":
            return {"timestep_spacing": "trailing"}, None
        if kind == "quadratic":  # as a fixed grid: calibrate's 10n-step teacher must not use quadratic spacing
            return {}, quadratic_grid(nfe, T)
        return {}, logsnr_grid(noise_config, nfe)
    if family == "dpmpp":
        if kind == "logsnr":
            return {"use_lu_lambdas": True}, None
        if kind == "uniform":
            return {"use_lu_lambdas": False, "timestep_spacing": "linspace"}, None
        return {"use_lu_lambdas": False}, quadratic_grid(nfe, T)
    if family == "dpm2":
        if kind == "uniform":
            return {}, None  # diffusers' singlestep default: time-uniform, starts at T-1
        if kind == "quadratic":
            return {}, quadratic_grid(nfe, T)
        return {}, logsnr_grid(noise_config, nfe)
    raise ValueError(f"unknown family {family!r}")
