"""The shared sampling loop and model wrapper behave exactly like diffusers pipelines."""
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from diffusers_timetuner.denoiser import Denoiser, slice_conditioning
from diffusers_timetuner.sampling import sample, sample_trajectory


def tiny_unet(**kwargs):
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=kwargs.pop("out_channels", 1), block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1, norm_num_groups=4, **kwargs,
    )


def test_sample_matches_ddim_pipeline_bit_for_bit():
    unet = tiny_unet()
    pipe = DDIMPipeline(unet, DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(1),
                    output_type="np", eta=0.0).images
    noise = randn_tensor((2, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    x = sample(Denoiser(unet), DDIMScheduler(), noise, 5, eta=0.0)
    got = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert (got == expected).all()


def test_sample_matches_stochastic_ddpm_pipeline_with_same_generator():
    unet = tiny_unet()
    pipe = DDPMPipeline(unet, DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(3),
                    output_type="np").images
    g = torch.Generator().manual_seed(3)
    noise = randn_tensor((2, 1, 8, 8), generator=g)
    x = sample(Denoiser(unet), DDPMScheduler(), noise, 4, generator=g)
    got = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert (got == expected).all()


def test_float_timestep_reaches_the_network_as_float_tensor():
    unet = tiny_unet()
    seen = []
    unet.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    Denoiser(unet)(torch.zeros(3, 1, 8, 8), torch.tensor(437.3))
    assert seen[0].dtype == torch.float32 and seen[0].shape == (3,)
    assert torch.equal(seen[0], torch.full((3,), 437.3))  # not truncated to 437 as a Python float would be


def test_classifier_free_guidance_matches_hand_computation():
    unet = tiny_unet(num_class_embeds=3)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor(500)
    labels = torch.tensor([0, 1])
    den = Denoiser(unet, guidance_scale=2.5, null_class_label=2)
    with torch.no_grad():
        got = den(x, t, {"class_labels": labels})
        cond = unet(x, t, class_labels=labels).sample
        uncond = unet(x, t, class_labels=torch.tensor([2, 2])).sample
    torch.testing.assert_close(got, uncond + 2.5 * (cond - uncond), rtol=1e-5, atol=1e-5)
    assert den.num_forward_samples == 4  # one batched forward over [uncond, cond]


def test_guidance_without_unconditional_input_is_a_clear_error():
    with pytest.raises(ValueError, match="unconditional input"):
        Denoiser(tiny_unet(), guidance_scale=3.0)


def test_learned_variance_channels_are_split_off_unless_kept():
    unet = tiny_unet(out_channels=2)
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        assert Denoiser(unet)(x, 10).shape == (1, 1, 8, 8)
        assert Denoiser(unet, keep_learned_variance=True)(x, 10).shape == (1, 2, 8, 8)


def test_trajectory_has_every_grid_state_and_ends_at_the_sample():
    unet, noise = tiny_unet(), torch.randn(2, 1, 8, 8)
    states = sample_trajectory(Denoiser(unet), DDIMScheduler(), noise, 4)
    assert len(states) == 5
    assert torch.equal(states[0], noise)  # init_noise_sigma is 1 for DDIM
    assert torch.equal(states[-1], sample(Denoiser(unet), DDIMScheduler(), noise, 4))


def test_slice_conditioning_selects_rows():
    cond = {"class_labels": torch.arange(4), "scale": 1.0}
    assert slice_conditioning(cond, slice(1, 3))["class_labels"].tolist() == [1, 2]
    assert slice_conditioning(None, slice(0, 1)) is None
