"""The issue's full round trip: calibrate (the real calibration API, tiny settings) -> push (upload test double) ->
pull (real olah) -> identical sampling output."""
import os

import pytest
import torch
from hub_server.fixtures import hub_env, hub_servers  # noqa: F401  (pytest fixtures)
from hub_server.outputs import MODEL_ID, sample, tiny_pipeline

from diffusers_timetuner.calibration import calibrate
from diffusers_timetuner.hub import load_tuned_scheduler, push_tuned_schedule, worse_than_untuned

pytestmark = [
    pytest.mark.hub,
    pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated:UserWarning"),
]


def test_calibrate_push_pull_identical_sampling(hub_servers, hub_env, tmp_path):
    """covers: CalibrationResult.save -> push_tuned_schedule (create_repo, create_commit; upload double) ->
    load_tuned_scheduler(repo, pipeline=...) (hf_hub_download + from_pretrained; olah)."""
    pipe = tiny_pipeline()
    result = calibrate(pipe, "ddim", num_inference_steps=3, num_samples=8, batch_size=8, num_validation_samples=8,
                       num_heldout_samples=8, teacher_steps=12, progress=False, model_id=MODEL_ID)
    out = str(tmp_path / "calibrated")
    result.save(out)
    assert sorted(os.listdir(out)) == ["calibration.png", "report.json", "scheduler_config.json"]

    hub_env.use(hub_servers.upload.url)
    hub_env.login()
    # a random tiny UNet gives no guarantee the table helps; publishing it is what is tested here
    push_tuned_schedule(out, "tt-org/calibrated", allow_worse=bool(worse_than_untuned(result.scheduler.config)))

    hub_env.use(hub_servers.olah.url)
    pulled = load_tuned_scheduler("tt-org/calibrated", pipeline=tiny_pipeline())
    assert pulled.config.tuned_timesteps == result.scheduler.config.tuned_timesteps
    reference = sample(tiny_pipeline(), result.scheduler, num_inference_steps=3)
    assert torch.equal(sample(tiny_pipeline(), pulled, num_inference_steps=3), reference)
