"""TimeTuner schedulers: drop-in subclasses of the Diffusers schedulers that feed the network tuned timesteps."""

from .consistency_models import TimeTunerCMStochasticIterativeScheduler
from .ddim import TimeTunerDDIMScheduler
from .ddpm import TimeTunerDDPMScheduler
from .dpmsolver_multistep import TimeTunerDPMSolverScheduler
from .dpmsolver_singlestep import TimeTunerDPMSolverSinglestepScheduler
from .euler_discrete import TimeTunerEulerDiscreteScheduler
from .flow_match_euler_discrete import TimeTunerFlowMatchEulerDiscreteScheduler
from .heun_discrete import TimeTunerHeunDiscreteScheduler
from .mixin import TimeTunerMixin, quadratic_timesteps
from .unipc_multistep import TimeTunerUniPCMultistepScheduler

__all__ = [
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
    "quadratic_timesteps",
]
