"""Small, fully offline stand-ins for what the calibration command writes, and a tiny pipeline to sample with.

`make_calibration_output` writes the folder layout `push_tuned_schedule` takes (scheduler_config.json, report.json,
calibration.png). The table values are arbitrary but valid (tau_i = r_i * t_i with r_i near 1); the tests check that
they travel unchanged and change sampling, not that they are good (calibration's own tests do that).
"""
from __future__ import annotations

import json
import os

import torch

MODEL_ID = "test-org/tiny-unet"  # the recorded model id; the tiny pipeline below carries the same name


def tuned_scheduler(num_inference_steps: int = 4, ratios=None, model_id: str = MODEL_ID, held_out=None):
    """A TimeTuner DDIM scheduler with one table for `num_inference_steps` (r_i = tau_i / t_i from `ratios`)."""
    from diffusers_timetuner.schedulers import TimeTunerDDIMScheduler

    base = TimeTunerDDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    base.set_timesteps(num_inference_steps)
    grid = [float(t) for t in base.grid_timesteps]
    ratios = ratios or [1.0 + 0.05 * (i + 1) / len(grid) for i in range(len(grid))]
    taus = [min(999.0, t * r) for t, r in zip(grid, ratios)]
    info = {
        "model_id": model_id,
        "objective": "paper",
        "strategy": "sequential",
        "optimizer": "test-fixture",
        "guidance_scale": 1.0,
        # the calibration's form (calibration/api.py): tuning_info[n]["heldout"]["<metric>_tuned" / "_untuned"]
        "heldout": held_out or {"endpoint_mse_tuned": 0.015, "endpoint_mse_untuned": 0.02, "relative_change": -0.25},
    }
    return base.with_tuned_timesteps(num_inference_steps, taus, grid=grid, info=info)


def make_calibration_output(path: str, scheduler=None, *, report: bool = True, plot: bool = True) -> str:
    """Write a calibration output folder at `path` (created) and return it."""
    scheduler = scheduler or tuned_scheduler()
    os.makedirs(path, exist_ok=True)
    scheduler.save_pretrained(path)
    if report:
        with open(os.path.join(path, "report.json"), "w") as f:
            json.dump({
                "settings": {"model_id": MODEL_ID, "scheduler": type(scheduler).__name__, "num_inference_steps": [4],
                             "objective": "paper", "strategy": "sequential", "guidance_scale": 1.0,
                             "command": "timetuner-calibrate --fixture"},
                "step_counts": {"4": {"heldout": {"endpoint_mse_tuned": 0.015, "endpoint_mse_untuned": 0.02}}},
            }, f, indent=2)
    if plot:
        from PIL import Image

        Image.new("RGB", (8, 8), (200, 30, 30)).save(os.path.join(path, "calibration.png"))
    return path


def tiny_pipeline(name_or_path: str = MODEL_ID):
    """A DDIMPipeline around a seeded random 8x8 UNet2DModel (about 30k parameters): offline, ~0.05 s per call."""
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                                           clip_sample=False))
    pipe.register_to_config(_name_or_path=name_or_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, scheduler, num_inference_steps: int = 4, seed: int = 0) -> torch.Tensor:
    """Images from `pipe` with `scheduler` swapped in (DDIMPipeline.__init__ would convert it, so assign after)."""
    pipe.scheduler = scheduler
    out = pipe(batch_size=2, num_inference_steps=num_inference_steps, eta=0.0, output_type="np",
               generator=torch.Generator().manual_seed(seed))
    return torch.from_numpy(out.images)


SD_MODEL_ID = "test-org/tiny-sd"
# Stable Diffusion 1.x noise schedule (its scheduler_config.json): what a table for SD is calibrated against.
SD_NOISE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "steps_offset": 1, "set_alpha_to_one": False}


def tiny_stable_diffusion(name_or_path: str = SD_MODEL_ID):
    """A StableDiffusionPipeline from seeded random tiny components (16x16 images, no files, ~0.2 s per call)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2,
    )
    vae = AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), sample_size=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
        num_hidden_layers=1, vocab_size=100, layer_norm_eps=1e-5))
    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2, **{f"w{i}</w>": i + 3 for i in range(90)}}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)  # transformers 5: no files needed
    scheduler = PNDMScheduler(skip_prk_steps=True, **SD_NOISE)  # what SD 1.x ships
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.register_to_config(_name_or_path=name_or_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tuned_sd_scheduler(num_inference_steps: int = 3):
    """A TimeTuner DDIM table on SD's noise schedule (r_i from 1.05 down to 1.0; arbitrary, valid)."""
    from diffusers_timetuner.schedulers import TimeTunerDDIMScheduler

    base = TimeTunerDDIMScheduler(clip_sample=False, **SD_NOISE)
    base.set_timesteps(num_inference_steps)
    grid = [float(t) for t in base.grid_timesteps]
    taus = [t * (1.05 - 0.05 * i / max(1, len(grid) - 1)) for i, t in enumerate(grid)]
    info = {"model_id": SD_MODEL_ID, "objective": "paper", "guidance_scale": 5.0,
            "heldout": {"endpoint_mse_tuned": 0.2, "endpoint_mse_untuned": 0.3}}
    return base.with_tuned_timesteps(num_inference_steps, taus, grid=grid, info=info)
