"""Distribution of tuned schedules: push a calibration output folder to the Hub, load one back by name.

A tuned schedule is a scheduler config (the TimeTuner table tau_i per step count, keyed "<n>", plus the grid t_i it
was tuned on and its provenance) stored where diffusers expects a scheduler: `<repo>/scheduler/scheduler_config.json`.
So `TimeTuner*Scheduler.from_pretrained("ORG/NAME", subfolder="scheduler")` works as for any diffusers scheduler.

This module adds:
- `push_tuned_schedule`: one atomic Hub commit (config, report, plot, model card) from a calibration output folder;
- `load_tuned_scheduler`: bundled `tuned_schedules/` first, then a local folder, then the Hub, with a check that the
  table fits the pipeline it is put into;
- the bundled index (`tuned_schedules/README.md`) generated from the folders (`render_bundled_index`).
"""
from __future__ import annotations

import copy
import importlib
import json
import os
import re
from pathlib import Path
from typing import Any

SCHEDULER_SUBFOLDER = "scheduler"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
REPORT_NAME = "report.json"
PLOT_NAME = "calibration.png"
PROVENANCE_NAME = "PROVENANCE.md"
INDEX_NAME = "README.md"
PAPER_URL = (
    "https://openaccess.thecvf.com/content/CVPR2024/html/"
    "Xia_Towards_More_Accurate_Diffusion_Model_Acceleration_with_A_Timestep_Tuner_CVPR_2024_paper.html"
)
# Model ids the calibration records for the testbed models shipped inside this package; they are not Hub repos.
BUNDLED_MODEL_PREFIX = "diffusers-timetuner/bundled-"
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HF_CACHE_RE = re.compile(r"models--([^/\\]+?)--([^/\\]+)")


# ---------------------------------------------------------------------------------------------------------------------
# Reading a tuned config (plain JSON, no torch)
# ---------------------------------------------------------------------------------------------------------------------
def read_tuned_config(path: str | os.PathLike) -> dict:
    """Read a `scheduler_config.json` (a file or a folder holding one) and check it carries a TimeTuner table."""
    path = Path(path)
    if path.is_dir():
        path = path / SCHEDULER_CONFIG_NAME
    if not path.is_file():
        raise ValueError(
            f"No {SCHEDULER_CONFIG_NAME} at {path}: pass a calibration output folder or a scheduler folder."
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-run the calibration to rewrite it.") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object: it is not a scheduler config.")
    if not config.get("_class_name"):
        raise ValueError(f"{path} has no `_class_name`: it is not a diffusers scheduler config.")
    if not config.get("tuned_timesteps"):
        raise ValueError(
            f"{path} has no `tuned_timesteps` table: it is an untuned scheduler config. Calibrate first "
            "(timetuner-calibrate ...) and push/load the folder it writes."
        )
    return config


def _step_counts(config: dict) -> list[int]:
    return sorted(int(n) for n in config.get("tuned_timesteps") or {})


def _first_info(config: dict) -> dict:
    infos = config.get("tuning_info") or {}
    return next((infos[k] for k in sorted(infos, key=int) if isinstance(infos[k], dict)), {})


def resolve_scheduler_class(class_name: str):
    """The scheduler class named by a config's `_class_name`: TimeTuner classes first, then diffusers."""
    for module_name in ("diffusers_timetuner.schedulers", "diffusers"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        cls = getattr(module, class_name, None)
        if cls is not None:
            return cls
    raise ValueError(
        f"Unknown scheduler class {class_name!r} in the tuned config: expected a TimeTuner*Scheduler from "
        "diffusers_timetuner.schedulers (upgrade diffusers-timetuner?) or pass `scheduler_class=` explicitly."
    )


# ---------------------------------------------------------------------------------------------------------------------
# Bundled tuned_schedules/
# ---------------------------------------------------------------------------------------------------------------------
def bundled_schedules_dir() -> Path:
    """The bundled `tuned_schedules/` folder.

    Installed (wheel or editable) it is package data at `diffusers_timetuner/tuned_schedules` (in the source tree a
    symlink to the top-level `tuned_schedules/`). A source checkout whose symlink was not materialised (git on
    Windows without symlink support) falls back to the top-level folder next to `src/`.
    """
    here = Path(__file__).resolve().parent
    for candidate in (here / "tuned_schedules", here.parent.parent / "tuned_schedules"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"Bundled tuned_schedules/ not found next to {here}: the installation is incomplete (reinstall the package)."
    )


def list_bundled_schedules(root: str | os.PathLike | None = None) -> list[str]:
    """Names of bundled entries: sub-folders of `tuned_schedules/` holding a scheduler config."""
    root = Path(root) if root is not None else bundled_schedules_dir()
    return sorted(p.name for p in root.iterdir() if (p / SCHEDULER_CONFIG_NAME).is_file())


def held_out_pair(held: Any) -> tuple[str, float, float] | None:
    """(metric, untuned, tuned) from a recorded held-out measurement, or None.

    Accepts the calibration's form `{"<metric>_untuned": u, "<metric>_tuned": t, ...}` (e.g. endpoint_mse_*) and the
    explicit form `{"metric": name, "untuned": u, "tuned": t}`.
    """
    if not isinstance(held, dict):
        return None
    if "tuned" in held and "untuned" in held:
        return str(held.get("metric", "error")), float(held["untuned"]), float(held["tuned"])
    for key in sorted(held):
        if key.endswith("_untuned") and isinstance(held[key], (int, float)):
            metric = key[: -len("_untuned")]
            if isinstance(held.get(f"{metric}_tuned"), (int, float)):
                return metric, float(held[key]), float(held[f"{metric}_tuned"])
    return None


def recorded_held_out(info: dict) -> Any:
    """The held-out measurement stored in one `tuning_info[n]` (key `heldout`, or `held_out`)."""
    return info.get("heldout", info.get("held_out")) if isinstance(info, dict) else None


def worse_than_untuned(config: dict) -> list[int]:
    """Step counts whose recorded held-out error is higher with the table than without it."""
    worse = []
    for n in _step_counts(config):
        pair = held_out_pair(recorded_held_out((config.get("tuning_info") or {}).get(str(n)) or {}))
        if pair is not None and pair[2] > pair[1]:
            worse.append(n)
    return worse


def _fmt_held_out(held: Any) -> str:
    pair = held_out_pair(held)
    if pair is None:
        return "" if held is None else json.dumps(held, sort_keys=True)
    metric, untuned, tuned = pair
    change = f" ({100.0 * (tuned - untuned) / untuned:+.1f}%)" if untuned else ""
    return f"{metric}: {untuned:.4g} -> {tuned:.4g}{change}"


def render_bundled_index(root: str | os.PathLike | None = None) -> str:
    """The text of `tuned_schedules/README.md`, generated from the entry folders (so it never drifts)."""
    root = Path(root) if root is not None else bundled_schedules_dir()
    lines = [
        "# Bundled tuned schedules",
        "",
        "Generated by `python -m diffusers_timetuner.hub --write-index` from the folders below; do not edit by hand.",
        "Each folder is one (model, scheduler, step counts, guidance scale): a loadable `scheduler_config.json`",
        "and its provenance (`PROVENANCE.md` / `report.json`: command, versions, metrics). Load one with",
        "`load_tuned_scheduler(\"<name>\")`. Folder names: `<model>-<scheduler>-<steps>-g<guidance scale>`.",
        "",
        "| name | model | scheduler | steps | guidance | objective | held-out (untuned -> tuned) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in list_bundled_schedules(root):
        config = read_tuned_config(root / name)
        info = _first_info(config)
        held = "; ".join(
            f"n={n}: {_fmt_held_out(recorded_held_out((config.get('tuning_info') or {}).get(str(n), {})))}"
            for n in _step_counts(config)
        )
        lines.append(
            f"| `{name}` | {info.get('model_id', '?')} | {config['_class_name']} | "
            f"{', '.join(map(str, _step_counts(config)))} | {info.get('guidance_scale', '?')} | "
            f"{info.get('objective', '?')} | {held} |"
        )
    if not list_bundled_schedules(root):
        lines.append("| (none yet) | | | | | | |")
    return "\n".join(lines) + "\n"


def write_bundled_index(root: str | os.PathLike | None = None) -> Path:
    root = Path(root) if root is not None else bundled_schedules_dir()
    path = root / INDEX_NAME
    path.write_text(render_bundled_index(root))
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------
def _hub_error(repo_id: str, subfolder: str, revision: str | None, err: Exception, token=None) -> Exception:
    """Turn a huggingface_hub download error into one clear message (olah answers 401 for a missing file)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision or 'main'}"
    wanted = f"{subfolder}/{SCHEDULER_CONFIG_NAME}" if subfolder else SCHEDULER_CONFIG_NAME
    if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        if constants.is_offline_mode():
            return ValueError(
                f"{where}: offline mode (HF_HUB_OFFLINE=1) and {wanted} is not in the cache "
                f"({constants.HF_HUB_CACHE}). Load it once online, or unset HF_HUB_OFFLINE."
            )
        return ConnectionError(
            f"Could not reach the Hub at {constants.ENDPOINT} to fetch {wanted} from {where}, and it is not cached. "
            "Check the network / HF_ENDPOINT, or use HF_HUB_OFFLINE=1 with a filled cache."
        )
    if isinstance(err, RevisionNotFoundError):
        return ValueError(f"{repo_id} has no revision {revision!r}: pass an existing branch, tag or commit.")
    if isinstance(err, (RepositoryNotFoundError, EntryNotFoundError)):
        # A real Hub answers 404 EntryNotFound for a missing file, olah 401 RepositoryNotFound: ask whether the repo
        # itself exists to tell the two cases apart.
        try:
            files = HfApi(token=token).list_repo_files(repo_id, revision=revision)
        except (RepositoryNotFoundError, HfHubHTTPError):
            return ValueError(
                f"Tuned schedule {repo_id!r} not found: no bundled entry, no local folder and no Hub repo of that "
                f"name (endpoint {constants.ENDPOINT}). Bundled entries: {', '.join(_safe_bundled()) or 'none'}. "
                "For a private repo log in (`huggingface-cli login`) or set HF_TOKEN."
            )
        configs = [f for f in files if f.endswith(SCHEDULER_CONFIG_NAME)]
        hint = f" It has: {', '.join(configs)}; pass subfolder= accordingly." if configs else ""
        return ValueError(f"Hub repo {where} exists but has no {wanted}.{hint}")
    return err


def _safe_bundled() -> list[str]:
    try:
        return list_bundled_schedules()
    except FileNotFoundError:
        return []


def _load_from_dir(path: Path, scheduler_class):
    config = read_tuned_config(path)
    cls = scheduler_class or resolve_scheduler_class(config["_class_name"])
    return cls.from_pretrained(str(path))


def load_tuned_scheduler(
    name_or_path: str | os.PathLike,
    scheduler_class=None,
    *,
    subfolder: str = SCHEDULER_SUBFOLDER,
    revision: str | None = None,
    pipeline=None,
    check_model_id: bool = True,
    token: str | None = None,
):
    """Load a tuned scheduler: bundled entry name, then local folder, then Hub repo id.

    Args:
        name_or_path: a bundled entry (see `list_bundled_schedules()`), a local folder (a calibration output folder
            or one holding `<subfolder>/scheduler_config.json`), or a Hub repo id "ORG/NAME".
        scheduler_class: the class to build; default: the config's `_class_name` (a TimeTuner*Scheduler).
        subfolder: where the config lives in a repo / folder (diffusers' layout: "scheduler").
        revision: Hub branch, tag or commit.
        pipeline: if given, the table's recorded model and noise schedule are checked against
            `pipeline.scheduler` (see `check_scheduler_fits_pipeline`); a mismatch raises ValueError.
        check_model_id: compare the recorded model id with the pipeline's `name_or_path` (turn off only when the
            same weights are loaded under another name, e.g. a local copy).
        token: Hub token for private repos (default: the logged-in one).

    Returns:
        The scheduler, e.g. `pipe.scheduler = load_tuned_scheduler(...)`.
    """
    name = os.fspath(name_or_path)
    bundled = _safe_bundled()
    if name in bundled:
        scheduler = _load_from_dir(bundled_schedules_dir() / name, scheduler_class)
    elif os.path.isdir(name):
        folder = Path(name)
        if subfolder and (folder / subfolder / SCHEDULER_CONFIG_NAME).is_file():
            folder = folder / subfolder
        scheduler = _load_from_dir(folder, scheduler_class)
    elif _REPO_ID_RE.match(name):
        scheduler = _load_from_hub(name, scheduler_class, subfolder=subfolder, revision=revision, token=token)
    else:
        raise ValueError(
            f"{name!r} is not a bundled tuned schedule ({', '.join(bundled) or 'none bundled'}), not an existing "
            "folder and not a Hub repo id of the form 'ORG/NAME'."
        )
    from .schedulers.mixin import TimeTunerMixin

    if not isinstance(scheduler, TimeTunerMixin):
        raise ValueError(
            f"{name!r} builds a {type(scheduler).__name__}, which is not a TimeTuner scheduler and would ignore the "
            "tau table: set `_class_name` to the matching TimeTuner*Scheduler (e.g. TimeTunerDDIMScheduler) or pass "
            "`scheduler_class=`."
        )
    if pipeline is not None:
        check_scheduler_fits_pipeline(scheduler, pipeline, check_model_id=check_model_id, source=name)
    return scheduler


def _load_from_hub(repo_id: str, scheduler_class, *, subfolder: str, revision: str | None, token: str | None):
    from huggingface_hub import hf_hub_download

    try:
        config_file = hf_hub_download(
            repo_id, SCHEDULER_CONFIG_NAME, subfolder=subfolder or None, revision=revision, token=token
        )
    except Exception as err:  # mapped to one clear message below; anything unknown is re-raised as is
        mapped = _hub_error(repo_id, subfolder, revision, err, token=token)
        if mapped is err:
            raise
        raise mapped from err
    config = read_tuned_config(config_file)
    cls = scheduler_class or resolve_scheduler_class(config["_class_name"])
    # The same call a user would write; the file is now in the cache.
    return cls.from_pretrained(repo_id, subfolder=subfolder or None, revision=revision, token=token)


def _normalise_model_id(name: str | None) -> str | None:
    if not name:
        return None
    name = str(name)
    match = _HF_CACHE_RE.search(name)  # a snapshot path inside the HF cache names its repo
    if match:
        return f"{match.group(1)}/{match.group(2)}"
    return name.rstrip("/")


def check_scheduler_fits_pipeline(scheduler, pipeline, *, check_model_id: bool = True, source: str = "tuned schedule"):
    """Raise ValueError if a tuned table was made for another model or noise schedule than `pipeline`'s.

    Checks: recorded `model_id` vs the pipeline's `name_or_path`; `num_train_timesteps`, `prediction_type` and the
    betas (via `alphas_cumprod`) vs `pipeline.scheduler`; each table's recorded grid vs the grid this scheduler
    builds for that step count.
    """
    import torch

    ref = pipeline.scheduler
    cfg = scheduler.config
    problems = []
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
        if len(built) != len(grid) or any(abs(a - float(b)) > 1e-3 for a, b in zip(built, grid)):
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


# ---------------------------------------------------------------------------------------------------------------------
# Pushing
# ---------------------------------------------------------------------------------------------------------------------
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
            held = ((report.get("step_counts") or {}).get(str(n)) or {}).get("heldout")
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


def _is_main_process(state, is_main_process: bool | None) -> bool:
    if is_main_process is not None:
        return bool(is_main_process)
    if state is not None:
        return bool(state.is_main_process)
    try:  # an accelerate run already set up: ask it; otherwise a plain single process is the main one
        from accelerate import PartialState

        if PartialState._shared_state:
            return PartialState().is_main_process
    except ImportError:
        pass
    return os.environ.get("RANK", "0") == "0"


def check_can_push(repo_id: str, token: str | None = None) -> str:
    """Check a push could start (repo id form, a token available) without any network call; returns the token.

    A calibration script calls this before calibrating, so a missing login fails in seconds, not after the run.
    """
    if not isinstance(repo_id, str) or not _REPO_ID_RE.match(repo_id):
        raise ValueError(f"repo_id must look like 'ORG/NAME', got {repo_id!r}.")
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise ValueError(
            "No Hugging Face token: pushing needs one. Run `huggingface-cli login` (or `hf auth login`), set the "
            "HF_TOKEN environment variable, or pass token=."
        )
    return token


def push_tuned_schedule(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    base_model: str | None = None,
    state=None,
    is_main_process: bool | None = None,
    allow_worse: bool = False,
):
    """Upload a calibration output folder to the Hub in ONE commit.

    Files: `scheduler/scheduler_config.json` (so `from_pretrained(repo, subfolder="scheduler")` works), `report.json`
    and `calibration.png` when present, and `README.md` (model card: library_name diffusers, tags timetuner /
    scheduler, base_model when known, table, settings, held-out improvement, usage snippet).

    Failure policy: the upload is one `create_commit`, so the repo either gets every file or none. If this call
    created the repo and the commit then fails, the (empty) repo is left in place, never deleted, and the error says
    so (deleting repos is not something an upload helper should do on its own).

    Args:
        output_dir: folder written by the calibration (`scheduler_config.json` required; report and plot optional).
        repo_id: "ORG/NAME".
        private: create the repo private (an existing repo keeps its visibility).
        revision: branch to commit to; created from `main` if missing. Default `main`.
        commit_message: default "Upload TimeTuner schedule (<class>, <steps> steps)".
        token: Hub token; default the logged-in one (`huggingface-cli login` or `HF_TOKEN`).
        base_model: Hub id of the model the table was tuned for (default: the recorded model id when it is a Hub id;
            "" to omit).
        state / is_main_process: an `accelerate.PartialState` (or Accelerator), or a flag; only the main process
            uploads, the others return None.
        allow_worse: publish even if a recorded held-out error is worse tuned than untuned (refused by default:
            a table worse than no table should not be shared).

    Returns:
        `huggingface_hub.CommitInfo` of the commit (None on non-main processes).
    """
    output_dir = Path(output_dir)
    if not _is_main_process(state, is_main_process):
        return None
    config = read_tuned_config(output_dir)  # local checks first: bad folders never reach the network
    token = check_can_push(repo_id, token)
    worse = worse_than_untuned(config)
    if worse and not allow_worse:
        raise ValueError(
            f"{output_dir}: the recorded held-out error is worse tuned than untuned for {worse} steps; not pushing "
            "a table that is worse than no table. Re-calibrate (more samples, another objective) or pass "
            "allow_worse=True to publish it anyway."
        )

    from huggingface_hub import CommitOperationAdd, HfApi

    card = build_model_card(output_dir, repo_id, base_model=base_model)
    operations = [
        CommitOperationAdd(f"{SCHEDULER_SUBFOLDER}/{SCHEDULER_CONFIG_NAME}", str(output_dir / SCHEDULER_CONFIG_NAME)),
        CommitOperationAdd("README.md", str(card).encode()),
    ]
    for optional in (REPORT_NAME, PLOT_NAME):
        if (output_dir / optional).is_file():
            operations.append(CommitOperationAdd(optional, str(output_dir / optional)))
    steps = ", ".join(map(str, _step_counts(config)))
    message = commit_message or f"Upload TimeTuner schedule ({config['_class_name']}, {steps} steps)"

    api = HfApi(token=token)
    created = False
    try:
        card.validate()  # the Hub's metadata check (/api/validate-yaml) before anything is created
        existed = api.repo_exists(repo_id)
        api.create_repo(repo_id, private=private, exist_ok=True)
        created = not existed
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.create_commit(repo_id, operations, commit_message=message, revision=revision)
    except Exception as err:
        left = (
            f"The repo {repo_id} was created by this call and is left empty (only its initial commit); delete it "
            "on the Hub if you do not retry." if created else f"The repo {repo_id} is unchanged."
        )
        summary = f"Push of {output_dir} to {repo_id} failed, nothing was uploaded. {left}"
        if isinstance(err, _transport_errors()):
            raise ConnectionError(
                f"Could not reach the Hub at {api.endpoint} (check the network / HF_ENDPOINT). {summary}"
            ) from err
        raise RuntimeError(f"{summary} Cause: {err}") from err


def _transport_errors() -> tuple:
    """Connection-level errors of the HTTP client huggingface_hub uses (httpx2 in 2.x, httpx in 1.x)."""
    errors = [ConnectionError]
    for module_name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module_name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Maintain the bundled tuned_schedules/ index.")
    parser.add_argument("--write-index", action="store_true", help="rewrite tuned_schedules/README.md")
    args = parser.parse_args(argv)
    if args.write_index:
        print(write_bundled_index())
    else:
        print(render_bundled_index(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
