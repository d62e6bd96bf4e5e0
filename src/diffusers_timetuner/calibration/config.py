""":class:`CalibrationConfig`: the one spelling (and the one set of defaults) of every calibration setting.

:func:`~diffusers_timetuner.calibration.calibrate` takes it (plus keyword overrides), the CLI is generated from its
fields (``transformers.HfArgumentParser``), and the benchmarks build one. A new setting is added here, once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .grid_search import DEFAULT_GRID_CRITERION, GRID_CRITERIA
from .objectives import OBJECTIVES
from .optimizers import OPTIMIZERS
from .stats import VALIDATION_METRICS
from .strategies import STRATEGIES

# Defaults chosen by measurement: the figures are noted in calibration/api.py.
DEFAULT_OBJECTIVE = "teacher_local"
DEFAULT_OPTIMIZER = "local_search"


@dataclass(frozen=True)
class CalibrationConfig:
    """Every setting of a calibration run. ``dataclasses.asdict(config)`` is JSON-able."""

    num_inference_steps: Optional[List[int]] = field(
        default=None, metadata={"help": "One or more step counts (default 10, or the length of --timesteps)."})
    timesteps: Optional[List[int]] = field(
        default=None, metadata={"help": "A custom grid t_K > ... > t_1 (descending integers) to calibrate one table "
                                        "on; sample with pipe(..., timesteps=<the same grid>)."})
    sigmas: Optional[List[float]] = field(
        default=None, metadata={"help": "Flow matching: a custom sigma grid 1 >= s_K > ... > s_1 > 0 (before the "
                                        "scheduler's shift) to calibrate one table on; sample with "
                                        "pipe(..., sigmas=<the same grid>)."})
    mu: Optional[float] = field(
        default=None, metadata={"help": "Flow matching with use_dynamic_shifting: the time shift mu the table is "
                                        "for (Flux pipelines compute it from the image size, Flux2 from the image "
                                        "size and the step count); recorded in the table."})
    tune: str = field(default="tau", metadata={
        "help": "What is learned: tau (the paper: the time the network sees, on the scheduler's grid), grid (the "
                "grid t_K > ... > t_1 itself, tau = t) or grid+tau (both). grid modes need a solver that runs on a "
                "custom grid (DDIM, DDPM, DPM-Solver, Euler, UniPC on a VP schedule).", "choices": ["tau", "grid", "grid+tau"]})
    grid_search_evaluations: Optional[int] = field(default=None, metadata={
        "help": "tune=grid / grid+tau: candidate grids the pattern search rolls out (default 4 n; each costs about "
                "n / 2 network evaluations per calibration sample; 0: the dynamic programme's grid as it is)."})
    grid_search_criterion: str = field(default="auto", metadata={
        "help": "tune=grid / grid+tau: how the search scores a grid from the calibration samples' squared endpoint "
                "errors e_i to the teacher: mean (mean e_i) or log_mean (mean log e_i, robust to the few x_T that "
                f"end as another mode). auto: {DEFAULT_GRID_CRITERION} (the energy distance for stochastic samplers).",
        "choices": ["auto", *GRID_CRITERIA]})
    objective: str = field(default=DEFAULT_OBJECTIVE, metadata={
        "help": "teacher_local, endpoint, paper (eq. 9) or paper_x0 (eq. 10).",
        "choices": list(OBJECTIVES)})
    strategy: Optional[str] = field(default=None, metadata={
        "help": "sequential, parallel or data_free (default: sequential with data, else data_free).",
        "choices": list(STRATEGIES)})
    optimizer: str = field(default=DEFAULT_OPTIMIZER, metadata={
        "help": "local_search (derivative-free), adam (the reference code's Adam) or adam_joint.",
        "choices": list(OPTIMIZERS)})
    adam_steps: Optional[int] = field(default=None, metadata={
        "help": "Adam mini-batches per step (default: the optimizer's, 500 as in the reference code)."})
    guidance_scale: float = field(default=1.0, metadata={
        "help": "Classifier-free guidance scale (SD3: the pipeline's guidance_scale; Flux: its true_cfg_scale, with "
                "a negative prompt; Flux2 has none: 1.0)."})
    embedded_guidance_scale: Optional[float] = field(default=None, metadata={
        "help": "A guidance-distilled Flux / Flux2 transformer (guidance_embeds=True, FLUX.1-dev / FLUX.2-dev): the "
                "value its guidance embedding gets, the pipeline's guidance_scale (default 3.5 for FluxPipeline, 4.0 "
                "for Flux2Pipeline, there and here); not classifier-free guidance. Sample with the same value."})
    num_samples: int = field(default=64, metadata={"help": "Calibration samples."})
    batch_size: int = field(default=64, metadata={"help": "Samples per network call and process."})
    num_validation_samples: Optional[int] = field(default=32, metadata={"help": "Samples of the validation guard."})
    num_heldout_samples: int = field(default=64, metadata={"help": "Held-out x_T the report is computed on."})
    teacher: str = field(default="dpmsolver++", metadata={
        "help": "The reference every objective, the guard and the held-out verdict measure against: dpmsolver++ "
                "(DPM-Solver++ 2M on a fine grid, computed once per calibration set; its own error is reported) or "
                "same (the calibrated sampler itself at about 5 n steps; required for the grid modes: dpmsolver++).",
        "choices": ["dpmsolver++", "same"]})
    teacher_steps: Optional[int] = field(default=None, metadata={
        "help": "Teacher step count (dpmsolver++: default 100; same: about 5 n)."})
    guard: bool = field(default=True, metadata={
        "help": "Keep only the tuned prefix that beats untuned on the validation set (--no_guard: the full table)."})
    guard_margin: float = field(default=2.0, metadata={
        "help": "Keep tuned steps only if they beat untuned on validation by more than this many standard errors "
                "(0: any improvement)."})
    validation_metric: str = field(default="auto", metadata={
        "help": "What the guard and the held-out verdict compare (auto: energy distance for stochastic samplers "
                "such as DDPM, endpoint MSE otherwise).", "choices": ["auto", *VALIDATION_METRICS]})
    eta: Optional[float] = field(default=None, metadata={"help": "DDIM's eta for the coarse sampler."})
    seed: int = field(default=0, metadata={"help": "Seeds every random draw."})

    def replace(self, **overrides) -> "CalibrationConfig":
        """A copy with ``overrides``; an unknown name is refused."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"Unknown calibration setting(s) {', '.join(unknown)}: choose from "
                             f"{', '.join(f.name for f in dataclasses.fields(self))}.")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# Sizes of the no-argument CLI run, the README's main job (the CLI applies them by default, ``--preset cpu``; ``--preset
# none`` keeps the API defaults above; raise them on a GPU): the bundled flow-matching MNIST UNet (16x16), Euler at 10
# steps, tau tuned with the default objective, against a 40-step teacher (Euler, 4 sub-steps per coarse step). Chosen
# by measurement to end with a held-out gain of more than 2 paired SE in well under 5 minutes on 2 CPU cores:
# at the former 32 / 16 / 32 sizes (8.7k model evaluations) the guard refused its table (validation -43%, 1.9 SE);
# at 128 / 128 / 128 (41k evaluations, seed 0) the held-out error fell 0.672 -> 0.411 (-39%, 3.6 paired SE); at these
# sizes (62k evaluations, 65 s of CPU time on one thread) seeds 0 / 1 / 2 gave -40.2% / -41.4% / -35.6%, 5.8 / 7.3 /
# 6.4 paired SE better.
# The eps MNIST UNet (28x28, --pretrained_model_name_or_path mnist, DDIM@10) costs about 10x as much per sample and did
# not get there within the budget: at 32 / 16 / 32 samples its guard refused the tau table (validation +6.4 +/- 3.3
# SE: worse), and so did DPM-Solver++@5 with tune="grid+tau" (grid +38 +/- 11 SE, then tau +3.8 +/- 1.7 SE); its
# per-sample endpoint error is heavy-tailed (docs/facts.md).
CPU_QUICK_PRESET: Dict[str, Any] = dict(num_samples=128, batch_size=128, num_heldout_samples=256,
                                        num_validation_samples=256, teacher_steps=40)
PRESETS: Dict[str, Dict[str, Any]] = {"cpu": CPU_QUICK_PRESET, "none": {}}
