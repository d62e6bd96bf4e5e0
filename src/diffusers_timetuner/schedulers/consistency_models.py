"""TimeTuner consistency-model sampling: the multistep CM sampler on its Karras sigmas, the network is fed tau_i."""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_consistency_models import (
    CMStochasticIterativeScheduler,
    CMStochasticIterativeSchedulerOutput,
)

from .mixin import TimeTunerMixin


class TimeTunerCMStochasticIterativeScheduler(TimeTunerMixin, CMStochasticIterativeScheduler):
    """`CMStochasticIterativeScheduler` that feeds the consistency model tuned times tau_i (TimeTuner, CVPR 2024).

    Takes every argument of [`CMStochasticIterativeScheduler`] plus `tuned_timesteps`, `tuned_grids`, `tuning_info`
    (see [`TimeTunerDDIMScheduler`]). With no table it is the parent, bit-for-bit.

    The parent's `timesteps` are what the network receives: ``250 * log(sigma)`` of the Karras sigmas (float64), so
    taus are in those units and kept in float64 (an identity table feeds the network exactly the parent's values).
    `scale_model_input` and `step` (the boundary-condition scalings c_skip / c_out and the re-noising) read only
    ``sigmas[step_index]``: tau changes the network input alone. A table holds one tau per step; taus must be >= 0,
    i.e. sigma >= 1, which the 1-2 step schedules of consistency models satisfy.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 40,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        s_noise: float = 1.0,
        rho: float = 7.0,
        clip_denoised: bool = True,
        tuned_timesteps: dict | None = None,
        tuned_grids: dict | None = None,
        tuning_info: dict | None = None,
    ) -> None:
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            sigma_data=sigma_data,
            s_noise=s_noise,
            rho=rho,
            clip_denoised=clip_denoised,
        )
        self._init_tau_tables(tuned_timesteps, tuned_grids, tuning_info)

    def _table_timestep_bound(self) -> int:
        # the network's time runs up to sigma_to_t(sigma_max) (1095.5 for sigma_max = 80), not num_train_timesteps
        return math.floor(float(self.sigma_to_t(self.config.sigma_max))) + 2

    def _tau_dtype(self, grid: torch.Tensor) -> torch.dtype:
        return grid.dtype if grid.is_floating_point() else torch.float32

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device = None,
        timesteps: list[int] | None = None,
    ):
        """The parent's `set_timesteps` (Karras sigmas), then the tau table for that step count, if any.

        `timesteps` (integer training indices, e.g. ``[22, 0]``) set a custom grid of ``len(timesteps)`` steps.
        """
        self._check_table_available(len(timesteps) if timesteps is not None else num_inference_steps)
        with self._restore_on_error():
            super().set_timesteps(num_inference_steps, device, timesteps=timesteps)
            self._apply_tau_table()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> CMStochasticIterativeSchedulerOutput | tuple:
        """[`CMStochasticIterativeScheduler.step`] on the grid sigmas; with a table, `timestep` must be this step's
        tau."""
        if not isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            self._check_step_timestep(timestep)  # the parent rejects integer indices itself
        return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
