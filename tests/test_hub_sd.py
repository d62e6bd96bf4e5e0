"""The README's Stable Diffusion snippets, run as written on a tiny offline StableDiffusionPipeline: publish with
`push_tuned_schedule` (upload test double), then `pipe.scheduler = TimeTunerDDIMScheduler.from_pretrained(repo,
subfolder="scheduler")` and `load_tuned_scheduler(repo, pipeline=pipe)` through a real olah."""
import pytest
import torch
from hub_server.fixtures import hub_env, hub_servers  # noqa: F401  (pytest fixtures)
from hub_server.outputs import SD_MODEL_ID, make_calibration_output, tiny_stable_diffusion, tuned_sd_scheduler

from diffusers_timetuner.hub import load_tuned_scheduler, push_tuned_schedule
from diffusers_timetuner.schedulers import TimeTunerDDIMScheduler

pytestmark = [
    pytest.mark.hub,
    pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated:UserWarning"),
]


def _images(pipe):
    out = pipe("w1 w2 w3", num_inference_steps=3, guidance_scale=5.0, height=16, width=16, output_type="np",
               generator=torch.Generator().manual_seed(0))
    return torch.from_numpy(out.images)


def test_readme_stable_diffusion_snippets(hub_servers, hub_env, tmp_path):
    local = tuned_sd_scheduler()
    out = make_calibration_output(str(tmp_path / "out"), local, report=False)
    repo_id = "tt-org/tiny-sd-ddim-3"

    # "Publish your own"
    hub_env.use(hub_servers.upload.url)
    hub_env.login()
    push_tuned_schedule(out, repo_id, base_model=SD_MODEL_ID)

    # "Use a tuned schedule"
    hub_env.use(hub_servers.olah.url)
    pipe = tiny_stable_diffusion()
    pipe.scheduler = TimeTunerDDIMScheduler.from_pretrained(repo_id, subfolder="scheduler")
    pulled = _images(pipe)
    pipe.scheduler = load_tuned_scheduler(repo_id, pipeline=tiny_stable_diffusion())
    checked = _images(pipe)

    pipe.scheduler = local
    assert torch.equal(pulled, _images(pipe))
    assert torch.equal(checked, pulled)
    pipe.scheduler = TimeTunerDDIMScheduler.from_config(
        {**local.config, "tuned_timesteps": None, "tuned_grids": None, "tuning_info": None})
    assert not torch.allclose(_images(pipe), pulled)  # the table changes the images

    with pytest.raises(ValueError, match="betas"):  # an SD table refused by a pipeline with another noise schedule
        from hub_server.outputs import tiny_pipeline

        load_tuned_scheduler(repo_id, pipeline=tiny_pipeline(SD_MODEL_ID))
