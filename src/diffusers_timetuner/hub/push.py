"""`push_tuned_schedule`: one atomic Hub commit from a calibration output folder; `check_can_push` before it."""
from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub.utils import HFValidationError, validate_repo_id

# The HTTP client huggingface_hub (>= 2) is built on: its TransportError is what a connection failure raises.
import httpx2

from .config import (
    _REPO_ID_RE,
    PLOT_NAME,
    REPORT_NAME,
    SCHEDULER_CONFIG_NAME,
    SCHEDULER_SUBFOLDER,
    _step_counts,
    read_tuned_config,
    worse_than_untuned,
)
from .model_card import build_model_card


def _is_main_process(state, is_main_process: bool | None) -> bool:
    """The explicit flag, else the given state's, else accelerate's view of this process."""
    if is_main_process is not None:
        return bool(is_main_process)
    if state is None:
        from accelerate import PartialState

        state = PartialState()
    return bool(state.is_main_process)


def check_can_push(repo_id: str, token: str | None = None) -> str:
    """Check a push could start (repo id form, a token available) without any network call; returns the token.

    A calibration script calls this before calibrating, so a missing login fails in seconds, not after the run.
    """
    if not isinstance(repo_id, str) or not _REPO_ID_RE.match(repo_id):
        raise ValueError(f"repo_id must look like 'ORG/NAME', got {repo_id!r}.")
    try:  # the Hub's own rules: no '..', no trailing newline, at most 96 characters, ...
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"repo_id {repo_id!r} is not a valid Hub repo id: {err}") from None
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
        if isinstance(err, (ConnectionError, httpx2.TransportError)):
            raise ConnectionError(
                f"Could not reach the Hub at {api.endpoint} (check the network / HF_ENDPOINT). {summary}"
            ) from err
        raise RuntimeError(f"{summary} Cause: {err}") from err
