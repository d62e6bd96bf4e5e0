"""TimeTuner consistency-model sampler against `CMStochasticIterativeScheduler` at 1-2 steps, and the pipeline."""
import numpy as np
import pytest
import torch
from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, UNet2DModel

from diffusers_timetuner import TimeTunerCMStochasticIterativeScheduler
from test_pipelines import TimestepSpy

CM = TimeTunerCMStochasticIterativeScheduler


def fake_model(x, t):
    t = torch.as_tensor(t, dtype=torch.float64)
    return (0.3 * x * torch.cos(t / 300.0) + 0.1 * torch.sin(t / 70.0 + x)).to(x.dtype)


def t_free_model(x, t):
    return 0.3 * x + 0.1 * torch.sin(x)


def sample(sched, n=None, *, timesteps=None, model=fake_model, spy=None):
    sched.set_timesteps(n, timesteps=timesteps)
    x = torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
    g = torch.Generator().manual_seed(1)
    for t in sched.timesteps:
        if spy is not None:
            spy.append(float(t))
        x = sched.step(model(sched.scale_model_input(x, t), t), t, x, generator=g).prev_sample
    return x


def grid(n=None, timesteps=None, **config):
    parent = CMStochasticIterativeScheduler(**config)
    parent.set_timesteps(n, timesteps=timesteps)
    return parent.timesteps.tolist()


CASES = [(dict(n=1), {}), (dict(n=2), {}), (dict(timesteps=[22, 0]), {}), (dict(n=2), dict(clip_denoised=False)),
         (dict(n=2), dict(sigma_max=40.0, rho=5.0))]


@pytest.mark.parametrize("steps,config", CASES)
def test_untuned_and_identity_are_the_parent(steps, config):
    ref = sample(CMStochasticIterativeScheduler(**config), **steps)
    assert torch.equal(sample(CM(**config), **steps), ref)
    g = grid(**steps, **config)
    n = len(g)
    ident = CM(**config, tuned_timesteps={n: g}, tuned_grids={n: g})
    assert torch.equal(sample(ident, **steps), ref) and ident.is_tuned
    taus = [t - 7.5 for t in g]  # 250 log sigma units: sigma * exp(-0.03)
    sched = CM(**config, tuned_timesteps={n: taus})
    seen = []
    assert not torch.allclose(sample(sched, **steps, spy=seen), ref)
    assert seen == taus  # float64, as the parent's timesteps
    assert torch.equal(sample(sched, **steps, model=t_free_model),
                       sample(CMStochasticIterativeScheduler(**config), **steps, model=t_free_model))


def test_round_trip_and_errors(tmp_path):
    taus = [t - 7.5 for t in grid(2, sigma_max=40.0)]
    sched = CM(sigma_max=40.0, tuned_timesteps={2: taus}, tuning_info={2: {"objective": "test"}})
    sched.save_pretrained(tmp_path)
    for again in (CM.from_pretrained(tmp_path), CM.from_config(sched.config)):
        assert again.config.sigma_max == 40.0 and again.config.tuned_timesteps == {"2": taus}
        assert {k for k in CMStochasticIterativeScheduler().config if not k.startswith("_")} <= set(again.config)
    with pytest.raises(ValueError, match=r"num_inference_steps \[2\], not for 1"):
        sched.set_timesteps(1)
    with pytest.raises(ValueError, match="negative values"):  # 3 steps reach sigma < 1, i.e. t < 0
        CM(tuned_timesteps={3: grid(3)})
    sched.set_timesteps(2)
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="is not one of"):
        sched.step(x, torch.tensor(500.0, dtype=torch.float64), x)


@pytest.mark.parametrize("steps", [dict(num_inference_steps=1), dict(num_inference_steps=2),
                                   dict(num_inference_steps=None, timesteps=[22, 0])])
def test_consistency_model_pipeline_unet_receives_tau(steps):
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    ).eval()
    g = grid(steps["num_inference_steps"], steps.get("timesteps"))
    n = len(g)
    taus = [t - 7.5 for t in g]

    def run(sched):
        pipe = ConsistencyModelPipeline(unet=unet, scheduler=sched)
        pipe.set_progress_bar_config(disable=True)
        return pipe(batch_size=1, generator=torch.Generator().manual_seed(0), output_type="np", **steps).images

    spy = TimestepSpy(unet)
    tuned = run(CM(tuned_timesteps={n: taus}))
    assert spy.timesteps().tolist() == taus
    untuned = run(CMStochasticIterativeScheduler())
    assert not np.array_equal(tuned, untuned)
    assert np.array_equal(run(CM(tuned_timesteps={n: g})), untuned)
