"""`calibrate()` on `StableDiffusion3Pipeline` / `FluxPipeline` / `Flux2Pipeline` objects (tiny random components,
offline).

The denoiser calls each transformer as its pipeline does (SD3: keyword inputs, the timestep as it is; Flux and Flux2:
packed latents, ``tau / 1000``, image / text ids, the guidance embedding); the grid is the pipeline's (Flux's own
sigmas, ``mu`` from the image size; Flux2's from the image size and the step count). Each test calibrates a small
table, checks with a forward pre-hook that the transformer of a pipeline call with the calibrated scheduler receives
the taus, and round-trips the table through ``save_pretrained`` / ``from_pretrained``.
"""
import numpy as np
import pytest
import torch
from diffusers import Flux2Pipeline, FluxPipeline, StableDiffusion3Pipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

from diffusers_timetuner import TimeTunerFlowMatchEulerDiscreteScheduler, calibrate
from diffusers_timetuner.denoiser import Denoiser
from diffusers_timetuner.sampling import sample
from diffusers_timetuner.testbeds.tiny_pipelines import flux2_parts, flux_parts, sd3_parts

FM = TimeTunerFlowMatchEulerDiscreteScheduler
# Flux's scheduler config with the token counts of the tiny latents (an 8x8 latent is 16 tokens, 16x16 is 64)
FLUX_CONFIG = dict(use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256)


def small(**kw):
    base = dict(num_samples=4, batch_size=4, num_validation_samples=4, num_heldout_samples=4, progress=False,
                guard=False, teacher_steps=6, objective="endpoint")
    base.update(kw)
    return base


class Spy:
    """Forward pre-hook recording the timestep (and guidance) of every transformer call."""

    def __init__(self, module):
        self.times, self.guidance = [], []
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        t = kwargs["timestep"].reshape(-1)
        assert torch.all(t == t[0]), "one timestep per call"
        self.times.append(float(t[0]))
        g = kwargs.get("guidance")
        self.guidance.append(None if g is None else float(g.reshape(-1)[0]))

    def close(self):
        self.handle.remove()


def embeds_as_conditions(embeds):
    cond = {"prompt_embeds": embeds["prompt_embeds"], "pooled_prompt_embeds": embeds["pooled_prompt_embeds"]}
    neg = {"prompt_embeds": embeds["negative_prompt_embeds"],
           "pooled_prompt_embeds": embeds["negative_pooled_prompt_embeds"]}
    return cond, neg


def round_trip(res, tmp_path):
    res.scheduler.save_pretrained(tmp_path)
    loaded = FM.from_pretrained(tmp_path)
    assert loaded.config.tuned_timesteps == res.scheduler.config.tuned_timesteps
    return loaded


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0], ids=["no_cfg", "cfg"])
def test_sd3_pipeline_calibrates_and_its_transformer_receives_tau(guidance_scale, tmp_path):
    comps, embeds = sd3_parts()
    pipe = StableDiffusion3Pipeline(**comps, scheduler=FM(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    cond, neg = embeds_as_conditions(embeds)
    n = 3
    res = calibrate(pipe, None, n, conditions=cond, negative_conditions=neg if guidance_scale != 1 else None,
                    guidance_scale=guidance_scale, sample_shape=(4, 8, 8), **small())
    taus = res.scheduler.config.tuned_timesteps[str(n)]
    grid = res.scheduler.config.tuned_grids[str(n)]
    assert taus != grid  # a table that differs from tau = t travels below
    assert res.reports[n].forward_samples > 0
    loaded = round_trip(res, tmp_path)
    pipe.scheduler = loaded
    spy = Spy(comps["transformer"])
    kw = dict(num_inference_steps=n, guidance_scale=guidance_scale, height=16, width=16, output_type="latent",
              generator=torch.Generator().manual_seed(0), **embeds)
    tuned = pipe(**kw).images
    spy.close()
    # the pipeline batches both CFG branches into one call: one call per step either way
    assert np.allclose(spy.times, np.float32(taus), rtol=0, atol=1e-3)
    pipe.scheduler = FM(shift=3.0)
    untuned = pipe(**dict(kw, generator=torch.Generator().manual_seed(0))).images
    assert not torch.equal(tuned, untuned)


def test_flux_pipeline_with_guidance_embedding_calibrates_on_its_own_grid(tmp_path):
    comps, embeds = flux_parts(guidance_embeds=True)
    pipe = FluxPipeline(**comps, scheduler=FM(**FLUX_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    cond, _ = embeds_as_conditions(embeds)
    n = 3
    calib_spy = Spy(comps["transformer"])
    res = calibrate(pipe, "flow_euler", n, conditions=cond, embedded_guidance_scale=4.0, sample_shape=(4, 8, 8),
                    **small())
    calib_spy.close()
    assert set(calib_spy.guidance) == {4.0}  # every calibration call fed the guidance embedding the given value
    assert max(calib_spy.times) <= 1.0  # Flux's network time is tau / 1000, in [0, 1]
    info = res.scheduler.config.tuning_info[str(n)]
    # mu as FluxPipeline computes it for a 16x16 image (8x8 latent: 16 packed tokens)
    assert info["time_shift"] == {"use_dynamic_shifting": True, "mu": calculate_shift(16, 16, 256, 0.5, 1.15)}
    taus = res.scheduler.config.tuned_timesteps[str(n)]
    assert taus != res.scheduler.config.tuned_grids[str(n)]
    pipe.scheduler = round_trip(res, tmp_path)
    spy = Spy(comps["transformer"])
    kw = dict(num_inference_steps=n, guidance_scale=4.0, height=16, width=16, output_type="latent",
              generator=torch.Generator().manual_seed(0), prompt_embeds=embeds["prompt_embeds"],
              pooled_prompt_embeds=embeds["pooled_prompt_embeds"])
    pipe(**kw)  # the recorded grid is checked at set_timesteps: Flux's own sigmas and mu must be the calibrated ones
    spy.close()
    assert np.allclose(spy.times, np.float32(taus) / 1000, rtol=0, atol=1e-6)
    assert set(spy.guidance) == {4.0}
    # another image size is another mu: refused with the table's message
    with pytest.raises(ValueError, match="tuned with mu="):
        pipe(**dict(kw, height=32, width=32))


@pytest.mark.parametrize("true_cfg", [1.0, 3.0], ids=["no_cfg", "true_cfg"])
def test_flux_pipeline_calibrates_with_and_without_true_cfg(true_cfg, tmp_path):
    comps, embeds = flux_parts()
    pipe = FluxPipeline(**comps, scheduler=FM(**FLUX_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    cond, neg = embeds_as_conditions(embeds)
    n = 2
    res = calibrate(pipe, None, n, conditions=cond, negative_conditions=neg if true_cfg != 1 else None,
                    guidance_scale=true_cfg, sample_shape=(4, 8, 8), **small())
    taus = res.scheduler.config.tuned_timesteps[str(n)]
    pipe.scheduler = round_trip(res, tmp_path)
    spy = Spy(comps["transformer"])
    pipe(num_inference_steps=n, true_cfg_scale=true_cfg, height=16, width=16, output_type="latent",
         generator=torch.Generator().manual_seed(0), **embeds)
    spy.close()
    calls = 2 if true_cfg != 1 else 1  # Flux's true CFG: a conditional and a negative call per step
    assert np.allclose(spy.times, np.repeat(np.float32(taus) / 1000, calls), rtol=0, atol=1e-6)
    assert spy.guidance == [None] * (n * calls)


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev_guidance", "no_guidance_embedding"])
def test_flux2_pipeline_calibrates_with_its_own_mu_per_step_count(guidance_embeds, tmp_path):
    comps, embeds = flux2_parts(guidance_embeds=guidance_embeds)
    pipe = Flux2Pipeline(**comps, scheduler=FM(**FLUX_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    guidance = 3.0 if guidance_embeds else None  # not Flux2Pipeline's default 4.0, so the value must travel
    calib_spy = Spy(comps["transformer"])
    # a 16x16 image: the VAE halves it to 8x8, Flux2's 2x2 patches make a (16, 4, 4) latent of 16 tokens
    res = calibrate(pipe, None, [2, 3], conditions=embeds, embedded_guidance_scale=guidance, sample_shape=(16, 4, 4),
                    **small())
    calib_spy.close()
    assert set(calib_spy.guidance) == {guidance}  # None: the transformer has no guidance embedding
    assert max(calib_spy.times) <= 1.0  # Flux2's network time is tau / 1000, in [0, 1]
    pipe.scheduler = round_trip(res, tmp_path)
    for n in (2, 3):
        info = res.scheduler.config.tuning_info[str(n)]
        # Flux2Pipeline's mu depends on the step count: each table records its own
        assert info["time_shift"] == {"use_dynamic_shifting": True,
                                      "mu": compute_empirical_mu(image_seq_len=16, num_steps=n)}
        taus = res.scheduler.config.tuned_timesteps[str(n)]
        assert taus != res.scheduler.config.tuned_grids[str(n)]
        spy = Spy(comps["transformer"])
        kw = dict(num_inference_steps=n, guidance_scale=3.0, height=16, width=16, output_type="latent",
                  generator=torch.Generator().manual_seed(0), **embeds)
        pipe(**kw)  # the recorded grid and mu are checked at set_timesteps: they must be Flux2Pipeline's own
        spy.close()
        assert np.allclose(spy.times, np.float32(taus) / 1000, rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match="tuned with mu="):  # another image size is another mu
            pipe(**dict(kw, height=32, width=32))
    assert res.scheduler.config.tuning_info["2"]["mu"] == {
        str(n): compute_empirical_mu(image_seq_len=16, num_steps=n) for n in (2, 3)}


@pytest.mark.parametrize("kind", ["sd3", "flux", "flux2"])
def test_denoiser_samples_as_the_pipeline_does(kind):
    """An untuned run of the denoiser on the pipeline's grid from the same x_T ends where the pipeline ends: the
    network call (keyword inputs, packing, ids, tau / 1000, CFG batching) is the pipeline's."""
    if kind == "flux2":  # guidance-distilled (FLUX.2-dev's default), guidance 4.0 as Flux2Pipeline's default
        comps, embeds = flux2_parts()
        pipe = Flux2Pipeline(**comps, scheduler=FM(**FLUX_CONFIG))
        pipe.set_progress_bar_config(disable=True)
        # the patched latent (B, 4C, H/2, W/2) of a 16x32 image: not square, so a transposed unpacking would show
        noise = torch.randn(1, 16, 4, 8, generator=torch.Generator().manual_seed(3))
        out = pipe(latents=noise, num_inference_steps=3, height=16, width=32, output_type="latent", **embeds).images
        out = out.permute(0, 2, 1).reshape(noise.shape)  # the pipeline returns packed tokens (B, HW, C)
        sched = FM(**FLUX_CONFIG)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 3, 3), mu=pipe.scheduler._mu)
        ours = sample(Denoiser(comps["transformer"]), sched, noise, None, embeds)
        assert torch.allclose(ours, out, atol=1e-5, rtol=1e-5)
        return
    parts, cls, config, cfg = (sd3_parts, StableDiffusion3Pipeline, dict(shift=3.0), 4.0) if kind == "sd3" else \
        (flux_parts, FluxPipeline, FLUX_CONFIG, 1.0)
    comps, embeds = parts()
    pipe = cls(**comps, scheduler=FM(**config))
    pipe.set_progress_bar_config(disable=True)
    cond, neg = embeds_as_conditions(embeds)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    if kind == "sd3":
        out = pipe(latents=noise, num_inference_steps=3, guidance_scale=cfg, height=16, width=16,
                   output_type="latent", **embeds).images
        set_kwargs = {}
    else:
        packed = FluxPipeline._pack_latents(noise, 1, 4, 8, 8)
        out = pipe(latents=packed, num_inference_steps=3, height=16, width=16, output_type="latent",
                   prompt_embeds=embeds["prompt_embeds"], pooled_prompt_embeds=embeds["pooled_prompt_embeds"]).images
        out = FluxPipeline._unpack_latents(out, 8, 8, 1)
        set_kwargs = dict(sigmas=np.linspace(1.0, 1 / 3, 3), mu=pipe.scheduler._mu)
    denoiser = Denoiser(comps["transformer"], guidance_scale=cfg, uncond=neg if cfg != 1 else None)
    sched = FM(**config)
    if set_kwargs:
        sched.set_timesteps(**set_kwargs)
    else:
        sched.set_timesteps(3)
    ours = sample(denoiser, sched, noise, None, cond)
    assert torch.allclose(ours, out, atol=1e-5, rtol=1e-5)


def test_pipeline_inputs_are_checked_before_calibrating():
    comps, embeds = sd3_parts()
    pipe = StableDiffusion3Pipeline(**comps, scheduler=FM(shift=3.0))
    # prompts need the text encoders, which these components leave out
    with pytest.raises(ValueError, match="has no text_encoder, tokenizer, text_encoder_2, tokenizer_2"):
        calibrate(pipe, None, 2, conditions=["a photo"], sample_shape=(4, 8, 8), **small())
    with pytest.raises(ValueError, match=r"needs \['pooled_projections'\]"):
        calibrate(pipe, None, 2, conditions={"prompt_embeds": embeds["prompt_embeds"]}, sample_shape=(4, 8, 8),
                  **small())
    with pytest.raises(ValueError, match="embedded_guidance_scale is for a Flux transformer"):
        calibrate(pipe, None, 2, conditions=embeds_as_conditions(embeds)[0], embedded_guidance_scale=3.5,
                  sample_shape=(4, 8, 8), **small())
    fcomps, fembeds = flux_parts()  # no guidance embedding
    flux = FluxPipeline(**fcomps, scheduler=FM(**FLUX_CONFIG))
    with pytest.raises(ValueError, match="has none: leave it unset"):
        calibrate(flux, None, 2, conditions=embeds_as_conditions(fembeds)[0], embedded_guidance_scale=3.5,
                  sample_shape=(4, 8, 8), **small())
    with pytest.raises(ValueError, match="embedded_guidance_scale must be a finite number"):
        calibrate(FluxPipeline(**flux_parts(guidance_embeds=True)[0], scheduler=FM(**FLUX_CONFIG)), None, 2,
                  conditions=embeds_as_conditions(fembeds)[0], embedded_guidance_scale=float("nan"),
                  sample_shape=(4, 8, 8), **small())
    with pytest.raises(ValueError, match="must be even"):
        calibrate(flux, None, 2, conditions=embeds_as_conditions(fembeds)[0], sample_shape=(4, 7, 8), **small())
    # Flux2: no CFG in its pipeline, no prompt encoding here, prompt_embeds required; all before any network call
    f2comps, f2embeds = flux2_parts(guidance_embeds=False)
    flux2 = Flux2Pipeline(**f2comps, scheduler=FM(**FLUX_CONFIG))
    spy = Spy(f2comps["transformer"])
    with pytest.raises(ValueError, match="Flux2Pipeline has no classifier-free guidance"):
        calibrate(flux2, None, 2, conditions=f2embeds, negative_conditions={"prompt_embeds": 0.5 * f2embeds[
            "prompt_embeds"]}, guidance_scale=2.0, sample_shape=(16, 4, 4), **small())
    with pytest.raises(ValueError, match="Prompts for a Flux2Transformer2DModel are not encoded here"):
        calibrate(flux2, None, 2, conditions=["a b"], sample_shape=(16, 4, 4), **small())
    with pytest.raises(ValueError, match=r"needs \['encoder_hidden_states'\].*conditions=\{'prompt_embeds': \.\.\.\}"):
        calibrate(flux2, None, 2, conditions={"pooled_prompt_embeds": f2embeds["prompt_embeds"][:, 0]},
                  sample_shape=(16, 4, 4), **small())
    with pytest.raises(ValueError, match="guidance_embeds=True, FLUX.2-dev"):
        calibrate(flux2, None, 2, conditions=f2embeds, embedded_guidance_scale=4.0, sample_shape=(16, 4, 4),
                  **small())
    spy.close()
    assert spy.times == []  # the transformer was never called


def test_sd3_pipeline_calibrates_on_a_custom_sigma_grid(tmp_path):
    comps, embeds = sd3_parts()
    pipe = StableDiffusion3Pipeline(**comps, scheduler=FM(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    sigmas = [1.0, 0.6, 0.25]
    res = calibrate(pipe, None, conditions=embeds_as_conditions(embeds)[0], sigmas=sigmas, sample_shape=(4, 8, 8),
                    **small())
    taus = res.scheduler.config.tuned_timesteps["3"]
    pipe.scheduler = round_trip(res, tmp_path)
    spy = Spy(comps["transformer"])
    pipe(sigmas=sigmas, guidance_scale=1.0, height=16, width=16, output_type="latent",
         generator=torch.Generator().manual_seed(0), **embeds)
    spy.close()
    assert np.allclose(spy.times, np.float32(taus), rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="was tuned on the grid"):  # the recorded grid refuses the default one
        pipe(num_inference_steps=3, guidance_scale=1.0, height=16, width=16, output_type="latent", **embeds)
