"""TimeTuner schedulers: drop-in subclasses of the Diffusers schedulers that feed the network tuned timesteps."""

from .ddim import TimeTunerDDIMScheduler
from .ddpm import TimeTunerDDPMScheduler
from .dpmsolver_multistep import TimeTunerDPMSolverScheduler
from .dpmsolver_singlestep import TimeTunerDPMSolverSinglestepScheduler
from .euler_discrete import TimeTunerEulerDiscreteScheduler
from .mixin import TimeTunerMixin, quadratic_timesteps

__all__ = [
    "TimeTunerDDIMScheduler",
    "TimeTunerDDPMScheduler",
    "TimeTunerDPMSolverScheduler",
    "TimeTunerDPMSolverSinglestepScheduler",
    "TimeTunerEulerDiscreteScheduler",
    "TimeTunerMixin",
    "quadratic_timesteps",
]
