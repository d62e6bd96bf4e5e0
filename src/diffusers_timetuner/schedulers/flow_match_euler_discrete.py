"""TimeTuner flow-matching Euler: Euler steps on the grid sigmas, the transformer is fed tau_i."""

from __future__ import annotations

import math
from typing import Literal

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
    FlowMatchEulerDiscreteScheduler,
    FlowMatchEulerDiscreteSchedulerOutput,
)

from .mixin import TimeTunerMixin

# Key of `tuning_info["<n>"]` holding the time shift a table was tuned with (see `time_shift_record`).
TIME_SHIFT_KEY = "time_shift"


def _same(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)


class TimeTunerFlowMatchEulerDiscreteScheduler(TimeTunerMixin, FlowMatchEulerDiscreteScheduler):
    """`FlowMatchEulerDiscreteScheduler` that feeds the transformer tuned times tau_i (TimeTuner, Xia et al., 2024).

    Takes every argument of [`FlowMatchEulerDiscreteScheduler`] plus `tuned_timesteps`, `tuned_grids`, `tuning_info`
    (see [`TimeTunerDDIMScheduler`]). With no table it is the parent, bit-for-bit.

    Taus are in the units of `scheduler.timesteps` (``sigma * num_train_timesteps``); SD3 pipelines pass them to the
    transformer as they are, Flux pipelines pass ``tau / 1000``. `step` integrates on ``sigmas[step_index]`` only,
    so the Euler update stays on the grid. A table may record the time shift it was tuned with in
    ``tuning_info["<n>"]["time_shift"]`` (`time_shift_record` builds it): ``{"use_dynamic_shifting": False,
    "shift": s}`` or ``{"use_dynamic_shifting": True, "mu": m}``; `set_timesteps` then refuses another shift or `mu`.
    A custom ``sigmas=`` / ``timesteps=`` grid works as in the parent; record it in `tuned_grids` to have it checked.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: Literal["exponential", "linear"] = "exponential",
        stochastic_sampling: bool = False,
        tuned_timesteps: dict | None = None,
        tuned_grids: dict | None = None,
        tuning_info: dict | None = None,
    ):
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            shift=shift,
            use_dynamic_shifting=use_dynamic_shifting,
            base_shift=base_shift,
            max_shift=max_shift,
            base_image_seq_len=base_image_seq_len,
            max_image_seq_len=max_image_seq_len,
            invert_sigmas=invert_sigmas,
            shift_terminal=shift_terminal,
            use_karras_sigmas=use_karras_sigmas,
            use_exponential_sigmas=use_exponential_sigmas,
            use_beta_sigmas=use_beta_sigmas,
            time_shift_type=time_shift_type,
            stochastic_sampling=stochastic_sampling,
        )
        self._init_tau_tables(tuned_timesteps, tuned_grids, tuning_info)
        self._mu = None
        for n, table in self._tau_tables.items():
            record = (table.info or {}).get(TIME_SHIFT_KEY)
            if record is not None:
                self._check_time_shift_record(n, record, mu=None, at_init=True)

    def _table_timestep_bound(self) -> int:
        # Flow-matching timesteps run up to sigma = 1, i.e. num_train_timesteps itself.
        return self.config.num_train_timesteps + 1

    @staticmethod
    def _count_evaluations(num_inference_steps=None, timesteps=None, sigmas=None) -> int | None:
        """The parent takes one sigma per model evaluation (the terminal sigma is appended by it)."""
        if num_inference_steps is not None:
            return num_inference_steps
        if sigmas is not None:
            return len(sigmas)
        if timesteps is not None:
            return len(timesteps)
        return None

    def time_shift_record(self, mu: float | None = None) -> dict:
        """The shift settings to store in ``tuning_info["<n>"]["time_shift"]`` for a table tuned with this config.

        Args:
            mu (`float`, *optional*): the `mu` passed to `set_timesteps` (required with ``use_dynamic_shifting``).
        """
        if self.config.use_dynamic_shifting:
            if mu is None:
                raise ValueError("`use_dynamic_shifting=True`: pass the `mu` the table is tuned for.")
            return {"use_dynamic_shifting": True, "mu": float(mu)}
        if mu is not None:
            raise ValueError("`mu` only applies with `use_dynamic_shifting=True`; this config uses a static `shift`.")
        return {"use_dynamic_shifting": False, "shift": float(self.shift)}

    def _check_time_shift_record(self, n: int, record, mu, at_init: bool = False) -> None:
        where = f'`tuning_info["{n}"]["{TIME_SHIFT_KEY}"]`'
        if not isinstance(record, dict) or not isinstance(record.get("use_dynamic_shifting"), bool):
            raise ValueError(
                f"{where} must be {{'use_dynamic_shifting': False, 'shift': s}} or "
                f"{{'use_dynamic_shifting': True, 'mu': m}} (see `time_shift_record`), got {record!r}."
            )
        key = "mu" if record["use_dynamic_shifting"] else "shift"
        if not isinstance(record.get(key), (int, float)) or isinstance(record.get(key), bool):
            raise ValueError(f"{where} records use_dynamic_shifting={record['use_dynamic_shifting']} but no number "
                             f"under {key!r}: {record!r}.")
        dynamic = bool(self.config.use_dynamic_shifting)
        if record["use_dynamic_shifting"] != dynamic:
            tuned = f"mu={record['mu']}" if record["use_dynamic_shifting"] else f"shift={record['shift']}"
            raise ValueError(
                f"The tau table for num_inference_steps={n} was tuned with use_dynamic_shifting="
                f"{record['use_dynamic_shifting']} ({tuned}), but this scheduler has use_dynamic_shifting={dynamic}. "
                "Use the scheduler config the table was tuned with, or calibrate a table for this one."
            )
        if at_init:
            if not dynamic and not _same(record["shift"], self.config.shift):
                raise ValueError(
                    f"The tau table for num_inference_steps={n} was tuned with shift={record['shift']}, but this "
                    f"scheduler has shift={self.config.shift}. Use shift={record['shift']}, or calibrate a table for "
                    f"shift={self.config.shift}."
                )
            return
        if dynamic:
            if not _same(record["mu"], mu):
                raise ValueError(
                    f"The tau table for num_inference_steps={n} was tuned with mu={record['mu']} (the dynamic shift, "
                    f"set by the image size), but set_timesteps got mu={mu}. Generate at the resolution the table "
                    "was tuned for, or calibrate a table for this mu."
                )
        elif not _same(record["shift"], self.shift):
            raise ValueError(
                f"The tau table for num_inference_steps={n} was tuned with shift={record['shift']}, but the scheduler "
                f"now has shift={self.shift} (set_shift). Use shift={record['shift']}, or calibrate a table for "
                f"shift={self.shift}."
            )

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
        timesteps: list[float] | None = None,
    ):
        """The parent's `set_timesteps` (grid sigmas), then the tau table for that step count, if any.

        `sigmas` / `timesteps` set a custom grid (parent semantics); a table for that many steps then applies to it.
        """
        n = self._count_evaluations(num_inference_steps, timesteps, sigmas)
        self._check_table_available(n)
        with self._restore_on_error():
            super().set_timesteps(num_inference_steps, device, sigmas=sigmas, mu=mu, timesteps=timesteps)
            self._mu = mu
            table = self._tau_tables.get(len(self.timesteps))
            record = None if table is None else (table.info or {}).get(TIME_SHIFT_KEY)
            if record is not None:
                self._check_time_shift_record(table.n, record, mu)
            self._apply_tau_table()

    def step(
        self,
        model_output: torch.FloatTensor,
        timestep: float | torch.FloatTensor,
        sample: torch.FloatTensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        per_token_timesteps: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> FlowMatchEulerDiscreteSchedulerOutput | tuple:
        """[`FlowMatchEulerDiscreteScheduler.step`] on the grid sigmas; with a table, `timestep` must be this step's
        tau."""
        if per_token_timesteps is not None and self.is_tuned:
            raise ValueError(
                "`per_token_timesteps` reads the noise level from the timesteps, which hold tuned taus here; "
                "per-token timesteps cannot be combined with a tau table (load the scheduler without one)."
            )
        if not isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            self._check_step_timestep(timestep)  # the parent rejects integer indices itself
        return super().step(
            model_output, timestep, sample, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise,
            generator=generator, per_token_timesteps=per_token_timesteps, return_dict=return_dict,
        )
