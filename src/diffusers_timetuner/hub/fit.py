"""Does a tuned table fit the pipeline it is put into (same model, noise schedule and grids)?"""
from __future__ import annotations

import copy

from ..table import timesteps_close
from .config import _HF_CACHE_RE


def _normalise_model_id(name: str | None) -> str | None:
    if not name:
        return None
    name = str(name)
    match = _HF_CACHE_RE.search(name)  # a snapshot path inside the HF cache names its repo
    if match:
        return f"{match.group(1)}/{match.group(2)}"
    return name.rstrip("/")


# The keys that set a flow-matching scheduler's time shift, i.e. its grid of sigmas.
FLOW_SHIFT_KEYS = ("shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
                   "max_image_seq_len", "time_shift_type", "shift_terminal")


def _is_flow_matching(scheduler) -> bool:
    cfg = scheduler.config
    return ("FlowMatch" in type(scheduler).__name__ or bool(cfg.get("use_flow_sigmas", False))
            or cfg.get("prediction_type") == "flow_prediction")


def check_scheduler_fits_pipeline(scheduler, pipeline, *, check_model_id: bool = True, source: str = "tuned schedule"):
    """Raise ValueError if a tuned table was made for another model or noise schedule than `pipeline`'s.

    Checks: recorded `model_id` vs the pipeline's `name_or_path`; the sampler family (flow matching vs a VP noise
    schedule), `num_train_timesteps`, `prediction_type`, the betas (via `alphas_cumprod`) and a flow-matching time
    shift (`FLOW_SHIFT_KEYS`) vs `pipeline.scheduler`; each table's recorded grid vs the grid this scheduler
    builds for that step count.
    """
    import torch

    ref = pipeline.scheduler
    cfg = scheduler.config
    problems = []
    if _is_flow_matching(scheduler) != _is_flow_matching(ref):
        kind = lambda s: "flow matching (sigmas)" if _is_flow_matching(s) else "a VP noise schedule (betas)"  # noqa
        problems.append(f"sampler family: the table's {type(scheduler).__name__} uses {kind(scheduler)}, the "
                        f"pipeline's {type(ref).__name__} {kind(ref)}")
    elif _is_flow_matching(scheduler):
        for key in FLOW_SHIFT_KEYS:
            if key in ref.config and key in cfg and ref.config[key] != cfg[key]:
                problems.append(f"{key}: table {cfg[key]!r}, pipeline {ref.config[key]!r}")
    for key in ("num_train_timesteps", "prediction_type"):
        if key in ref.config and key in cfg and ref.config[key] != cfg[key]:
            problems.append(f"{key}: table {cfg[key]!r}, pipeline {ref.config[key]!r}")
    a_tab, a_ref = getattr(scheduler, "alphas_cumprod", None), getattr(ref, "alphas_cumprod", None)
    if a_tab is not None and a_ref is not None and not problems:
        if a_tab.shape != a_ref.shape or not torch.allclose(a_tab.double(), a_ref.double(), rtol=1e-5, atol=1e-7):
            problems.append(
                "betas: the table's noise schedule "
                f"({cfg.get('beta_schedule')}, {cfg.get('beta_start')}..{cfg.get('beta_end')}) differs from the "
                f"pipeline's ({ref.config.get('beta_schedule')}, {ref.config.get('beta_start')}.."
                f"{ref.config.get('beta_end')})"
            )
    for n, grid in sorted((cfg.get("tuned_grids") or {}).items(), key=lambda kv: int(kv[0])):
        probe = copy.deepcopy(scheduler)
        try:
            probe.set_timesteps(int(n))
        except ValueError as err:
            problems.append(f"grid for {n} steps: {err}")
            continue
        built = getattr(probe, "grid_timesteps", probe.timesteps)
        built = [float(t) for t in built]
        if len(built) != len(grid) or not all(timesteps_close(a, float(b)) for a, b in zip(built, grid)):
            problems.append(f"grid for {n} steps: tuned on {list(grid)}, this scheduler builds {built}")
    if check_model_id:
        recorded = {_normalise_model_id(i.get("model_id")) for i in (cfg.get("tuning_info") or {}).values()
                    if isinstance(i, dict) and i.get("model_id")}
        target = _normalise_model_id(getattr(pipeline, "name_or_path", None) or pipeline.config.get("_name_or_path"))
        if recorded and target and target not in recorded:
            problems.append(
                f"model: tuned for {', '.join(sorted(recorded))}, pipeline is {target} (pass check_model_id=False if "
                "these are the same weights under another name)"
            )
    if problems:
        raise ValueError(
            f"{source} does not fit this pipeline:\n  - " + "\n  - ".join(problems)
            + "\nA TimeTuner table is only valid for the model and noise schedule it was calibrated on: calibrate "
            "for this pipeline (timetuner-calibrate) or pick a matching entry."
        )
