"""Distribution of tuned schedules: push a calibration output folder to the Hub, load one back by name.

A tuned schedule is a scheduler config (the TimeTuner table tau_i per step count, keyed "<n>", plus the grid t_i it
was tuned on and its provenance) stored where diffusers expects a scheduler: `<repo>/scheduler/scheduler_config.json`.
So `TimeTuner*Scheduler.from_pretrained("ORG/NAME", subfolder="scheduler")` works as for any diffusers scheduler.

One module per job:
- `config`: reading a tuned config and its recorded held-out measurement (plain JSON, no torch);
- `bundled`: the bundled `tuned_schedules/` folder and its generated index (`python -m diffusers_timetuner.hub`);
- `loading`: `load_tuned_scheduler` (bundled entry, then local folder, then Hub), Hub errors mapped to clear ones;
- `fit`: `check_scheduler_fits_pipeline`, the check that a table fits the pipeline it is put into;
- `model_card`: the README.md pushed with a table;
- `push`: `push_tuned_schedule` (one atomic commit) and `check_can_push`.
"""
from .bundled import bundled_schedules_dir, list_bundled_schedules, render_bundled_index, write_bundled_index
from .config import (
    BUNDLED_MODEL_PREFIX,
    INDEX_NAME,
    PAPER_URL,
    PLOT_NAME,
    PROVENANCE_NAME,
    REPORT_NAME,
    SCHEDULER_CONFIG_NAME,
    SCHEDULER_SUBFOLDER,
    read_tuned_config,
    recorded_held_out,
    resolve_scheduler_class,
    worse_than_untuned,
)
from .fit import check_scheduler_fits_pipeline
from .loading import load_tuned_scheduler
from .model_card import build_model_card
from .push import check_can_push, push_tuned_schedule

__all__ = [
    "BUNDLED_MODEL_PREFIX",
    "INDEX_NAME",
    "PAPER_URL",
    "PLOT_NAME",
    "PROVENANCE_NAME",
    "REPORT_NAME",
    "SCHEDULER_CONFIG_NAME",
    "SCHEDULER_SUBFOLDER",
    "build_model_card",
    "bundled_schedules_dir",
    "check_can_push",
    "check_scheduler_fits_pipeline",
    "list_bundled_schedules",
    "load_tuned_scheduler",
    "push_tuned_schedule",
    "read_tuned_config",
    "recorded_held_out",
    "render_bundled_index",
    "resolve_scheduler_class",
    "worse_than_untuned",
    "write_bundled_index",
]
