"""SD3 / Flux / Flux2 pipelines with the TimeTuner flow-matching Euler scheduler and SD with UniPC, offline, built
from tiny random components (text embeddings passed directly, so no tokenizer or text encoder files are needed).

A forward pre-hook records the timestep each network call receives: SD3 passes `scheduler.timesteps` as they are,
Flux and Flux2 pass them divided by 1000, so the spy must see tau (resp. tau / 1000). An identity table reproduces
the untuned pipeline bit-for-bit and a shifted table changes the image.
"""
import numpy as np
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    Flux2Pipeline,
    FluxImg2ImgPipeline,
    FluxPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

from diffusers_timetuner import (
    TimeTunerFlowMatchEulerDiscreteScheduler,
    TimeTunerHeunDiscreteScheduler,
    TimeTunerUniPCMultistepScheduler,
)
from diffusers_timetuner.testbeds.tiny_pipelines import flux2_parts, flux_parts, sd3_parts
from test_pipelines import SD_CONFIG, TimestepSpy, sd_components, vae  # noqa: F401  (fixtures)

FM = TimeTunerFlowMatchEulerDiscreteScheduler


def gen():
    return torch.Generator().manual_seed(0)


def shifted(values, d=2.5, top=1000):
    return [t + d if t + d <= top else t - d for t in values]


@pytest.fixture(scope="module")
def sd3():
    return sd3_parts("tiny")


@pytest.fixture(scope="module")
def flux():
    return flux_parts("tiny")


def make(cls, comps, scheduler):
    pipe = cls(**comps, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def grid_and_mu(pipe, run):
    """Run the pipeline once untuned with a table-less TimeTuner scheduler; return its grid and the mu it got."""
    run(pipe)
    return pipe.scheduler.timesteps.tolist(), pipe.scheduler._mu


# (scheduler config, pipeline kwargs): SD3 3.5-style static shift, and SD3 with a dynamic shift
SD3_CASES = [
    (dict(shift=3.0), dict(guidance_scale=5.0)),
    (dict(shift=3.0), dict(guidance_scale=1.0)),
    (dict(use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256), dict(guidance_scale=5.0)),
]


@pytest.mark.parametrize("config,kw", SD3_CASES)
def test_sd3_transformer_receives_tau(sd3, config, kw):
    comps, embeds = sd3
    n = 3
    kw = dict(kw, num_inference_steps=n, height=16, width=16, output_type="np", **embeds)
    run = lambda p: p(generator=gen(), **kw).images  # noqa: E731
    grid, mu = grid_and_mu(make(StableDiffusion3Pipeline, comps, FM(**config)), run)
    assert (mu is not None) == bool(config.get("use_dynamic_shifting"))
    taus = shifted(grid)
    record = FM(**config).time_shift_record(mu)
    sched = FM(**config, tuned_timesteps={n: taus}, tuned_grids={n: grid}, tuning_info={n: {"time_shift": record}})
    spy = TimestepSpy(comps["transformer"])
    tuned = run(make(StableDiffusion3Pipeline, comps, sched))
    assert torch.equal(spy.timesteps(), torch.tensor(taus, dtype=torch.float32))
    untuned = run(make(StableDiffusion3Pipeline, comps, FlowMatchEulerDiscreteScheduler(**config)))
    assert not np.array_equal(tuned, untuned)
    ident = FM(**config, tuned_timesteps={n: grid})
    assert np.array_equal(run(make(StableDiffusion3Pipeline, comps, ident)), untuned)


def test_sd3_img2img_transformer_receives_tau(sd3):
    comps, embeds = sd3
    n, strength = 4, 0.75
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    kw = dict(image=image, strength=strength, num_inference_steps=n, guidance_scale=5.0, output_type="np", **embeds)
    run = lambda p: p(generator=gen(), **kw).images  # noqa: E731
    parent = FlowMatchEulerDiscreteScheduler(shift=3.0)
    parent.set_timesteps(n)
    taus = shifted(parent.timesteps.tolist())
    spy = TimestepSpy(comps["transformer"])
    tuned = run(make(StableDiffusion3Img2ImgPipeline, comps, FM(shift=3.0, tuned_timesteps={n: taus})))
    # strength 0.75 of 4 steps: the last 3 evaluations
    assert torch.equal(spy.timesteps(), torch.tensor(taus[1:], dtype=torch.float32))
    untuned = run(make(StableDiffusion3Img2ImgPipeline, comps, FlowMatchEulerDiscreteScheduler(shift=3.0)))
    assert not np.array_equal(tuned, untuned)
    ident = FM(shift=3.0, tuned_timesteps={n: parent.timesteps.tolist()})
    assert np.array_equal(run(make(StableDiffusion3Img2ImgPipeline, comps, ident)), untuned)


# Flux's scheduler config (dynamic shift from the image sequence length); Flux passes custom sigmas and mu
FLUX_CONFIG = dict(use_dynamic_shifting=True, shift=3.0, base_image_seq_len=256, max_image_seq_len=4096,
                   base_shift=0.5, max_shift=1.15)


@pytest.mark.parametrize("true_cfg_scale", [1.0, 2.0], ids=["no_cfg", "true_cfg"])
def test_flux_transformer_receives_tau_over_1000(flux, true_cfg_scale):
    comps, embeds = flux
    n = 3
    kw = dict(num_inference_steps=n, height=16, width=16, true_cfg_scale=true_cfg_scale, output_type="np", **embeds)
    run = lambda p: p(generator=gen(), **kw).images  # noqa: E731
    grid, mu = grid_and_mu(make(FluxPipeline, comps, FM(**FLUX_CONFIG)), run)
    assert mu is not None
    taus = shifted(grid)
    info = {n: {"time_shift": FM(**FLUX_CONFIG).time_shift_record(mu)}}
    sched = FM(**FLUX_CONFIG, tuned_timesteps={n: taus}, tuned_grids={n: grid}, tuning_info=info)
    spy = TimestepSpy(comps["transformer"])
    tuned = run(make(FluxPipeline, comps, sched))
    calls = 2 if true_cfg_scale > 1 else 1  # true CFG: a conditional and an unconditional call per step
    assert torch.equal(spy.timesteps(), (torch.tensor(taus, dtype=torch.float32) / 1000).repeat_interleave(calls))
    untuned = run(make(FluxPipeline, comps, FlowMatchEulerDiscreteScheduler(**FLUX_CONFIG)))
    assert not np.array_equal(tuned, untuned)
    assert np.array_equal(run(make(FluxPipeline, comps, FM(**FLUX_CONFIG, tuned_timesteps={n: grid}))), untuned)
    # another resolution gives another mu: the table refuses it
    with pytest.raises(ValueError, match=r"tuned with mu="):
        make(FluxPipeline, comps, sched)(generator=gen(), **dict(kw, height=32, width=32))


def test_flux_img2img_transformer_receives_tau_over_1000(flux):
    comps, embeds = flux
    n = 4
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    kw = dict(image=image, strength=0.75, num_inference_steps=n, height=16, width=16, output_type="np",
              prompt_embeds=embeds["prompt_embeds"], pooled_prompt_embeds=embeds["pooled_prompt_embeds"])
    run = lambda p: p(generator=gen(), **kw).images  # noqa: E731
    probe = make(FluxImg2ImgPipeline, comps, FM(**FLUX_CONFIG))
    run(probe)
    full = probe.scheduler.timesteps.tolist()  # the whole grid (the pipeline slices a copy, strength 0.75 keeps 3)
    assert len(full) == 4
    taus = shifted(full)
    spy = TimestepSpy(comps["transformer"])
    tuned = run(make(FluxImg2ImgPipeline, comps, FM(**FLUX_CONFIG, tuned_timesteps={n: taus})))
    assert torch.equal(spy.timesteps(), torch.tensor(taus[1:], dtype=torch.float32) / 1000)
    untuned = run(make(FluxImg2ImgPipeline, comps, FlowMatchEulerDiscreteScheduler(**FLUX_CONFIG)))
    assert not np.array_equal(tuned, untuned)
    assert np.array_equal(run(make(FluxImg2ImgPipeline, comps, FM(**FLUX_CONFIG, tuned_timesteps={n: full}))),
                          untuned)


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev_guidance", "no_guidance_embedding"])
def test_flux2_transformer_receives_tau_over_1000(guidance_embeds):
    comps, embeds = flux2_parts("tiny", guidance_embeds=guidance_embeds)
    n = 3
    # guidance_scale is embedded guidance (one transformer call per step, no negative prompt in Flux2Pipeline)
    kw = dict(num_inference_steps=n, height=16, width=16, guidance_scale=4.0, output_type="latent", **embeds)
    run = lambda p: p(generator=gen(), **kw).images  # noqa: E731
    # Flux2Pipeline passes its own sigmas and mu, so only use_dynamic_shifting of the config matters here
    grid, mu = grid_and_mu(make(Flux2Pipeline, comps, FM(**FLUX_CONFIG)), run)
    # a 16x16 image: 8x8 latent, 2x2 patches -> 16 tokens; Flux2's mu depends on tokens and step count
    assert mu == compute_empirical_mu(image_seq_len=16, num_steps=n)
    taus = shifted(grid)
    info = {n: {"time_shift": FM(**FLUX_CONFIG).time_shift_record(mu)}}
    sched = FM(**FLUX_CONFIG, tuned_timesteps={n: taus}, tuned_grids={n: grid}, tuning_info=info)
    spy = TimestepSpy(comps["transformer"])
    tuned = run(make(Flux2Pipeline, comps, sched))
    assert torch.equal(spy.timesteps(), torch.tensor(taus, dtype=torch.float32) / 1000)
    untuned = run(make(Flux2Pipeline, comps, FlowMatchEulerDiscreteScheduler(**FLUX_CONFIG)))
    assert not torch.equal(tuned, untuned)
    assert torch.equal(run(make(Flux2Pipeline, comps, FM(**FLUX_CONFIG, tuned_timesteps={n: grid}))), untuned)
    # another resolution gives another mu: the table refuses it
    with pytest.raises(ValueError, match=r"tuned with mu="):
        make(Flux2Pipeline, comps, sched)(generator=gen(), **dict(kw, height=32, width=32))


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0], ids=["no_cfg", "cfg"])
@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
def test_stable_diffusion_unipc(sd_components, guidance_scale, solver_type):  # noqa: F811
    n = 3
    config = dict(SD_CONFIG, solver_type=solver_type, final_sigmas_type="sigma_min")
    parent = UniPCMultistepScheduler(**config)
    parent.set_timesteps(n)
    grid = parent.timesteps.tolist()
    taus = shifted(grid, top=999)
    pipe = make(StableDiffusionPipeline, sd_components,
                TimeTunerUniPCMultistepScheduler(**config, tuned_timesteps={n: taus}))
    kw = dict(num_inference_steps=n, height=16, width=16, guidance_scale=guidance_scale, output_type="np")
    spy = TimestepSpy(sd_components["unet"])
    tuned = pipe("a cat", generator=gen(), **kw).images
    assert torch.equal(spy.timesteps(), torch.tensor(taus, dtype=torch.float32))
    pipe.scheduler = UniPCMultistepScheduler(**config)
    untuned = pipe("a cat", generator=gen(), **kw).images
    assert not np.array_equal(tuned, untuned)
    pipe.scheduler = TimeTunerUniPCMultistepScheduler(**config, tuned_timesteps={n: grid})
    assert np.array_equal(pipe("a cat", generator=gen(), **kw).images, untuned)


def test_stable_diffusion_heun_one_tau_per_evaluation(sd_components):  # noqa: F811
    n = 3
    parent = HeunDiscreteScheduler(**SD_CONFIG)
    parent.set_timesteps(n)
    grid = parent.timesteps.tolist()  # 2n - 1 evaluations, grid times repeated
    taus = [t + 0.5 * (j + 1) if t < 990 else t - 0.5 * (j + 1) for j, t in enumerate(grid)]
    pipe = make(StableDiffusionPipeline, sd_components,
                TimeTunerHeunDiscreteScheduler(**SD_CONFIG, tuned_timesteps={n: taus}))
    kw = dict(num_inference_steps=n, height=16, width=16, guidance_scale=5.0, output_type="np")
    spy = TimestepSpy(sd_components["unet"])
    tuned = pipe("a cat", generator=gen(), **kw).images
    assert torch.equal(spy.timesteps(), torch.tensor(taus, dtype=torch.float32)) and len(taus) == 2 * n - 1
    pipe.scheduler = HeunDiscreteScheduler(**SD_CONFIG)
    untuned = pipe("a cat", generator=gen(), **kw).images
    assert not np.array_equal(tuned, untuned)
    pipe.scheduler = TimeTunerHeunDiscreteScheduler(**SD_CONFIG)
    assert np.array_equal(pipe("a cat", generator=gen(), **kw).images, untuned)
