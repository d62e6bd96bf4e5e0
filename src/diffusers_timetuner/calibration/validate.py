"""Checks of :func:`~diffusers_timetuner.calibration.calibrate`'s arguments that need no model: run first, so a bad
value fails in milliseconds with a message naming it, before any network evaluation."""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence

import torch

from .grid_search import GRID_CRITERIA

__all__ = ["VALIDATED_ARGS", "validate_calibration_args"]

# the keyword arguments of calibrate() that validate_calibration_args checks
VALIDATED_ARGS = (
    "num_inference_steps", "timesteps", "num_samples", "batch_size", "num_validation_samples", "num_heldout_samples",
    "teacher_steps", "guard_margin", "eta", "guidance_scale", "seed", "data", "sample_shape", "tune",
    "grid_search_evaluations", "grid_search_criterion", "teacher", "sigmas",
)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_int(name: str, value: Any, *, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if not _is_int(value) or int(value) < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")


def validate_calibration_args(
    *,
    num_inference_steps: Any = None,
    timesteps: Optional[Sequence[int]] = None,
    num_samples: Any = 64,
    batch_size: Any = 64,
    num_validation_samples: Any = 32,
    num_heldout_samples: Any = 64,
    teacher_steps: Any = None,
    guard_margin: Any = 2.0,
    eta: Any = None,
    guidance_scale: Any = 1.0,
    seed: Any = 0,
    data: Any = None,
    sample_shape: Optional[Sequence[int]] = None,
    tune: Any = "tau",
    grid_search_evaluations: Any = None,
    grid_search_criterion: Any = "auto",
    teacher: Any = "dpmsolver++",
    sigmas: Any = None,
) -> None:
    """Raise ValueError for the first argument of ``calibrate`` that cannot be right, whatever the model.

    Checks: step counts are positive integers (the length of ``timesteps`` or ``sigmas`` counts as one); sample
    counts are integers (>= 1; ``num_validation_samples`` may be 0 or None to skip the guard); ``teacher_steps`` is
    above every step count (a teacher no finer than the coarse sampler teaches nothing); ``guard_margin``, ``eta``
    and ``guidance_scale`` are finite (``guard_margin`` and ``eta`` >= 0); ``data`` has at least one row of finite
    values whose shape matches ``sample_shape`` when both are given.
    """
    if num_inference_steps is None:
        grid = timesteps if timesteps is not None else sigmas
        steps = [len(grid)] if grid is not None else [10]
    else:
        steps = list(num_inference_steps) if isinstance(num_inference_steps, (list, tuple)) else [num_inference_steps]
        if hasattr(num_inference_steps, "tolist"):
            steps = list(num_inference_steps.reshape(-1).tolist())
    for n in steps:
        if not _is_int(n) or int(n) < 1:
            raise ValueError(f"num_inference_steps must be positive integers, got {num_inference_steps!r}.")
    _positive_int("num_samples", num_samples)
    _positive_int("batch_size", batch_size)
    _positive_int("num_heldout_samples", num_heldout_samples)
    if num_validation_samples is not None:
        _positive_int("num_validation_samples", num_validation_samples, allow_zero=True)
    if teacher_steps is not None:
        if not _is_int(teacher_steps) or int(teacher_steps) <= max(int(n) for n in steps):
            raise ValueError(
                f"teacher_steps must be an integer above every step count calibrated ({max(int(n) for n in steps)}), "
                f"got {teacher_steps!r}: the teacher is the fine reference the coarse sampler is tuned towards "
                "(default about 5 n)."
            )
    for name, value, low in (("guard_margin", guard_margin, 0.0), ("eta", eta, 0.0), ("guidance_scale", guidance_scale, None)):
        if value is None and name == "eta":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise ValueError(f"{name} must be a finite number, got {value!r}.")
        if low is not None and float(value) < low:
            raise ValueError(f"{name} must be >= {low}, got {value!r}.")
    if tune not in ("tau", "grid", "grid+tau"):
        raise ValueError(f"tune must be 'tau', 'grid' or 'grid+tau', got {tune!r}.")
    if tune != "tau" and timesteps is not None:
        raise ValueError(f"tune={tune!r} learns the grid itself: do not pass `timesteps` (a fixed custom grid) with "
                         "it; use tune='tau' to tune the network's time on a grid of your own.")
    if teacher not in ("dpmsolver++", "same"):
        raise ValueError(f"teacher must be 'dpmsolver++' or 'same', got {teacher!r}.")
    if tune != "tau" and teacher != "dpmsolver++":
        raise ValueError(f"tune={tune!r} learns the grid on the fine teacher's trajectory: it needs "
                         "teacher='dpmsolver++'.")
    if grid_search_evaluations is not None:
        _positive_int("grid_search_evaluations", grid_search_evaluations, allow_zero=True)
    if grid_search_criterion not in ("auto", *GRID_CRITERIA):
        raise ValueError(f"grid_search_criterion must be 'auto' or one of {', '.join(repr(c) for c in GRID_CRITERIA)}"
                         f", got {grid_search_criterion!r}.")
    if tune == "tau" and grid_search_criterion != "auto":
        raise ValueError(f"grid_search_criterion={grid_search_criterion!r} scores learned grids: it needs "
                         "tune='grid' or 'grid+tau' (tune='tau' keeps the scheduler's grid).")
    if not _is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}.")
    if sample_shape is not None:
        shape = list(sample_shape.tolist() if hasattr(sample_shape, "tolist") else sample_shape)
        if not shape or not all(_is_int(s) and int(s) > 0 for s in shape):
            raise ValueError(f"sample_shape must be positive integers (C, H, W), got {sample_shape!r}.")
    if data is not None:
        images = data[0] if isinstance(data, (tuple, list)) and len(data) == 2 else data
        images = torch.as_tensor(images)
        if images.ndim < 2 or images.shape[0] == 0:
            raise ValueError(
                f"data must hold at least one sample, shape (N, *sample_shape) with N >= 1, got shape "
                f"{tuple(images.shape)}."
            )
        if sample_shape is not None and tuple(images.shape[1:]) != tuple(int(s) for s in shape):
            raise ValueError(
                f"data has samples of shape {tuple(images.shape[1:])} but sample_shape={tuple(shape)}; make them agree."
            )
        if images.is_floating_point() and not bool(torch.isfinite(images).all()):
            bad = int((~torch.isfinite(images)).reshape(images.shape[0], -1).any(dim=1).sum())
            raise ValueError(f"data has non-finite values (NaN or inf) in {bad} of its {images.shape[0]} samples.")
