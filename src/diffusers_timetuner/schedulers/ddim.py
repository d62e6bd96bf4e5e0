"""TimeTuner DDIM: DDIM on its grid t_i -> t_{i-1}, with the network fed tau_i."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMScheduler, DDIMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from .mixin import TimeTunerMixin, quadratic_timesteps, validate_custom_timesteps


class TimeTunerDDIMScheduler(TimeTunerMixin, DDIMScheduler):
    """`DDIMScheduler` that feeds the network tuned timesteps tau_i (TimeTuner, Xia et al., CVPR 2024).

    Takes every argument of [`DDIMScheduler`] plus:

    Args:
        tuned_timesteps (`dict`, *optional*): ``{"<num_inference_steps>": [tau per model evaluation]}`` in the units
            of `timesteps`. `None` / ``{}``: the scheduler is `DDIMScheduler`, bit-for-bit.
        tuned_grids (`dict`, *optional*): ``{"<n>": [grid timesteps the table was tuned on]}``, checked at
            `set_timesteps`.
        tuning_info (`dict`, *optional*): ``{"<n>": {provenance}}``, free-form JSON.

    Also adds what the paper needs and `DDIMScheduler` lacks: custom grids (``set_timesteps(timesteps=[...])``) and
    ``timestep_spacing="quadratic"`` (the DDIM reference code's "quad" trajectory, see `quadratic_timesteps`).

    Stepping: with a table, `step` finds the step index i from the timestep it gets (tau_i) and takes the parent's
    update from the grid time t_i with the parent's arithmetic in the parent's order: x_{t_i} -> x_{t_i - T // n}
    (``final_alpha_cumprod`` below 0), so an identity table tau = t is bit-identical to `DDIMScheduler` for every
    spacing, including those where that rule leaves the grid (``"trailing"`` with n not dividing T: grid 999, 856, ...
    for n = 7, the parent steps 999 -> 857; ``"linspace"``). TimeTuner keeps the solver as it is; only the network's
    time input changes. On a custom grid or the ``"quadratic"`` spacing, which the parent lacks, the update goes to
    the next grid time t_{i-1} = ``grid_timesteps[i + 1]`` (``final_alpha_cumprod`` after the last step). Without a
    table and custom grid, `step` is the parent's.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: Literal["leading", "trailing", "linspace", "quadratic"] = "leading",
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
            clip_sample=clip_sample,
            set_alpha_to_one=set_alpha_to_one,
            steps_offset=steps_offset,
            prediction_type=prediction_type,
            thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            clip_sample_range=clip_sample_range,
            sample_max_value=sample_max_value,
            timestep_spacing=timestep_spacing,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )
        self._custom_grid = False
        self._init_tau_tables(tuned_timesteps, tuned_grids, tuning_info)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device = None,
        timesteps: list[int] | None = None,
    ):
        """Set the grid (parent's spacing, ``"quadratic"`` or a custom `timesteps` list) and apply the tau table.

        Args:
            num_inference_steps (`int`, *optional*): number of steps; exclusive with `timesteps`.
            device (`str` or `torch.device`, *optional*): device of `timesteps` / `grid_timesteps`.
            timesteps (`list[int]`, *optional*): custom grid t_K > ... > t_1, integers in [0, T - 1].

        Raises:
            ValueError: bad arguments or grid; tables exist but none for this step count; the table's recorded grid
                differs from this grid.
        """
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("Pass exactly one of `num_inference_steps` or `timesteps` to `set_timesteps`.")
        T = self.config.num_train_timesteps
        grid = None
        if timesteps is not None:
            grid = validate_custom_timesteps(timesteps, T)
        elif self.config.timestep_spacing == "quadratic":
            if not 0 < num_inference_steps <= T:
                raise ValueError(f"`num_inference_steps` must be in [1, {T}], got {num_inference_steps}.")
            grid = quadratic_timesteps(num_inference_steps, T)
        self._check_table_available(self._count_evaluations(num_inference_steps, timesteps))
        with self._restore_on_error():
            learned = self._learned_grid(num_inference_steps, timesteps)
            if grid is None:
                super().set_timesteps(num_inference_steps, device)
            else:
                self.num_inference_steps = len(grid)
                self.timesteps = torch.from_numpy(grid).to(device)
            self._custom_grid = grid is not None

            def to_learned(g, d):
                self.num_inference_steps = len(g)
                self.timesteps = torch.tensor(g, dtype=torch.int64, device=d)
                self._custom_grid = True

            self._set_learned_grid(to_learned, learned, device)
            self._apply_tau_table()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DDIMSchedulerOutput | tuple:
        """One DDIM step from the grid time t_i; `timestep` (tau_i or t_i) only identifies i.

        Same arguments and outputs as [`DDIMScheduler.step`]. Without a table and custom grid it *is* the parent's.
        """
        if not (self.is_tuned or self._custom_grid):
            return super().step(
                model_output, timestep, sample, eta=eta, use_clipped_model_output=use_clipped_model_output,
                generator=generator, variance_noise=variance_noise, return_dict=return_dict,
            )
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
            )

        # 1. step index i from what the network saw (tau_i), then the grid time t_i and the time after the step:
        #    the parent's t_i - T // n for its own spacings, the next grid time t_{i-1} on a custom / quadratic grid
        #    (-1 = past the end); Python ints prepared once per grid (no tensor op per step)
        i = self.index_for_timestep(timestep)
        grid = self._prepared(self.grid_timesteps).floats
        t = int(grid[i])
        if self._custom_grid:
            prev_t = int(grid[i + 1]) if i + 1 < len(grid) else -1
        else:
            prev_t = t - self.config.num_train_timesteps // self.num_inference_steps

        # 2. alphas, betas at the grid times (alpha_prod_t = alpha-bar_{t_i}); the parent's expressions and order
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t

        # 3. predicted x_0 (DDIM eq. 12) from the prediction eps(x_{t_i}, tau_i)
        if self.config.prediction_type == "epsilon":
            pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
            pred_epsilon = model_output
        elif self.config.prediction_type == "sample":
            pred_original_sample = model_output
            pred_epsilon = (sample - alpha_prod_t ** (0.5) * pred_original_sample) / beta_prod_t ** (0.5)
        elif self.config.prediction_type == "v_prediction":
            pred_original_sample = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
            pred_epsilon = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
        else:
            raise ValueError(
                f"prediction_type given as {self.config.prediction_type} must be one of `epsilon`, `sample`, or"
                " `v_prediction`"
            )

        # 4. clip or threshold predicted x_0
        if self.config.thresholding:
            pred_original_sample = self._threshold_sample(pred_original_sample)
        elif self.config.clip_sample:
            pred_original_sample = pred_original_sample.clamp(
                -self.config.clip_sample_range, self.config.clip_sample_range
            )

        # 5. sigma_{t_i}(eta), DDIM eq. 16, between the grid times
        variance = self._get_variance(t, prev_t)
        std_dev_t = eta * variance ** (0.5)
        if use_clipped_model_output:
            pred_epsilon = (sample - alpha_prod_t ** (0.5) * pred_original_sample) / beta_prod_t ** (0.5)

        # 6. direction pointing to x_t (DDIM eq. 12)
        pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * pred_epsilon

        # 7. x_{t_{i-1}} without, then with, the random noise
        prev_sample = alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError(
                    "Cannot pass both generator and variance_noise. Please make sure that either `generator` or"
                    " `variance_noise` stays `None`."
                )
            if variance_noise is None:
                variance_noise = randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
                )
            prev_sample = prev_sample + std_dev_t * variance_noise

        if not return_dict:
            return (prev_sample, pred_original_sample)
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor
    ) -> torch.Tensor:
        """[`DDIMScheduler.add_noise`]; tau values (floating) are mapped to their grid time t_i first."""
        return super().add_noise(original_samples, noise, self._grid_timesteps_for(timesteps))

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """[`DDIMScheduler.get_velocity`]; tau values (floating) are mapped to their grid time t_i first."""
        return super().get_velocity(sample, noise, self._grid_timesteps_for(timesteps))
