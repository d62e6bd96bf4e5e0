"""Calibration: learn TimeTuner's tau tables for a Diffusers model (the learning half of the package).

Entry point: :func:`calibrate`. One job per module (docs/DESIGN.md has the table): ``api`` (entry point),
``config`` (every setting, one set of defaults), ``inputs`` (data, shapes, sample sets), ``calibrator`` (one step
count), ``strategies`` (sequential / data-free / parallel), ``objectives`` (eq. 9, eq. 10, teacher objectives),
``optimizers`` (local search, reference Adam, joint Adam), ``teacher``, ``guard``, ``stats``, ``rollout`` (cached
step-by-step sampling), ``distributed`` (Accelerate), ``checkpoint``, ``report``.
"""

from .api import CalibrationResult, calibrate
from .config import CPU_QUICK_PRESET, CalibrationConfig
from .objectives import OBJECTIVES
from .optimizers import OPTIMIZERS, LocalSearch, ReferenceAdam
from .strategies import STRATEGIES

__all__ = ["CalibrationConfig", "CPU_QUICK_PRESET", "CalibrationResult", "calibrate", "LocalSearch", "ReferenceAdam", "OBJECTIVES", "OPTIMIZERS", "STRATEGIES"]
