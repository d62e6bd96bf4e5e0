"""`load_tuned_scheduler`: a bundled entry, a local folder or a Hub repo, with Hub errors mapped to clear ones."""
from __future__ import annotations

import os
from pathlib import Path

from .bundled import _safe_bundled, bundled_schedules_dir
from .config import _REPO_ID_RE, SCHEDULER_CONFIG_NAME, SCHEDULER_SUBFOLDER, read_tuned_config, resolve_scheduler_class
from ..schedulers.mixin import TimeTunerMixin
from .fit import check_scheduler_fits_pipeline


def _hub_error(repo_id: str, subfolder: str, revision: str | None, err: Exception, token=None) -> Exception:
    """Turn a huggingface_hub download error into one clear message; anything else is returned unchanged."""
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
    if isinstance(err, RepositoryNotFoundError):
        return ValueError(
            f"Tuned schedule {repo_id!r} not found: no bundled entry, no local folder and no Hub repo of that "
            f"name (endpoint {constants.ENDPOINT}). Bundled entries: {', '.join(_safe_bundled()) or 'none'}. "
            "For a private repo log in (`huggingface-cli login`) or set HF_TOKEN."
        )
    if isinstance(err, EntryNotFoundError):
        try:  # the repo exists: name the configs it does have
            files = HfApi(token=token).list_repo_files(repo_id, revision=revision)
        except HfHubHTTPError:
            files = []
        configs = [f for f in files if f.endswith(SCHEDULER_CONFIG_NAME)]
        hint = f" It has: {', '.join(configs)}; pass subfolder= accordingly." if configs else ""
        return ValueError(f"Hub repo {where} exists but has no {wanted}.{hint}")
    return err


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
