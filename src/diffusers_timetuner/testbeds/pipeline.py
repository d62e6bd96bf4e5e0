"""A small class-conditional image pipeline with classifier-free guidance, for the testbed models."""
from typing import List, Optional, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..denoiser import Denoiser
from ..sampling import sample

OUTPUT_TYPES = ("pt", "np", "pil", "latent")


class ClassConditionalImagePipeline(DiffusionPipeline):
    """Unconditional or class-conditional sampling for a `UNet2DModel`-like network and any Diffusers scheduler.

    Sampling runs the package's shared loop (`diffusers_timetuner.sampling.sample` with a `Denoiser`): the network
    is called as ``unet(x, t, class_labels=...)`` where ``t`` is a float tensor of shape (B,) holding
    ``scheduler.timesteps[i]`` (what the network sees; a TimeTuner scheduler puts tau_i there), and the update goes
    through ``scheduler.step(model_output, t, x)``. The null class (for classifier-free guidance) is
    ``unet.config.num_class_embeds - 1``; guided prediction is eps_uncond + g * (eps_cond - eps_uncond).

    Args:
        unet: a denoiser with `config.sample_size`, `config.in_channels` and optionally `config.num_class_embeds`.
        scheduler: any Diffusers scheduler.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def null_class_label(self) -> Optional[int]:
        """The label of the null (unconditional) class, or None for a network without class embeddings."""
        n = getattr(self.unet.config, "num_class_embeds", None)
        return None if n is None else int(n) - 1

    def _labels(self, class_labels, batch_size: int, device) -> Optional[torch.Tensor]:
        null = self.null_class_label
        if class_labels is None:
            return None if null is None else torch.full((batch_size,), null, dtype=torch.long, device=device)
        if null is None:
            raise ValueError(
                "This model has no class embeddings (config.num_class_embeds is None): pass class_labels=None."
            )
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(batch_size)
        if labels.numel() != batch_size:
            raise ValueError(
                f"Got {labels.numel()} class labels for batch_size={batch_size}: pass one label or one per sample."
            )
        if labels.min() < 0 or labels.max() > null:
            raise ValueError(
                f"class_labels must lie in [0, {null}] ({null} is the null class), got {labels.tolist()}."
            )
        return labels

    def _sample_shape(self, batch_size: int):
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, self.unet.config.in_channels, *size)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Optional[Union[int, List[int], torch.Tensor]] = None,
        batch_size: Optional[int] = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pt",
        eta: float = 0.0,
        return_dict: bool = True,
    ):
        """Generate images.

        Args:
            class_labels: one label, a list/tensor with one label per sample, or None (unconditional = null class).
            batch_size: number of samples; default len(class_labels), or latents.shape[0], or 1.
            num_inference_steps: number of scheduler steps.
            guidance_scale: classifier-free guidance scale g (1.0 = no guidance, one network call per step).
            generator: torch generator(s) for the initial noise and stochastic schedulers.
            latents: initial noise x_T of shape (B, C, H, W) (scaled by `scheduler.init_noise_sigma`).
            output_type: "pt" / "np" / "pil" give images in [0, 1] like Diffusers pipelines; "latent" returns the
                raw final sample in model space ([-1, 1] for the testbeds), unclamped.
            eta: DDIM eta, passed to `scheduler.step` when its signature has it.
            return_dict: return an `ImagePipelineOutput` (else a tuple).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if batch_size is None:
            if class_labels is not None and torch.as_tensor(class_labels).numel() > 1:
                batch_size = torch.as_tensor(class_labels).numel()
            else:
                batch_size = latents.shape[0] if latents is not None else 1
        device = self._execution_device
        labels = self._labels(class_labels, batch_size, device)
        do_cfg = guidance_scale != 1.0
        if do_cfg and labels is None:
            raise ValueError("guidance_scale != 1 needs a class-conditional model (config.num_class_embeds).")

        # 1. Initial noise x_T (the shared loop scales it by scheduler.init_noise_sigma).
        shape = self._sample_shape(batch_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}.")
        latents = latents.to(device=device, dtype=self.unet.dtype)

        # 2. The package's one sampling loop: the network sees scheduler.timesteps[i] as a float (B,) tensor via
        # Denoiser (tau_i for a TimeTuner scheduler); CFG = uncond + g * (cond - uncond) with the null class.
        denoiser = Denoiser(self.unet, guidance_scale=guidance_scale, null_class_label=self.null_class_label)
        cond = None if labels is None else {"class_labels": labels}
        show = not getattr(self, "_progress_bar_config", {}).get("disable", False)
        x = sample(denoiser, self.scheduler, latents, num_inference_steps, cond, eta=eta, generator=generator,
                   progress=show)

        # 3. Output.
        if output_type == "latent":
            images = x
        else:
            images = (x / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).float().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
