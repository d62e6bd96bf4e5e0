"""TimeTuner DPM-Solver (multistep): the solver steps on its sigmas, the network is fed tau_i."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from .mixin import TimeTunerMixin


class TimeTunerDPMSolverScheduler(TimeTunerMixin, DPMSolverMultistepScheduler):
    """`DPMSolverMultistepScheduler` that feeds the network tuned timesteps tau_i (TimeTuner, Xia et al., CVPR 2024).

    Takes every argument of [`DPMSolverMultistepScheduler`] plus `tuned_timesteps`, `tuned_grids`, `tuning_info`
    (see [`TimeTunerDDIMScheduler`]). With no table it is the parent, bit-for-bit.

    The parent's `step` already reads only ``sigmas[step_index]``, so a table changes two things: `timesteps` holds
    the taus (the grid stays in `grid_timesteps` and in `sigmas`), and the step index is found by a tolerant lookup
    of tau (`index_for_timestep`), which raises on no / ambiguous match instead of the parent's silent fallback to the
    last index. The parent's ``set_timesteps(timesteps=...)`` is not used for taus: it recomputes the sigmas from the
    given timesteps (moving the grid), which is not TimeTuner.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        solver_order: int = 2,
        prediction_type: Literal["epsilon", "sample", "v_prediction", "flow_prediction"] = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: Literal["dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++"] = "dpmsolver++",
        solver_type: Literal["midpoint", "heun"] = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: Literal["zero", "sigma_min"] = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: Literal["learned", "learned_range"] | None = None,
        timestep_spacing: Literal["linspace", "leading", "trailing"] = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: Literal["exponential"] = "exponential",
        tuned_timesteps: dict | None = None,
        tuned_grids: dict | None = None,
        tuning_info: dict | None = None,
    ):
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            solver_order=solver_order,
            prediction_type=prediction_type,
            thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            sample_max_value=sample_max_value,
            algorithm_type=algorithm_type,
            solver_type=solver_type,
            lower_order_final=lower_order_final,
            euler_at_final=euler_at_final,
            use_karras_sigmas=use_karras_sigmas,
            use_exponential_sigmas=use_exponential_sigmas,
            use_beta_sigmas=use_beta_sigmas,
            use_lu_lambdas=use_lu_lambdas,
            use_flow_sigmas=use_flow_sigmas,
            flow_shift=flow_shift,
            final_sigmas_type=final_sigmas_type,
            lambda_min_clipped=lambda_min_clipped,
            variance_type=variance_type,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
            use_dynamic_shifting=use_dynamic_shifting,
            time_shift_type=time_shift_type,
        )
        self._init_tau_tables(tuned_timesteps, tuned_grids, tuning_info)

    def set_timesteps(
        self,
        num_inference_steps: int = None,
        device: str | torch.device = None,
        mu: float | None = None,
        timesteps: list[int] | None = None,
    ):
        """The parent's `set_timesteps` (grid and sigmas), then the tau table for that step count, if any.

        `timesteps` sets a custom *grid* (parent semantics); a table for ``len(timesteps)`` then applies to it.
        """
        self._check_table_available(self._count_evaluations(num_inference_steps, timesteps))
        with self._restore_on_error():
            learned = self._learned_grid(num_inference_steps, timesteps)
            super().set_timesteps(num_inference_steps, device, mu=mu, timesteps=timesteps)
            self._set_learned_grid(lambda g, d: super(TimeTunerDPMSolverScheduler, self).set_timesteps(
                device=d, mu=mu, timesteps=g), learned, device)
            self._apply_tau_table()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """[`DPMSolverMultistepScheduler.step`] on the grid sigmas; with a table, `timestep` must be this step's
        tau."""
        self._check_step_timestep(timestep)
        return super().step(
            model_output, timestep, sample, generator=generator, variance_noise=variance_noise, return_dict=return_dict
        )
