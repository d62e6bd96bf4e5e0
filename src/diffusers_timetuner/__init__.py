"""diffusers-timetuner: TimeTuner (Xia et al., CVPR 2024) for Hugging Face Diffusers.

The solver keeps its grid t_i -> t_{i-1}; the network is fed a tuned timestep tau_i at each evaluation.
Importing this package registers the TimeTuner schedulers, so ``DiffusionPipeline.from_pretrained`` can reload a
pipeline saved with one of them.
"""

from .calibration import CalibrationResult, calibrate
from .denoiser import Denoiser
from .sampling import sample, sample_trajectory
from .schedulers import (
    TimeTunerCMStochasticIterativeScheduler,
    TimeTunerDDIMScheduler,
    TimeTunerDDPMScheduler,
    TimeTunerDPMSolverScheduler,
    TimeTunerDPMSolverSinglestepScheduler,
    TimeTunerEulerDiscreteScheduler,
    TimeTunerFlowMatchEulerDiscreteScheduler,
    TimeTunerHeunDiscreteScheduler,
    TimeTunerMixin,
    TimeTunerUniPCMultistepScheduler,
)
from .table import TauTable, TunedTimestepsWarning

from ._version import __version__

__all__ = [
    "CalibrationResult",
    "calibrate",
    "Denoiser",
    "TauTable",
    "TimeTunerCMStochasticIterativeScheduler",
    "TimeTunerDDIMScheduler",
    "TimeTunerDDPMScheduler",
    "TimeTunerDPMSolverScheduler",
    "TimeTunerDPMSolverSinglestepScheduler",
    "TimeTunerEulerDiscreteScheduler",
    "TimeTunerFlowMatchEulerDiscreteScheduler",
    "TimeTunerHeunDiscreteScheduler",
    "TimeTunerMixin",
    "TimeTunerUniPCMultistepScheduler",
    "TunedTimestepsWarning",
    "sample",
    "sample_trajectory",
]
