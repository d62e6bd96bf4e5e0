"""TimeTuner DDPM (the paper's stochastic baseline): ancestral steps on the grid, the network is fed tau_i."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler, DDPMSchedulerOutput

from .mixin import TimeTunerMixin, quadratic_timesteps


class TimeTunerDDPMScheduler(TimeTunerMixin, DDPMScheduler):
    """`DDPMScheduler` that feeds the network tuned timesteps tau_i (TimeTuner, Xia et al., CVPR 2024).

    Takes every argument of [`DDPMScheduler`] plus `tuned_timesteps`, `tuned_grids`, `tuning_info` (see
    [`TimeTunerDDIMScheduler`]). With no table it is the parent, bit-for-bit.

    The parent already walks its grid (`previous_timestep`), so with a table `step` maps tau_i to the grid time t_i
    and runs the parent's step at t_i; `previous_timestep` walks `grid_timesteps`. Adds
    ``timestep_spacing="quadratic"`` (the DDIM reference code's "quad" trajectory, see `quadratic_timesteps`), set
    through the parent's custom-timesteps path.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"] = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        variance_type: Literal[
            "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"
        ] = "fixed_small",
        clip_sample: bool = True,
        prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: Literal["linspace", "leading", "trailing", "quadratic"] = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
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
            variance_type=variance_type,
            clip_sample=clip_sample,
            prediction_type=prediction_type,
            thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            clip_sample_range=clip_sample_range,
            sample_max_value=sample_max_value,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )
        self._init_tau_tables(tuned_timesteps, tuned_grids, tuning_info)

    def set_timesteps(
        self,
        num_inference_steps: int = None,
        device: str | torch.device = None,
        timesteps: list[int] | None = None,
    ):
        """The parent's `set_timesteps` (or the quadratic grid), then the tau table for that step count, if any."""
        self._check_table_available(self._count_evaluations(num_inference_steps, timesteps))
        quadratic = None
        if timesteps is None and num_inference_steps is not None and self.config.timestep_spacing == "quadratic":
            T = self.config.num_train_timesteps
            if not 0 < num_inference_steps <= T:
                raise ValueError(f"`num_inference_steps` must be in [1, {T}], got {num_inference_steps}.")
            quadratic = quadratic_timesteps(num_inference_steps, T).tolist()
        with self._restore_on_error():
            learned = self._learned_grid(num_inference_steps, timesteps)
            if quadratic is not None:
                super().set_timesteps(device=device, timesteps=quadratic)
                self.num_inference_steps = num_inference_steps
            else:
                super().set_timesteps(num_inference_steps, device, timesteps=timesteps)
            self._set_learned_grid(lambda g, d: super(TimeTunerDDPMScheduler, self).set_timesteps(
                device=d, timesteps=g), learned, device)
            self._apply_tau_table()

    def previous_timestep(self, timestep: int | torch.Tensor) -> int | torch.Tensor:
        """The grid time t_{i-1} after the step of `timestep` (a tau or a grid time); -1 after the last step."""
        if not self.is_tuned:
            return super().previous_timestep(timestep)
        i = self.index_for_timestep(timestep)
        if i == len(self.grid_timesteps) - 1:
            return torch.tensor(-1)
        return self.grid_timesteps[i + 1]

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> DDPMSchedulerOutput | tuple:
        """[`DDPMScheduler.step`] at the grid time t_i of `timestep` (tau_i): only the network saw tau_i."""
        if self.is_tuned:
            # 1. tau_i -> t_i: alphas, variance and the "add noise if t > 0" rule all use the grid time
            timestep = self.grid_timesteps[self.index_for_timestep(timestep)]
        return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor
    ) -> torch.Tensor:
        """[`DDPMScheduler.add_noise`]; tau values (floating) are mapped to their grid time t_i first."""
        return super().add_noise(original_samples, noise, self._grid_timesteps_for(timesteps))

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """[`DDPMScheduler.get_velocity`]; tau values (floating) are mapped to their grid time t_i first."""
        return super().get_velocity(sample, noise, self._grid_timesteps_for(timesteps))
