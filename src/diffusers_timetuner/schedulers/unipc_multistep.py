"""TimeTuner UniPC (multistep): the predictor-corrector steps on its sigmas, the network is fed tau_i."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from .mixin import TimeTunerMixin, validate_custom_timesteps


class TimeTunerUniPCMultistepScheduler(TimeTunerMixin, UniPCMultistepScheduler):
    """`UniPCMultistepScheduler` that feeds the network tuned timesteps tau_i (TimeTuner, Xia et al., CVPR 2024).

    Takes every argument of [`UniPCMultistepScheduler`] plus `tuned_timesteps`, `tuned_grids`, `tuning_info` (see
    [`TimeTunerDDIMScheduler`]). With no table it is the parent, bit-for-bit.

    UniPC evaluates the network once per step (the corrector UniC reuses that evaluation), so a table holds one tau
    per step. The parent's predictor and corrector read only ``sigmas[step_index]``; a table changes `timesteps` and
    the (tolerant) index lookup. `solver_p` (another scheduler as predictor) would receive the taus as its own
    timesteps, so it cannot be combined with a table.
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
        predict_x0: bool = True,
        solver_type: Literal["bh1", "bh2"] = "bh2",
        lower_order_final: bool = True,
        disable_corrector: list[int] = [],
        solver_p: SchedulerMixin = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: Literal["linspace", "leading", "trailing"] = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: Literal["zero", "sigma_min"] = "zero",
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: Literal["exponential"] = "exponential",
        sigma_min: float | None = None,
        sigma_max: bool | None = None,
        shift_terminal: bool | None = None,
        tuned_timesteps: dict | None = None,
        tuned_grids: dict | None = None,
        tuning_info: dict | None = None,
    ) -> None:
        if tuned_timesteps and solver_p is not None:
            raise ValueError(
                "`solver_p` would be stepped with the tuned taus as its timesteps; a tau table cannot be combined "
                "with `solver_p`. Drop `solver_p` or `tuned_timesteps`."
            )
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
            predict_x0=predict_x0,
            solver_type=solver_type,
            lower_order_final=lower_order_final,
            disable_corrector=disable_corrector,
            solver_p=solver_p,
            use_karras_sigmas=use_karras_sigmas,
            use_exponential_sigmas=use_exponential_sigmas,
            use_beta_sigmas=use_beta_sigmas,
            use_flow_sigmas=use_flow_sigmas,
            flow_shift=flow_shift,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
            final_sigmas_type=final_sigmas_type,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
            use_dynamic_shifting=use_dynamic_shifting,
            time_shift_type=time_shift_type,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            shift_terminal=shift_terminal,
        )
        self._init_tau_tables(tuned_timesteps, tuned_grids, tuning_info)

    def _table_timestep_bound(self) -> int:
        # With flow sigmas the network's time runs up to sigma = 1, i.e. num_train_timesteps itself (as in
        # FlowMatchEuler), and calibration may put the first tau there; VP models stop at num_train_timesteps - 1.
        return self.config.num_train_timesteps + (1 if self.config.use_flow_sigmas else 0)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
        timesteps: list[int] | None = None,
    ):
        """The parent's `set_timesteps` (grid and sigmas), then the tau table for that step count, if any.

        Args:
            num_inference_steps (`int`, *optional*): number of steps (parent's spacing).
            device (`str` or `torch.device`, *optional*): device of `timesteps`.
            sigmas (`list[float]`, *optional*): flow sigmas only (parent semantics): a custom grid of
                ``len(sigmas)`` steps.
            mu (`float`, *optional*): the parent's dynamic-shifting parameter.
            timesteps (`list[int]`, *optional*): a custom grid t_K > ... > t_1 on a VP noise schedule, integers in
                [0, T - 1]; the sigmas are the parent's, read at these timesteps (what the parent computes for its
                own spacing). The parent has no such argument; it is what tune="grid" calibrates and a learned grid
                uses.

        Raises:
            ValueError: bad arguments or grid; tables exist but none for this step count; the table's recorded grid
                differs from this grid.
        """
        if timesteps is not None:
            self._check_custom_grid_args(num_inference_steps, sigmas)
            validate_custom_timesteps(timesteps, self.config.num_train_timesteps)
        n = len(sigmas) if sigmas is not None else self._count_evaluations(num_inference_steps, timesteps)
        self._check_table_available(n)
        with self._restore_on_error():
            learned = self._learned_grid(num_inference_steps, timesteps, sigmas)
            if timesteps is None:
                super().set_timesteps(num_inference_steps, device, sigmas=sigmas, mu=mu)
            else:
                self._set_custom_grid(timesteps, device)
            self._set_learned_grid(self._set_custom_grid, learned, device)
            self._apply_tau_table()

    def _check_custom_grid_args(self, num_inference_steps, sigmas) -> None:
        if num_inference_steps is not None or sigmas is not None:
            raise ValueError("Pass one of `num_inference_steps`, `sigmas` or `timesteps` to `set_timesteps`.")
        cfg = self.config
        converted = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas")
                     if cfg.get(k)]
        if converted:
            raise ValueError(f"A custom `timesteps` grid needs the plain VP sigmas; this scheduler sets "
                             f"{', '.join(converted)}, which respace the grid themselves. Drop that option (or pass "
                             "flow `sigmas` with use_flow_sigmas).")
        if self.solver_p is not None:
            raise ValueError("A custom `timesteps` grid cannot be combined with `solver_p`; drop `solver_p`.")

    def _set_custom_grid(self, timesteps, device) -> None:
        """The parent's VP branch of `set_timesteps` with the given grid instead of its own spacing: sigmas read off
        the training schedule at the grid timesteps, the same final sigma, the same solver state reset."""
        grid = np.asarray([int(t) for t in timesteps], dtype=np.int64)
        sigmas = np.array(((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5)
        sigmas = np.interp(grid, np.arange(0, len(sigmas)), sigmas)
        if self.config.final_sigmas_type == "sigma_min":
            sigma_last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5
        elif self.config.final_sigmas_type == "zero":
            sigma_last = 0
        else:
            raise ValueError(f"`final_sigmas_type` must be one of 'zero', or 'sigma_min', but got "
                             f"{self.config.final_sigmas_type}")
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [sigma_last]]).astype(np.float32))
        self.timesteps = torch.from_numpy(grid).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(grid)
        self.model_outputs = [None] * self.config.solver_order
        self.lower_order_nums = 0
        self.last_sample = None
        self._step_index = None
        self._begin_index = None

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """[`UniPCMultistepScheduler.step`] on the grid sigmas; with a table, `timestep` must be this step's tau."""
        self._check_step_timestep(timestep)
        return super().step(model_output, timestep, sample, return_dict=return_dict)
