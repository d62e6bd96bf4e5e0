"""Resolving the scheduler argument of calibration to a TimeTuner scheduler."""

from __future__ import annotations

SCHEDULER_NAMES = {
    "ddim": "TimeTunerDDIMScheduler",
    "ddpm": "TimeTunerDDPMScheduler",
    "dpmsolver": "TimeTunerDPMSolverScheduler",
    "dpmsolver_multistep": "TimeTunerDPMSolverScheduler",
    "dpmsolver_singlestep": "TimeTunerDPMSolverSinglestepScheduler",
    "euler": "TimeTunerEulerDiscreteScheduler",
    "flow_euler": "TimeTunerFlowMatchEulerDiscreteScheduler",
    "flow_match_euler": "TimeTunerFlowMatchEulerDiscreteScheduler",
    "unipc": "TimeTunerUniPCMultistepScheduler",
    "heun": "TimeTunerHeunDiscreteScheduler",
    "cm": "TimeTunerCMStochasticIterativeScheduler",
}
# Plain Diffusers class -> TimeTuner class.
PARENTS = {
    "DDIMScheduler": "TimeTunerDDIMScheduler",
    "DDPMScheduler": "TimeTunerDDPMScheduler",
    "DPMSolverMultistepScheduler": "TimeTunerDPMSolverScheduler",
    "DPMSolverSinglestepScheduler": "TimeTunerDPMSolverSinglestepScheduler",
    "EulerDiscreteScheduler": "TimeTunerEulerDiscreteScheduler",
    "FlowMatchEulerDiscreteScheduler": "TimeTunerFlowMatchEulerDiscreteScheduler",
    "UniPCMultistepScheduler": "TimeTunerUniPCMultistepScheduler",
    "HeunDiscreteScheduler": "TimeTunerHeunDiscreteScheduler",
    "CMStochasticIterativeScheduler": "TimeTunerCMStochasticIterativeScheduler",
}


def scheduler_class(name: str):
    """The TimeTuner scheduler class for a short name or a (TimeTuner or Diffusers) class name."""
    from .. import schedulers as tt

    key = str(name).strip()
    cls_name = SCHEDULER_NAMES.get(key.lower()) or PARENTS.get(key) or key
    cls = getattr(tt, cls_name, None)
    if cls is None or not isinstance(cls, type) or not cls_name.startswith("TimeTuner"):
        known = sorted(set(SCHEDULER_NAMES) | set(PARENTS.values()) | set(PARENTS))
        raise ValueError(f"Unknown scheduler {name!r}: choose one of {', '.join(known)}.")
    return cls


def resolve_scheduler(scheduler, pipeline=None):
    """A TimeTuner scheduler from ``scheduler`` (instance, class, or name) or the pipeline's scheduler.

    A name or class is instantiated from the pipeline's scheduler config (so the betas
    match the model); a plain Diffusers scheduler is converted with ``from_config`` (same config, TimeTuner class).
    """
    if scheduler is None:
        if pipeline is None or getattr(pipeline, "scheduler", None) is None:
            raise ValueError("No scheduler given and the model is not a pipeline with one: pass scheduler=.")
        scheduler = pipeline.scheduler
    if isinstance(scheduler, (str, type)):
        cls = scheduler_class(scheduler if isinstance(scheduler, str) else scheduler.__name__)
        config = None
        if pipeline is not None and getattr(pipeline, "scheduler", None) is not None:
            config = pipeline.scheduler.config
        return cls.from_config(config) if config is not None else cls()
    if hasattr(scheduler, "with_tuned_timesteps"):
        return scheduler
    cls = scheduler_class(type(scheduler).__name__)
    return cls.from_config(scheduler.config)


def untuned_copy(scheduler):
    """The same class and config without any tau table (the untuned baseline)."""
    return type(scheduler).from_config(scheduler.config, tuned_timesteps=None, tuned_grids=None, tuning_info=None)
