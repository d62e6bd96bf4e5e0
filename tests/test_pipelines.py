"""Real Diffusers pipelines with TimeTuner schedulers, offline, with tiny randomly initialised components.

Each test spies on the network's forward (a pre-hook) and checks that it received exactly the tau values, that the
untuned pipeline gives another image, and, where the parent stays on its grid, that an identity table (tau = t)
reproduces the untuned pipeline bit-for-bit.
"""
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffusers_timetuner.schedulers import (
    TimeTunerDDIMScheduler,
    TimeTunerDDPMScheduler,
    TimeTunerDPMSolverScheduler,
    TimeTunerDPMSolverSinglestepScheduler,
    TimeTunerEulerDiscreteScheduler,
)

PARENT = {
    TimeTunerDDIMScheduler: DDIMScheduler,
    TimeTunerDDPMScheduler: DDPMScheduler,
    TimeTunerDPMSolverScheduler: DPMSolverMultistepScheduler,
    TimeTunerDPMSolverSinglestepScheduler: DPMSolverSinglestepScheduler,
    TimeTunerEulerDiscreteScheduler: EulerDiscreteScheduler,
}
# The scheduler config of Stable Diffusion 1.x (scaled_linear betas, steps_offset 1, leading spacing).
SD_CONFIG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


class TimestepSpy:
    """Forward pre-hook recording the timestep argument each network call receives."""

    def __init__(self, module):
        self.seen = []
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        t = kwargs["timestep"] if "timestep" in kwargs else args[1]
        t = torch.as_tensor(t).reshape(-1)
        assert torch.all(t == t[0]), "one timestep per call"
        self.seen.append(t[0].clone())

    def timesteps(self):
        self.handle.remove()
        return torch.stack(self.seen)


def shifted_table(sched_cls, config, n, shift=2.5):
    """{n: taus}: the grid this config gives for n steps, shifted by `shift` (inside [0, T - 1]): tau != t."""
    parent = PARENT[sched_cls](**config)
    parent.set_timesteps(n)
    top = parent.config.num_train_timesteps - 1
    return {n: [t + shift if t + shift <= top else t - shift for t in parent.timesteps.tolist()]}


def identity_table(sched_cls, config, n):
    parent = PARENT[sched_cls](**config)
    parent.set_timesteps(n)
    return {n: parent.timesteps.tolist()}


def gen():
    return torch.Generator().manual_seed(0)


# ---- tiny components ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def unet2d():
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    ).eval()


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
    ).eval()


@pytest.fixture(scope="module")
def sd_components(vae):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    ).eval()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=1,
                       vocab_size=40, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    ).eval()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "cat</w>": 3}
    vocab.update({c: 4 + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)


def sd_pipe(cls, components, scheduler):
    pipe = cls(**components, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- unconditional UNet2DModel pipelines ----------------------------------------------------------------------
def test_ddim_pipeline(unet2d):
    n = 4
    sched = TimeTunerDDIMScheduler(tuned_timesteps=shifted_table(TimeTunerDDIMScheduler, {}, n))
    pipe = DDIMPipeline(unet=unet2d, scheduler=sched)
    # DDIMPipeline.__init__ converts any scheduler with DDIMScheduler.from_config: assign ours afterwards.
    assert type(pipe.scheduler) is DDIMScheduler
    pipe.scheduler = sched
    pipe.set_progress_bar_config(disable=True)
    spy = TimestepSpy(unet2d)
    tuned = pipe(batch_size=2, num_inference_steps=n, generator=gen(), eta=0.5, output_type="np").images
    assert torch.equal(spy.timesteps(), sched.timesteps) and sched.is_tuned
    assert torch.equal(sched.timesteps, torch.tensor(shifted_table(TimeTunerDDIMScheduler, {}, n)[n]))
    pipe.scheduler = DDIMScheduler()
    untuned = pipe(batch_size=2, num_inference_steps=n, generator=gen(), eta=0.5, output_type="np").images
    assert not np.array_equal(tuned, untuned)
    pipe.scheduler = TimeTunerDDIMScheduler(tuned_timesteps=identity_table(TimeTunerDDIMScheduler, {}, n))
    same = pipe(batch_size=2, num_inference_steps=n, generator=gen(), eta=0.5, output_type="np").images
    assert np.array_equal(same, untuned)


@pytest.mark.parametrize("spacing", ["leading", "quadratic"])
def test_ddpm_pipeline(unet2d, spacing):
    n = 4
    cfg = dict(timestep_spacing=spacing)
    base = TimeTunerDDPMScheduler(**cfg)
    base.set_timesteps(n)
    taus = {n: [t + 2.5 for t in base.timesteps.tolist()]}
    pipe = DDPMPipeline(unet=unet2d, scheduler=TimeTunerDDPMScheduler(**cfg, tuned_timesteps=taus))
    pipe.set_progress_bar_config(disable=True)
    spy = TimestepSpy(unet2d)
    tuned = pipe(batch_size=1, num_inference_steps=n, generator=gen(), output_type="np").images
    assert torch.equal(spy.timesteps(), torch.tensor(taus[n]))
    pipe.scheduler = TimeTunerDDPMScheduler(**cfg)
    untuned = pipe(batch_size=1, num_inference_steps=n, generator=gen(), output_type="np").images
    assert not np.array_equal(tuned, untuned)
    pipe.scheduler = TimeTunerDDPMScheduler(**cfg, tuned_timesteps={n: base.timesteps.tolist()})
    assert np.array_equal(pipe(batch_size=1, num_inference_steps=n, generator=gen(), output_type="np").images, untuned)


# ---- Stable Diffusion ------------------------------------------------------------------------------------------
SD_SCHEDULERS = [
    (TimeTunerDDIMScheduler, dict(SD_CONFIG, steps_offset=1, clip_sample=False, set_alpha_to_one=False)),
    (TimeTunerDPMSolverScheduler, dict(SD_CONFIG)),
    (TimeTunerDPMSolverSinglestepScheduler, dict(SD_CONFIG)),
    (TimeTunerEulerDiscreteScheduler, dict(SD_CONFIG)),
]
SD_IDS = [c.__name__ for c, _ in SD_SCHEDULERS]


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0], ids=["no_cfg", "cfg"])
@pytest.mark.parametrize("sched_cls,config", SD_SCHEDULERS, ids=SD_IDS)
def test_stable_diffusion_txt2img(sd_components, sched_cls, config, guidance_scale):
    n = 3
    table = shifted_table(sched_cls, config, n)
    pipe = sd_pipe(StableDiffusionPipeline, sd_components, sched_cls(**config, tuned_timesteps=table))
    seen_by_callback = []

    def callback(p, i, t, kwargs):
        seen_by_callback.append(t)
        return kwargs

    spy = TimestepSpy(sd_components["unet"])
    kw = dict(num_inference_steps=n, height=16, width=16, guidance_scale=guidance_scale, output_type="np")
    tuned = pipe("a cat", generator=gen(), callback_on_step_end=callback, **kw).images
    taus = torch.tensor(table[n], dtype=torch.float32)
    assert torch.equal(spy.timesteps(), taus)
    assert torch.equal(torch.stack(seen_by_callback), taus)  # callbacks receive what the network saw
    pipe.scheduler = PARENT[sched_cls](**config)
    untuned = pipe("a cat", generator=gen(), **kw).images
    assert not np.array_equal(tuned, untuned)
    pipe.scheduler = sched_cls(**config, tuned_timesteps=identity_table(sched_cls, config, n))
    assert np.array_equal(pipe("a cat", generator=gen(), **kw).images, untuned)


def test_stable_diffusion_custom_ddim_grid(sd_components):
    """retrieve_timesteps(timesteps=[...]) reaches the DDIM custom grid; the table recorded for it applies."""
    grid, taus = [901, 601, 301, 1], [905.5, 598.25, 303.0, 2.5]
    config = dict(SD_CONFIG, steps_offset=1, clip_sample=False, set_alpha_to_one=False)
    sched = TimeTunerDDIMScheduler(**config, tuned_timesteps={4: taus}, tuned_grids={4: grid})
    pipe = sd_pipe(StableDiffusionPipeline, sd_components, sched)
    spy = TimestepSpy(sd_components["unet"])
    kw = dict(height=16, width=16, guidance_scale=5.0, output_type="np")
    tuned = pipe("a cat", timesteps=grid, generator=gen(), **kw).images
    assert torch.equal(spy.timesteps(), torch.tensor(taus)) and torch.equal(sched.grid_timesteps, torch.tensor(grid))
    pipe.scheduler = TimeTunerDDIMScheduler(**config)
    assert not np.array_equal(tuned, pipe("a cat", timesteps=grid, generator=gen(), **kw).images)
    with pytest.raises(ValueError, match="produces the grid"):  # another grid: the recorded one is checked
        pipe.scheduler = sched
        pipe("a cat", timesteps=[900, 600, 300, 1], generator=gen(), **kw)


def _image():
    return torch.linspace(0, 1, 3 * 16 * 16).reshape(1, 3, 16, 16)


@pytest.mark.parametrize("sched_cls,config", SD_SCHEDULERS, ids=SD_IDS)
def test_stable_diffusion_img2img(sd_components, sched_cls, config):
    """strength 0.6 of 5 steps: starts at step 2 (set_begin_index / add_noise with a tau)."""
    n = 5
    table = shifted_table(sched_cls, config, n)
    pipe = sd_pipe(StableDiffusionImg2ImgPipeline, sd_components, sched_cls(**config, tuned_timesteps=table))
    kw = dict(image=_image(), strength=0.6, num_inference_steps=n, guidance_scale=5.0, output_type="np")
    spy = TimestepSpy(sd_components["unet"])
    tuned = pipe("a cat", generator=gen(), **kw).images
    assert torch.equal(spy.timesteps(), torch.tensor(table[n][2:], dtype=torch.float32))
    pipe.scheduler = PARENT[sched_cls](**config)
    untuned = pipe("a cat", generator=gen(), **kw).images
    assert not np.array_equal(tuned, untuned)
    pipe.scheduler = sched_cls(**config, tuned_timesteps=identity_table(sched_cls, config, n))
    assert np.array_equal(pipe("a cat", generator=gen(), **kw).images, untuned)


@pytest.mark.parametrize("sched_cls,config", SD_SCHEDULERS, ids=SD_IDS)
def test_stable_diffusion_inpaint(sd_components, sched_cls, config):
    """4-channel UNet inpainting: add_noise(init, noise, [timesteps[i + 1]]) at every step, strength 0.75."""
    n = 4
    table = shifted_table(sched_cls, config, n)
    pipe = sd_pipe(StableDiffusionInpaintPipeline, sd_components, sched_cls(**config, tuned_timesteps=table))
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    kw = dict(image=_image(), mask_image=mask, strength=0.75, num_inference_steps=n, guidance_scale=5.0,
              height=16, width=16, output_type="np")
    spy = TimestepSpy(sd_components["unet"])
    tuned = pipe("a cat", generator=gen(), **kw).images
    assert torch.equal(spy.timesteps(), torch.tensor(table[n][1:], dtype=torch.float32))
    pipe.scheduler = PARENT[sched_cls](**config)
    untuned = pipe("a cat", generator=gen(), **kw).images
    assert not np.array_equal(tuned, untuned)
    pipe.scheduler = sched_cls(**config, tuned_timesteps=identity_table(sched_cls, config, n))
    assert np.array_equal(pipe("a cat", generator=gen(), **kw).images, untuned)


# ---- a transformer pipeline ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sched_cls", [TimeTunerDPMSolverScheduler, TimeTunerDDIMScheduler])
def test_dit_pipeline(vae, sched_cls):
    torch.manual_seed(0)
    # num_embeds_ada_norm = 1000: DiTPipeline hard-codes the null class label 1000 for guidance.
    dit = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8, num_layers=1, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=4,
    ).eval()
    n = 3
    table = shifted_table(sched_cls, {}, n)
    pipe = DiTPipeline(transformer=dit, vae=vae, scheduler=sched_cls(tuned_timesteps=table), id2label={0: "cat"})
    pipe.set_progress_bar_config(disable=True)
    kw = dict(class_labels=[0], num_inference_steps=n, guidance_scale=2.0, output_type="np")
    spy = TimestepSpy(dit)
    tuned = pipe(generator=gen(), **kw).images
    assert torch.equal(spy.timesteps(), torch.tensor(table[n], dtype=torch.float32))
    pipe.scheduler = PARENT[sched_cls]()
    untuned = pipe(generator=gen(), **kw).images
    assert not np.array_equal(tuned, untuned)
    pipe.scheduler = sched_cls(tuned_timesteps=identity_table(sched_cls, {}, n))
    assert np.array_equal(pipe(generator=gen(), **kw).images, untuned)
