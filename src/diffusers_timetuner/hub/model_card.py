"""The model card (README.md with YAML metadata) pushed with a tuned schedule."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..table import HeldOutResult
from .config import (
    _REPO_ID_RE,
    BUNDLED_MODEL_PREFIX,
    PAPER_URL,
    REPORT_NAME,
    _first_info,
    _fmt_held_out,
    _step_counts,
    read_tuned_config,
    recorded_held_out,
)


def _table_markdown(config: dict) -> str:
    out = []
    for n in _step_counts(config):
        taus = config["tuned_timesteps"][str(n)]
        grid = (config.get("tuned_grids") or {}).get(str(n))
        out += [f"**{n} steps**", "", "| i | grid t_i | tuned tau_i | tau_i / t_i |", "|---|---|---|---|"]
        for i, tau in enumerate(taus):
            t = grid[i] if grid is not None and i < len(grid) else None
            ratio = f"{float(tau) / float(t):.4f}" if t not in (None, 0) else ""
            out.append(f"| {i} | {'' if t is None else t} | {float(tau):.4f} | {ratio} |")
        out.append("")
    return "\n".join(out)


def _settings_markdown(config: dict, report: dict) -> str:
    settings = dict(report.get("settings") or {})
    if not settings:
        settings = {k: v for k, v in _first_info(config).items() if not isinstance(v, (dict, list))}
    rows = [f"| {k} | `{json.dumps(v) if not isinstance(v, str) else v}` |" for k, v in sorted(settings.items())]
    return "\n".join(["| setting | value |", "|---|---|", *rows]) if rows else "(no settings recorded)"


def _held_out_markdown(config: dict, report: dict) -> str:
    rows = []
    for n in _step_counts(config):
        held = recorded_held_out((config.get("tuning_info") or {}).get(str(n)) or {})
        if held is None:  # the calibration report's per-step-count section
            held = HeldOutResult.from_json(((report.get("step_counts") or {}).get(str(n)) or {}).get("heldout"))
        if held is not None:
            rows.append(f"| {n} | {_fmt_held_out(held)} |")
    if not rows:
        return "(no held-out measurement recorded)"
    return "\n".join(["| steps | held-out error, untuned -> tuned |", "|---|---|", *rows])


def build_model_card(output_dir: str | os.PathLike, repo_id: str, *, base_model: str | None = None):
    """The model card (README.md with YAML metadata) for a calibration output folder."""
    from huggingface_hub import ModelCard, ModelCardData

    output_dir = Path(output_dir)
    config = read_tuned_config(output_dir)
    report_path = output_dir / REPORT_NAME
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    info = _first_info(config)
    if base_model is None:  # inferred only from a recorded Hub id; base_model="" omits it
        recorded = info.get("model_id") or (report.get("settings") or {}).get("model_id")
        base_model = str(recorded) if recorded and _is_hub_model_id(str(recorded)) else None
    elif base_model and not _is_hub_model_id(base_model):
        raise ValueError(
            f"base_model={base_model!r} is not a Hub model id (a local path, or a model bundled with this package): "
            "the Hub rejects such a card. Pass the Hub id the weights came from, or base_model='' to omit it."
        )
    card_data = ModelCardData(
        library_name="diffusers", tags=["timetuner", "scheduler"], base_model=base_model or None
    )
    cls = config["_class_name"]
    steps = ", ".join(map(str, _step_counts(config)))
    body = f"""
# TimeTuner schedule: {cls}, {steps} steps{f' for {base_model}' if base_model else ''}

Tuned timesteps for [TimeTuner]({PAPER_URL})
(Xia et al., CVPR 2024): the solver keeps its grid t_i, the network is fed a tuned timestep tau_i at each step.
Made with [diffusers-timetuner](https://pypi.org/project/diffusers-timetuner/). Valid only for the model and noise
schedule it was calibrated on (model: `{info.get('model_id', 'unknown')}`, guidance scale
{info.get('guidance_scale', 'unknown')}).

## Usage

```python
from diffusers_timetuner.schedulers import {cls}
pipe.scheduler = {cls}.from_pretrained("{repo_id}", subfolder="scheduler")
```

Then call the pipeline with `num_inference_steps` in ({steps}): the step counts this repo has a table for.

## Measured held-out improvement

{_held_out_markdown(config, report)}

## Tuned table

{_table_markdown(config)}
## Calibration settings

{_settings_markdown(config, report)}
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


def _is_hub_model_id(name: str) -> bool:
    """'ORG/NAME', not an existing local path and not one of this package's bundled (non-Hub) testbed models."""
    return bool(_REPO_ID_RE.match(name)) and not os.path.exists(name) and not name.startswith(BUNDLED_MODEL_PREFIX)
