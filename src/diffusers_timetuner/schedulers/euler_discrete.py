"""TimeTuner Euler (discrete): Euler steps on the grid sigmas, the network is fed tau_i."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler, EulerDiscreteSchedulerOutput

from .mixin import TimeTunerMixin


class TimeTunerEulerDiscreteScheduler(TimeTunerMixin, EulerDiscreteScheduler):
    """`EulerDiscreteScheduler` that feeds the network tuned timesteps tau_i (TimeTuner, Xia et al., CVPR 2024).

    Takes every argument of [`EulerDiscreteScheduler`] plus `tuned_timesteps`, `tuned_grids`, `tuning_info` (see
    [`TimeTunerDDIMScheduler`]). With no table it is the parent, bit-for-bit. `step` and `scale_model_input` use
    ``sigmas[step_index]`` only; the table changes `timesteps` and the (tolerant) index lookup. Tables are in
    discrete timestep units, so ``timestep_type="continuous"`` with ``prediction_type="v_prediction"`` (timesteps
    0.25 log sigma) cannot take a table.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        interpolation_type: str = "linear",
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        timestep_spacing: Literal["linspace", "leading", "trailing"] = "linspace",
        timestep_type: Literal["discrete", "continuous"] = "discrete",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: Literal["zero", "sigma_min"] = "zero",
        tuned_timesteps: dict | None = None,
        tuned_grids: dict | None = None,
        tuning_info: dict | None = None,
    ):
        if tuned_timesteps and timestep_type == "continuous" and prediction_type == "v_prediction":
            raise ValueError(
                "TimeTuner tables hold discrete timesteps; `timestep_type='continuous'` with v_prediction uses "
                "0.25 * log(sigma) timesteps. Use timestep_type='discrete' or drop `tuned_timesteps`."
            )
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            prediction_type=prediction_type,
            interpolation_type=interpolation_type,
            use_karras_sigmas=use_karras_sigmas,
            use_exponential_sigmas=use_exponential_sigmas,
            use_beta_sigmas=use_beta_sigmas,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            timestep_spacing=timestep_spacing,
            timestep_type=timestep_type,
            steps_offset=steps_offset,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
            final_sigmas_type=final_sigmas_type,
        )
        self._init_tau_tables(tuned_timesteps, tuned_grids, tuning_info)

    def set_timesteps(
        self,
        num_inference_steps: int = None,
        device: str | torch.device = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
    ):
        """The parent's `set_timesteps` (grid and sigmas), then the tau table for that step count, if any."""
        self._check_table_available(self._count_evaluations(num_inference_steps, timesteps, sigmas))
        with self._restore_on_error():
            learned = self._learned_grid(num_inference_steps, timesteps, sigmas)
            super().set_timesteps(num_inference_steps, device, timesteps=timesteps, sigmas=sigmas)
            self._set_learned_grid(lambda g, d: super(TimeTunerEulerDiscreteScheduler, self).set_timesteps(
                device=d, timesteps=g), learned, device)
            self._apply_tau_table()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> EulerDiscreteSchedulerOutput | tuple:
        """[`EulerDiscreteScheduler.step`] on the grid sigmas; with a table, `timestep` must be this step's tau."""
        if not isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            self._check_step_timestep(timestep)  # the parent rejects integer indices itself
        return super().step(
            model_output, timestep, sample, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise,
            generator=generator, return_dict=return_dict,
        )

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Velocity at the grid noise level of each tau's step.

        Untuned: the parent's method (which indexes `alphas_cumprod` with the step index). Tuned: each tau is
        mapped to its step i and alpha-bar is taken from the grid sigma, alpha-bar = 1 / (1 + sigma_i^2), so that
        v = sqrt(alpha-bar) * noise - sqrt(1 - alpha-bar) * sample at the state's noise level.
        """
        if not self.is_tuned or not isinstance(timesteps, torch.Tensor) or not timesteps.is_floating_point():
            return super().get_velocity(sample, noise, timesteps)
        idx = [self.index_for_timestep(t) for t in timesteps.reshape(-1)]
        sigma = self.sigmas[idx].to(device=sample.device, dtype=sample.dtype)
        alpha_bar = 1.0 / (1.0 + sigma**2)
        shape = (-1,) + (1,) * (sample.ndim - 1)
        return alpha_bar.sqrt().reshape(shape) * noise - (1 - alpha_bar).sqrt().reshape(shape) * sample
