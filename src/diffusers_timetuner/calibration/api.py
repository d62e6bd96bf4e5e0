"""The one entry point: :func:`calibrate` learns tau tables for a Diffusers model and returns a tuned scheduler.

This file stays whole (about 380 lines, half of it ``calibrate``'s docstring and the measured defaults' notes): it is
the entry point's one job, resolving the inputs, then per step count one ``StepCountCalibrator``, the held-out
report and the user-facing verdict (``_worse_advice`` / ``_se_note``). The pieces live elsewhere: ``inputs.py``
(data, shapes, sample sets, model probes), ``calibrator.py``, ``strategies.py``, ``report.py``.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..denoiser import Denoiser, network_call_for, slice_conditioning
from ..table import HELD_OUT_KEY, timesteps_close
from .checkpoint import CheckpointStore
from .config import CalibrationConfig
from .conditions import build_conditions, resolve_model
from .distributed import Distributed
from .objectives import get_objective
from .optimizers import JointOptimizer, get_optimizer
from .report import StepCountReport, evaluate_heldout, heldout_record, plot_report, write_report
from .rollout import Rollout
from .families import resolve_scheduler, untuned_copy
from .calibrator import StepCountCalibrator, distinct_taus  # noqa: F401  (distinct_taus: public here too)
from .grid_search import check_grid_tunable, guard_grid_table, learn_grid, resolve_grid_criterion
from .inputs import (
    check_custom_grid, check_float_timesteps, draw_set, model_device, sample_shape_of, split_data,
)
from .stats import VALIDATION_METRICS
from .strategies import get_strategy
from .teacher import DEFAULT_FINE_TEACHER_STEPS, FINE_TEACHER_NAME, FineTeacher, Teacher, default_teacher_steps
from .prediction import timestep_bounds
from .validate import VALIDATED_ARGS as _VALIDATED_ARGS, validate_calibration_args

logger = logging.getLogger(__name__)

# Defaults chosen by measurement (DDIM, 10 steps, held-out MSE to a many-step teacher's final sample from the same
# x_T):
#   exact GMM (sklearn digits, 64-D, 256 calibration samples, 512 held-out): paper eq. 9 +3.8 % (guarded -8.2 %),
#       teacher_local -10.9 % (guarded -12.9 %), endpoint -34.7 % at 2.7x teacher_local's model evaluations;
#   bundled MNIST UNet, 32 calibration samples: paper eq. 9 diverges at the step into t = 0 (+70 % held-out); no
#       objective beat the untuned sampler beyond noise on 96 fresh x_T (the metric is heavy-tailed: a few samples
#       that end in another mode dominate it), and the validation guard correctly kept tau = t.
# endpoint is the most accurate objective where the evidence is clear (the exact model; docs/facts.md, 1;
# trained UNet), but costs ~3-4x; teacher_local is the default because the no-argument CLI run must finish in a few
# CPU minutes. Use objective="endpoint" with more samples where compute allows.
# At published sizes on a GPU (benchmarks/results/gpu_full: 512 calibration samples, FD-MNIST on 5000 samples) all
# four objectives improved MNIST DDIM@10 (paper -12.5 %, paper_x0 -9.3 %, teacher_local -6.4 %, endpoint -6.5 %):
# with enough samples the paper's objective is competitive on a trained UNet; see the README's recommendation.
# (DEFAULT_OBJECTIVE and DEFAULT_OPTIMIZER are defined with the other defaults in config.py.)


@dataclass
class CalibrationResult:
    """What :func:`calibrate` returns.

    Attributes:
        scheduler: a TimeTuner scheduler of the input's class and config with one tau table per step count.
        reports: per step count n, the :class:`~diffusers_timetuner.calibration.report.StepCountReport`.
        settings: the JSON-able settings of the run: every ``CalibrationConfig`` field (resolved: step counts, grid,
            objective, strategy, optimiser by name) plus run-time facts (scheduler class, model id, conditioning, ...).
    """

    scheduler: Any
    reports: Dict[int, StepCountReport]
    settings: Dict[str, Any] = field(default_factory=dict)

    @property
    def tables(self) -> Dict[int, List[float]]:
        return {n: list(r.taus) for n, r in self.reports.items()}

    @property
    def worse_than_untuned(self) -> bool:
        return any(r.worse_than_untuned for r in self.reports.values())

    def to_dict(self) -> Dict[str, Any]:
        return {
            "settings": self.settings,
            "scheduler_class": type(self.scheduler).__name__,
            "step_counts": {str(n): r.to_dict() for n, r in sorted(self.reports.items())},
            "worse_than_untuned": self.worse_than_untuned,
        }

    def save(self, output_dir: str, extra: Optional[Dict[str, Any]] = None) -> None:
        """Write ``scheduler_config.json``, ``report.json`` and ``calibration.png`` to ``output_dir``.

        All three appear together or not at all: they are written to a temporary folder beside ``output_dir`` that
        replaces it when complete (other files already in ``output_dir`` are kept), so a failure leaves the old result.
        """
        import os

        from .checkpoint import atomic_output_dir

        payload = self.to_dict()
        payload.update(extra or {})
        with atomic_output_dir(output_dir) as tmp:
            self.scheduler.save_pretrained(tmp)
            write_report(os.path.join(tmp, "report.json"), payload)
            plot_report(os.path.join(tmp, "calibration.png"), [self.reports[n] for n in sorted(self.reports)])


def calibrate(
    model_or_pipeline,
    scheduler=None,
    num_inference_steps: Union[int, Sequence[int], None] = None,
    config: Optional[CalibrationConfig] = None,
    *,
    conditions=None,
    negative_conditions=None,
    null_class_label: Optional[int] = None,
    data: Optional[torch.Tensor] = None,
    sample_shape: Optional[Sequence[int]] = None,
    optimizer_kwargs: Optional[Dict[str, Any]] = None,
    accelerator=None,
    checkpoint_dir: Optional[str] = None,
    progress: bool = True,
    model_id: Optional[str] = None,
    **overrides,
) -> CalibrationResult:
    """Learn a tau table per step count (TimeTuner, Xia et al., CVPR 2024) and return the tuned scheduler.

    Args:
        model_or_pipeline: a Diffusers network (``UNet2DModel``, ``UNet2DConditionModel``, ``DiTTransformer2DModel``,
            any module called as ``model(x, t, **cond)``) or a pipeline with ``.unet`` / ``.transformer`` (and, for
            text conditioning, ``encode_prompt``).
        scheduler: a TimeTuner scheduler, a plain Diffusers scheduler of a supported class (converted to its
            TimeTuner class), or a name (``"ddim"``, ``"ddpm"``, ``"dpmsolver"``, ``"dpmsolver_singlestep"``,
            ``"euler"`` or a class name). ``None``: the pipeline's scheduler.
        num_inference_steps: one step count n or several; one table per n. ``None``: the config's, else 10, or
            ``len(timesteps)``.
        config: a :class:`~diffusers_timetuner.calibration.config.CalibrationConfig` (``None``: its defaults). The
            settings below from ``timesteps`` to ``seed`` (except the run-time objects) are its fields; pass them
            as keyword overrides (``calibrate(pipe, "ddim", 10, num_samples=128)``) or in the config.
        timesteps: a custom grid t_K > ... > t_1 (descending integer training timesteps, as a pipeline's
            ``timesteps=`` argument) to calibrate one table on, e.g. the paper's quadratic or a log-SNR grid. The
            table records it: sample with ``pipe(..., timesteps=the same grid)``. Needs a scheduler whose
            ``set_timesteps`` accepts ``timesteps``.
        objective: ``"teacher_local"`` (default: match a many-step teacher's state after every step, from the same
            x_T; cheap; the measurements are noted in ``calibration/api.py``), ``"endpoint"`` (match the
            teacher's final sample; the most accurate on the exact GMM, ~3-4x the cost),
            ``"paper"`` (eq. 9) or ``"paper_x0"`` (eq. 10).
        strategy: ``"sequential"`` (Alg. 1, needs ``data``), ``"parallel"`` (eq. 11, needs ``data``) or
            ``"data_free"`` (x_T ~ N(0, I)). ``None``: ``"sequential"`` with data, else ``"data_free"``.
        optimizer: ``"local_search"`` (default, derivative-free, common random numbers) or ``"adam"`` (the reference
            code's Adam on r = tau / t; ``optimizer_kwargs={"num_steps": 500}`` as in the paper), or an instance.
        guidance_scale: classifier-free guidance scale (recorded in the table's info; one table per scale).
        conditions: class labels (ints), prompts (strings, encoded by the pipeline's own ``encode_prompt``: SD, SD3,
            Flux), prompt embeddings (a float tensor), or a dict of batch-first network inputs (SD3 / Flux:
            ``{"prompt_embeds": ..., "pooled_prompt_embeds": ...}``; Flux2: ``{"prompt_embeds": ...}``, its prompts
            are not encoded here); cycled over the calibration samples.
            ``None``: unconditional, or every class in turn for a class-conditional model.
        negative_conditions: the unconditional branch for guidance (one negative prompt / embeddings / dict; Flux:
            the ``negative_prompt`` of its true CFG, ``true_cfg_scale=guidance_scale``);
            class-conditional models use ``null_class_label`` (default: the pipeline's or ``num_class_embeds - 1``).
        data: x_0 samples in the model's input space, shape (N, *sample_shape), for ``sequential`` / ``parallel``.
        num_samples: calibration samples (fixed batch, common random numbers across candidates).
        batch_size: samples per network call (per process).
        num_validation_samples: samples of the validation set the guard uses (``guard=True``); fresh x_T, disjoint
            from the calibration and held-out sets.
        num_heldout_samples: samples of the held-out set every run reports on (fresh x_T).
        teacher_steps: the teacher's step count (default about 5 n, see ``teacher.default_teacher_steps``).
        guard: keep only the prefix of the tuned table (first k steps tuned, the rest untuned) with the lowest
            validation error on a separate validation set, among those clearly better than untuned there
            (``guard_margin``), or none.
        guard_margin: the guard keeps a tuned prefix only if it beats the untuned sampler on the validation set by
            more than this many paired standard errors (0: any improvement). Choosing the best of n + 1 noisy
            estimates otherwise ships tables that are better by chance (measured on the exact GMM with 32 validation
            samples: a DDPM@10 eq. 9 table accepted at margin 0 raised FD by 21%; margin 2 keeps tau = t).
        validation_metric: what the guard and the held-out verdict compare: ``"endpoint_mse"`` (each final sample
            against the teacher's from the same x_T), ``"energy_distance"`` (the set of final samples against the
            teacher's set), or ``"auto"`` (default): energy distance for stochastic samplers (DDPM, DDIM with
            eta > 0, SDE solvers), whose per-sample error rewards shrinking the spread of the samples (measured on
            the exact GMM: DDPM tables accepted by endpoint MSE raised FD by 8-110%), endpoint MSE otherwise.
        eta: DDIM's eta for the coarse sampler.
        sample_shape: per-sample shape (C, H, W); default from ``data`` or the model's config.
        seed: seeds every random draw (calibration, validation and held-out sets are disjoint draws).
        accelerator: an ``accelerate.Accelerator``: samples are split across its processes and losses / gradients
            reduced, so every process returns the same table, and the network runs on its device. ``None``: one
            process, on the device the network is already on (``pipe.to("cuda")`` first to calibrate on a GPU).
        checkpoint_dir: write a checkpoint after every step there and resume from it when present.
        progress: tqdm bars (main process only).
        model_id: recorded in the table's info.
    """
    started = time.perf_counter()
    config = (config if config is not None else CalibrationConfig()).replace(**overrides)
    if num_inference_steps is None:
        num_inference_steps = config.num_inference_steps
    # every argument check that needs no model, before any network evaluation
    given = {**config.to_dict(), "num_inference_steps": num_inference_steps, "data": data, "sample_shape": sample_shape}
    validate_calibration_args(**{k: v for k, v in given.items() if k in _VALIDATED_ARGS})
    timesteps, objective, strategy, optimizer = config.timesteps, config.objective, config.strategy, config.optimizer
    guidance_scale, num_samples, batch_size = config.guidance_scale, config.num_samples, config.batch_size
    num_validation_samples, num_heldout_samples = config.num_validation_samples, config.num_heldout_samples
    teacher_steps, guard, guard_margin = config.teacher_steps, config.guard, config.guard_margin
    validation_metric, eta, seed = config.validation_metric, config.eta, config.seed
    sigmas, mu = config.sigmas, config.mu
    if sigmas is not None and timesteps is not None:
        raise ValueError("Pass either a custom `timesteps` grid or a custom `sigmas` grid, not both.")
    if config.adam_steps is not None and optimizer_kwargs is None and optimizer == "adam":
        optimizer_kwargs = {"num_steps": int(config.adam_steps)}
    dist = Distributed(accelerator)
    if timesteps is not None:
        timesteps = [int(t) for t in (timesteps.tolist() if hasattr(timesteps, "tolist") else timesteps)]
        if num_inference_steps is not None and [int(n) for n in np.atleast_1d(num_inference_steps)] != [
            len(timesteps)
        ]:
            raise ValueError(f"num_inference_steps={num_inference_steps!r} disagrees with the custom grid of "
                             f"{len(timesteps)} timesteps: pass only `timesteps` (one table, n = len(timesteps)).")
        num_inference_steps = len(timesteps)
    if sigmas is not None:
        sigmas = [float(v) for v in (sigmas.tolist() if hasattr(sigmas, "tolist") else sigmas)]
        if num_inference_steps is not None and [int(n) for n in np.atleast_1d(num_inference_steps)] != [len(sigmas)]:
            raise ValueError(f"num_inference_steps={num_inference_steps!r} disagrees with the custom grid of "
                             f"{len(sigmas)} sigmas: pass only `sigmas` (one table, n = len(sigmas)).")
        num_inference_steps = len(sigmas)
    if num_inference_steps is None:
        num_inference_steps = 10
    if isinstance(num_inference_steps, int):
        num_inference_steps = [num_inference_steps]
    steps = [int(n) for n in num_inference_steps]
    if not steps:
        raise ValueError("num_inference_steps is empty: give at least one step count.")
    if validation_metric not in ("auto",) + VALIDATION_METRICS:
        raise ValueError(f"Unknown validation_metric {validation_metric!r}: choose 'auto', "
                         f"{', '.join(repr(m) for m in VALIDATION_METRICS)}.")
    if not guard_margin >= 0:
        raise ValueError(f"guard_margin must be >= 0 standard errors, got {guard_margin!r}.")
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}.")

    model, pipeline = resolve_model(model_or_pipeline)
    # Where the network already is (a pipeline moved to "cuda" calibrates there); an accelerator decides otherwise.
    device = dist.device if accelerator is not None else model_device(model)
    base = resolve_scheduler(scheduler, pipeline)
    untuned = untuned_copy(base)
    train_steps = int(untuned.config.num_train_timesteps)
    for n in steps:
        if n < 1 or n > train_steps:
            raise ValueError(
                f"num_inference_steps={n} is not in [1, {train_steps}]: the model was trained with "
                f"{train_steps} timesteps ({type(untuned).__name__}.config.num_train_timesteps)."
            )
    if timesteps is not None:
        check_custom_grid(untuned, timesteps)
    # how the network is called (SD3 / Flux / Flux2 transformers as their pipelines call them) and the sample it takes
    network_call = network_call_for(model, config.embedded_guidance_scale)
    data, data_labels = split_data(data)
    shape = sample_shape_of(model, data, sample_shape if sample_shape is not None
                            else network_call.default_sample_shape(model))
    if data is not None:
        if tuple(data.shape[1:]) != shape:
            raise ValueError(f"data has samples of shape {tuple(data.shape[1:])}, the model expects {shape}.")
    # the dynamic shift per step count: the given mu, else the one the network's pipeline computes (Flux: from the
    # image size; Flux2: from the image size and n)
    mus = {n: network_call.pipeline_mu(untuned, shape, n) if mu is None else mu for n in steps}
    check_flow_settings(untuned, sigmas, mus[steps[0]])
    if not network_call.pipeline_cfg and float(guidance_scale) != 1.0:
        raise ValueError(f"{network_call.description['call']} has no classifier-free guidance (its guidance_scale "
                         f"is the guidance embedding's value): use guidance_scale=1.0, and embedded_guidance_scale= "
                         f"for the embedded guidance.")

    def sigmas_for(n: int):
        """The custom sigmas, else the ones the network's pipeline passes for n steps (Flux, Flux2), else None."""
        if sigmas is not None or "sigmas" not in inspect.signature(untuned.set_timesteps).parameters:
            return sigmas
        return network_call.pipeline_sigmas(n, untuned)
    tune = config.tune
    if tune != "tau":
        check_grid_tunable(untuned)

    objective_obj = get_objective(objective)
    strategy = strategy or ("sequential" if data is not None else "data_free")
    strategy_obj = get_strategy(strategy)
    if strategy in ("sequential", "parallel") and data is None:
        raise ValueError(
            f"strategy={strategy!r} draws x_T (or x_t) from data (Alg. 1 / eq. 11 of the paper) but no `data` was "
            "given: pass data (images in the model's input space, or --data_dir), or use strategy='data_free'."
        )
    if objective_obj.needs_data and strategy == "data_free":
        raise ValueError(f"objective={objective!r} needs the data x_0 of each trajectory: use strategy='sequential'.")
    if strategy == "parallel" and not (objective_obj.local and not objective_obj.needs_teacher):
        raise ValueError(
            f"strategy='parallel' fits each tau_i on x_t drawn from data, with no trajectory; objective={objective!r} "
            "needs one. Use objective='paper' or 'paper_x0' with it, or strategy='sequential' / 'data_free'."
        )
    optimizer_obj = get_optimizer(optimizer, **(optimizer_kwargs or {}))
    if isinstance(optimizer_obj, JointOptimizer) and (objective_obj.name != "endpoint" or strategy == "parallel"):
        raise ValueError("optimizer='adam_joint' tunes all steps through the whole sampler: it needs "
                         "objective='endpoint' and strategy='data_free' or 'sequential'.")

    model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    cond_set = build_conditions(model, pipeline, conditions, negative_conditions, guidance_scale, null_class_label,
                                device, network_call=network_call)
    denoiser = Denoiser(model, guidance_scale=guidance_scale, uncond=cond_set.uncond, network_call=network_call)
    probe = check_float_timesteps(denoiser, shape, cond_set.take(range(1)), device, train_steps)

    # Disjoint seeded draws: calibration (seed), validation (seed + 1), held-out (seed + 2); identical everywhere.
    calib = draw_set(num_samples, shape, cond_set, data, seed, data_labels)
    validation = draw_set(num_validation_samples, shape, cond_set, None, seed + 1) \
        if guard and num_validation_samples else None
    heldout = draw_set(num_heldout_samples, shape, cond_set, None, seed + 2)

    # The report's settings: every CalibrationConfig field (resolved: step counts, grid, objective, strategy and
    # optimiser by name), then the run-time facts no setting holds.
    resolved = config.replace(num_inference_steps=steps, timesteps=timesteps, sigmas=sigmas,
                              objective=objective_obj.name, strategy=strategy_obj.name,
                              optimizer=getattr(optimizer_obj, "name", type(optimizer_obj).__name__))
    settings = {
        **resolved.to_dict(),
        "optimizer_settings": optimizer_obj.settings() if hasattr(optimizer_obj, "settings") else {},
        "scheduler_class": type(base).__name__, "model_id": model_id,
        "prediction_type": getattr(untuned.config, "prediction_type", None),
        "data_free": data is None, "num_processes": dist.world_size,
        "conditioning": cond_set.description, "network_call": network_call.description,
        "mu": {str(n): v for n, v in mus.items()} if network_call.mu_depends_on_steps and mu is None
        else mus[steps[0]],
    }
    # What a resumed run must share with the interrupted one: every setting (not the process count) and a probe of
    # the model (tells another model apart). A checkpoint with other values is refused, naming the keys.
    fingerprint = dict(settings, num_processes=None, model_probe=probe)
    store = CheckpointStore(checkpoint_dir, fingerprint, enabled=dist.is_main_process) if checkpoint_dir else None
    log = (lambda msg: logger.info(msg)) if dist.is_main_process else (lambda msg: None)

    result_sched, reports = base, {}
    bounds = timestep_bounds(untuned)

    def metric_for(rollout) -> str:
        metric = validation_metric
        if metric == "auto":
            metric = "energy_distance" if rollout.stochastic else "endpoint_mse"
        if metric == "energy_distance" and min(num_heldout_samples, len(validation) if validation else 2) < 2:
            raise ValueError("validation_metric='energy_distance' compares sets of samples: it needs "
                             "num_heldout_samples >= 2 and num_validation_samples >= 2.")
        return metric

    def tau_table(n, grid, teacher=None):
        """Tau for n steps on ``grid`` (None: the scheduler's own) with the chosen strategy; guarded on that grid."""
        rollout = Rollout(denoiser, untuned, n, eta=eta, device=device, timesteps=grid, sigmas=sigmas_for(n),
                          mu=mus[n])
        objective_obj.check(rollout)
        check_untuned_finite(rollout, shape, cond_set.take(range(1)))
        if teacher is None:
            teacher = fine_teacher
        if teacher is None:  # teacher="same" or a non-VP sampler: the calibrated sampler at about 5 n steps
            m = int(teacher_steps or default_teacher_steps(untuned, n, rollout.grid_list))
            teacher = Teacher(denoiser, untuned, m, device=device, coarse_grid=rollout.grid_list)
        if objective_obj.name == "teacher_local" and teacher.grid_indices(rollout.grid_list[1:]) is None:
            raise ValueError(
                f"objective='teacher_local' needs the teacher's grid ({teacher.num_inference_steps} steps) to contain "
                f"the coarse grid {rollout.grid_list}; choose teacher_steps so that it does (e.g. a multiple of {n} "
                f"dividing {train_steps} with leading spacing), or use objective='endpoint'."
            )
        cal = StepCountCalibrator(rollout, objective_obj, optimizer_obj, dist, calib, batch_size, seed, bounds,
                                  teacher=teacher, validation=validation, guard=guard,
                                  checkpoint=store if grid == timesteps else None, log=log, progress=progress,
                                  validation_metric=metric_for(rollout), guard_margin=float(guard_margin))
        taus = cal.run(strategy_obj)
        return rollout, cal, taus, teacher

    # One accurate teacher for every step count, its trajectories cached per batch; its own error is reported.
    fine_teacher, yardstick = None, None
    if config.teacher == "dpmsolver++" and FineTeacher.supports(untuned):
        fine_teacher = FineTeacher(denoiser, untuned, int(teacher_steps or DEFAULT_FINE_TEACHER_STEPS), device=device)

    for n in steps:
        criterion = None if tune == "tau" else resolve_grid_criterion(
            config.grid_search_criterion, metric_for(Rollout(denoiser, untuned, n, eta=eta, device=device)))
        if tune != "tau" and dist.world_size > 1 and criterion == "energy_distance":
            # The grid search scores a candidate by the energy distance of each process's own share of the samples,
            # so processes could accept different grids; only the endpoint error is reduced across processes.
            raise ValueError(f"tune={tune!r} with a stochastic sampler (judged by the energy distance) runs on one "
                             f"process only, not {dist.world_size}: launch one process, or use a deterministic "
                             "sampler (e.g. DDIM with eta=0) or validation_metric='endpoint_mse'.")
        tick = time.perf_counter()
        fwd0 = denoiser.num_forward_samples
        info = dict(settings, package="diffusers-timetuner", package_version=_version())
        # refuse a sampler that already ends non-finite before any teacher work (names its step, not the teacher's)
        check_untuned_finite(Rollout(denoiser, untuned, n, eta=eta, device=device, timesteps=timesteps,
                                     sigmas=sigmas_for(n), mu=mus[n]), shape, cond_set.take(range(1)))
        if fine_teacher is not None:
            if yardstick is None:
                k = min(8, len(calib))
                yardstick = fine_teacher.self_error(calib.noise[:k].to(device),
                                                    slice_conditioning(calib.cond, range(k)))
                log(f"teacher: {FINE_TEACHER_NAME} at {yardstick['teacher_steps']} steps; its squared endpoint "
                    f"distance to a {yardstick['reference_steps']}-step run is {yardstick['endpoint_mse']:.3g} "
                    f"(+/- {yardstick['endpoint_mse_se']:.2g} SE; a sample's squared norm: "
                    f"{yardstick['sample_sq_norm']:.3g}), the error bar of every figure below")
            info["teacher"] = FINE_TEACHER_NAME
        records, grid_report = [], None
        if tune == "tau":
            rollout, cal, taus, teacher = tau_table(n, timesteps)
            records, table_grid, held_rollout = cal.records, rollout.grid_list, rollout
        else:
            teacher = fine_teacher
            held_rollout = Rollout(denoiser, untuned, n, eta=eta, device=device)  # the default grid: the baseline
            metric = metric_for(held_rollout)
            plan = learn_grid(denoiser, untuned, n, calib, teacher, dist=dist, batch_size=batch_size, seed=seed,
                              eta=eta, metric=metric, max_evaluations=config.grid_search_evaluations,
                              criterion=criterion, log=log, progress=progress)
            grid_report = {"tune": tune, "search": plan.to_dict(), "teacher": FINE_TEACHER_NAME,
                           "teacher_steps": teacher.num_inference_steps, "teacher_error": yardstick}
            if tune == "grid":
                table_grid = [float(t) for t in plan.grid]
                taus = list(table_grid)
            else:
                rollout, cal, taus, _ = tau_table(n, plan.grid, teacher)
                records, table_grid = cal.records, rollout.grid_list
            learned = dict(info, learned_grid=True, tune=tune, grid_search=plan.to_dict())
            candidates = [(tune, result_sched.with_tuned_timesteps(n, taus, grid=table_grid, info=learned))]
            chosen, table_grid, taus, verdicts = guard_grid_table(
                n, candidates, untuned, denoiser, validation, teacher, metric, batch_size, eta, guard,
                float(guard_margin), log, fallback=lambda: tau_table(n, None, teacher), records=records)
            grid_report.update(chosen=chosen, guard=verdicts)
            info = dict(info, learned_grid=True, tune=tune, grid_search=plan.to_dict()) \
                if chosen in ("grid", "grid+tau") else dict(info, tune=tune, grid_fallback=chosen)
        m = teacher.num_inference_steps
        info["teacher_steps"] = m
        if hasattr(untuned, "time_shift_record"):  # flow matching: the shift / mu the table is for (checked on load)
            info["time_shift"] = untuned.time_shift_record(mus[n])
        candidate = result_sched.with_tuned_timesteps(n, taus, grid=table_grid, info=info)
        metric = metric_for(held_rollout)
        held = evaluate_heldout(held_rollout, candidate, teacher, heldout.noise, heldout.cond, dist, batch_size,
                                metric)
        info[HELD_OUT_KEY] = heldout_record(held).to_json()  # what the hub reads back (hub.recorded_held_out)
        result_sched = result_sched.with_tuned_timesteps(n, taus, grid=table_grid, info=info)
        rep = StepCountReport(num_inference_steps=n, grid=list(table_grid), taus=[float(t) for t in taus],
                              steps=list(records), heldout=held, seconds=time.perf_counter() - tick,
                              forward_samples=int(dist.sum(torch.tensor(float(denoiser.num_forward_samples - fwd0)))),
                              backward_samples=sum(r.backward_samples for r in records), grid_tuning=grid_report,
                              teacher={"solver": info.get("teacher", "same sampler"), "steps": m,
                                       "self_error": yardstick})
        default_grid = held_rollout.grid_list
        if held["worse_than_untuned"]:
            msg = (f"TUNING MADE IT WORSE for n={n}: held-out {metric} to the {m}-step teacher "
                   f"{held['untuned']:.5g} (untuned) -> {held['tuned']:.5g} (tuned){_se_note(held)}. "
                   + _worse_advice(held, bool(guard and validation is not None)))
            rep.warnings.append(msg)
            if dist.is_main_process:
                logger.warning(msg)
        elif (tune == "tau" and all(timesteps_close(a, b) for a, b in zip(cal.fitted, default_grid))) or (
                grid_report is not None and grid_report["chosen"] == "untuned"):
            msg = (f"NO GAIN for n={n}: the table is tau = t (the validation guard kept no tuned step). It samples "
                   "exactly like the untuned scheduler; try more calibration samples or another objective.")
            rep.warnings.append(msg)
            if dist.is_main_process:
                logger.warning(msg)
        else:
            log(f"n={n}: held-out {metric} {held['untuned']:.5g} -> {held['tuned']:.5g} "
                f"({100 * held['relative_change']:+.1f}%{_se_note(held)})")
        reports[n] = rep
    settings["seconds"] = time.perf_counter() - started
    return CalibrationResult(result_sched, reports, settings)




def check_untuned_finite(rollout: Rollout, shape, cond) -> None:
    """Refuse a sampler whose untuned run from one x_T already ends in NaN / inf (nothing to tune against).

    Diffusers' UniPC with ``solver_type="bh1"`` and ``final_sigmas_type="zero"`` does this on any model."""
    before = rollout.denoiser.num_forward_samples
    x = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0)).to(rollout.device)
    state = rollout.initial_state(rollout.noise_to_state(x), cond)
    final = rollout.run(state, rollout.grid_list).x
    rollout.denoiser.num_forward_samples = before  # a check, not calibration work
    if not bool(torch.isfinite(final).all()):
        sched = rollout.scheduler
        hint = (" (UniPC bh1 with final_sigmas_type='zero' divides by zero at the last step: use "
                "final_sigmas_type='sigma_min' or solver_type='bh2')" if "UniPC" in type(sched).__name__ else "")
        raise ValueError(f"The untuned {type(sched).__name__} with n={rollout.num_inference_steps} gives non-finite "
                         f"samples{hint}; fix the scheduler config before calibrating.")


def check_flow_settings(scheduler, sigmas, mu) -> None:
    """Refuse ``sigmas`` / ``mu`` where they do not apply, and a dynamic-shift scheduler without ``mu``."""
    name = type(scheduler).__name__
    flow_euler = hasattr(scheduler, "time_shift_record")
    if sigmas is not None:
        if not flow_euler:
            raise ValueError(f"A custom `sigmas` grid is for flow-matching schedulers (FlowMatchEuler); {name} takes "
                             "a custom grid as `timesteps`.")
        if not all(0.0 < v <= 1.0 for v in sigmas) or any(b >= a for a, b in zip(sigmas, sigmas[1:])):
            raise ValueError(f"`sigmas` must be strictly descending values in (0, 1] (the parent appends the final "
                             f"0), got {sigmas}.")
    if not flow_euler:
        if mu is not None:
            raise ValueError(f"`mu` is the dynamic time shift of flow-matching schedulers; {name} has none.")
        return
    dynamic = bool(scheduler.config.use_dynamic_shifting)
    if dynamic and mu is None:
        raise ValueError(f"{name} has use_dynamic_shifting=True: pass the `mu` the table is for (Flux pipelines "
                         "compute it from the image size, e.g. "
                         "diffusers.pipelines.flux.pipeline_flux.calculate_shift).")
    if mu is not None and not dynamic:
        raise ValueError(f"`mu` only applies with use_dynamic_shifting=True; {name} uses the static "
                         f"shift={scheduler.config.shift}.")


def _worse_advice(held: Dict[str, Any], guarded: bool) -> str:
    """What to do about a table the held-out set finds worse, and whether that may be noise (< 2 SE)."""
    se, diff = held.get("change_se"), held["tuned"] - held["untuned"]
    noise = "Within 2 standard errors, so possibly noise of the held-out set; still, " if se and diff < 2 * se else ""
    fix = "more calibration and validation samples or objective='endpoint'" + ("" if guarded else ", or guard=True")
    advice = f"do not ship this table untested: try {fix}."
    return noise + advice if noise else advice[0].upper() + advice[1:]




def _se_note(held: Dict[str, Any]) -> str:
    """', difference +x +/- se SE': how far the held-out change is from noise (paired standard error)."""
    se = held.get("change_se")
    return "" if se is None else f", difference {held['tuned'] - held['untuned']:+.3g} +/- {se:.2g} SE"












def _version() -> str:
    from .._version import __version__

    return __version__
