"""TimeTuner Heun (discrete, the EDM second-order sampler): Heun steps on the grid sigmas, one tau per evaluation."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_heun_discrete import HeunDiscreteScheduler, HeunDiscreteSchedulerOutput

from .mixin import TimeTunerMixin


class TimeTunerHeunDiscreteScheduler(TimeTunerMixin, HeunDiscreteScheduler):
    """`HeunDiscreteScheduler` that feeds the network tuned timesteps tau (TimeTuner, Xia et al., CVPR 2024).

    Takes every argument of [`HeunDiscreteScheduler`] plus `tuned_timesteps`, `tuned_grids`, `tuning_info` (see
    [`TimeTunerDDIMScheduler`]). With no table it is the parent, bit-for-bit.

    Heun evaluates the network twice per step except the last (whose second evaluation would be at sigma = 0), so
    `n` steps make ``2n - 1`` evaluations: the parent's `timesteps` repeat every grid time after the first
    (``[t_0, t_1, t_1, ..., t_{n-1}, t_{n-1}]``) and a table for n holds ``2n - 1`` taus, one per evaluation. The
    repeated grid times make an identity table impossible (its taus must be distinct); the parent's `step` reads
    only ``sigmas[step_index]``, so the solver never sees tau.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,  # sensible defaults
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        timestep_spacing: Literal["linspace", "leading", "trailing"] = "linspace",
        steps_offset: int = 0,
        tuned_timesteps: dict | None = None,
        tuned_grids: dict | None = None,
        tuning_info: dict | None = None,
    ) -> None:
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            prediction_type=prediction_type,
            use_karras_sigmas=use_karras_sigmas,
            use_exponential_sigmas=use_exponential_sigmas,
            use_beta_sigmas=use_beta_sigmas,
            clip_sample=clip_sample,
            clip_sample_range=clip_sample_range,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
        )
        self._init_tau_tables(tuned_timesteps, tuned_grids, tuning_info)

    def _num_evaluations(self, num_inference_steps: int) -> int:
        return 2 * num_inference_steps - 1

    def _steps_for_evaluations(self, num_evaluations: int) -> int:
        return (num_evaluations + 1) // 2

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device = None,
        num_train_timesteps: int | None = None,
        timesteps: list[int] | None = None,
    ):
        """The parent's `set_timesteps` (grid and sigmas), then the tau table for that step count, if any.

        `timesteps` sets a custom grid of ``len(timesteps)`` steps (parent semantics).
        """
        if "_tau_tables" not in self.__dict__:  # the parent's __init__ sets its default timesteps: no table yet
            return super().set_timesteps(
                num_inference_steps, device, num_train_timesteps=num_train_timesteps, timesteps=timesteps
            )
        self._check_table_available(len(timesteps) if timesteps is not None else num_inference_steps)
        with self._restore_on_error():
            super().set_timesteps(
                num_inference_steps, device, num_train_timesteps=num_train_timesteps, timesteps=timesteps
            )
            self._apply_tau_table()

    def step(
        self,
        model_output: torch.Tensor | np.ndarray,
        timestep: float | torch.Tensor,
        sample: torch.Tensor | np.ndarray,
        return_dict: bool = True,
    ) -> HeunDiscreteSchedulerOutput | tuple:
        """[`HeunDiscreteScheduler.step`] on the grid sigmas; with a table, `timestep` must be this evaluation's
        tau."""
        self._check_step_timestep(timestep)
        return super().step(model_output, timestep, sample, return_dict=return_dict)
