"""Sampling a latent / text-to-image Diffusers pipeline for the evaluation, through its public ``__call__`` only.

`TextPipelineSampler` drives a ``StableDiffusionPipeline``, ``StableDiffusion3Pipeline`` or ``FluxPipeline`` (any
pipeline whose ``__call__`` takes ``prompt``, ``latents``, ``num_inference_steps``, ``output_type`` and
``callback_on_step_end``) with a given scheduler: the scheduler is put in ``pipeline.scheduler`` for the call and
restored after it, x_T is passed as ``latents=`` in the pipeline's own latent layout (Flux: packed 2x2 patches, by the
pipeline's ``_pack_latents``), prompts / guidance / negative prompt go in as the pipeline's own arguments. One call
gives both what the evaluation compares and what it shows: the final latents (what ``output_type="latent"`` returns,
read by ``callback_on_step_end`` after the last step) and the images the pipeline decodes from them
(``output_type="pt"``), kept as 8-bit.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .sampling import grid_timesteps

# What a pipeline's __call__ must take to be driven here.
REQUIRED_CALL_ARGS = ("prompt", "latents", "num_inference_steps", "output_type", "callback_on_step_end",
                      "callback_on_step_end_tensor_inputs")


def call_parameters(pipeline) -> Dict[str, inspect.Parameter]:
    return dict(inspect.signature(type(pipeline).__call__).parameters)


def is_text_pipeline(pipeline) -> bool:
    """A pipeline conditioned on prompts (its ``__call__`` takes ``prompt``)."""
    return "prompt" in call_parameters(pipeline)


def is_latent_pipeline(pipeline) -> bool:
    return getattr(pipeline, "vae", None) is not None


class TextPipelineSampler:
    """Samples of one latent text-to-image pipeline from given x_T and prompts, with any scheduler.

    Args:
        pipeline: the Diffusers pipeline (its own scheduler is left in place between calls).
        prompts: prompts cycled over the sample index.
        negative_prompt: passed where ``__call__`` takes ``negative_prompt``.
        guidance_scale, true_cfg_scale: passed as they are when not None (else the pipeline's defaults).
        height, width: image size (default: the pipeline's own default size).
    """

    def __init__(self, pipeline, prompts: Sequence[str], negative_prompt: Optional[str] = None,
                 guidance_scale: Optional[float] = None, true_cfg_scale: Optional[float] = None,
                 height: Optional[int] = None, width: Optional[int] = None):
        params = call_parameters(pipeline)
        missing = [a for a in REQUIRED_CALL_ARGS if a not in params]
        if missing:
            raise ValueError(f"{type(pipeline).__name__}.__call__ takes no {', '.join(missing)}: this evaluation "
                             "drives text-to-image pipelines through those arguments (e.g. StableDiffusionPipeline, "
                             "StableDiffusion3Pipeline, FluxPipeline).")
        transformer = getattr(pipeline, "transformer", None)
        if type(transformer).__name__.startswith("Flux2"):
            # Flux.2 packs latents with another layout and mu also depends on the step count: its x_T cannot be
            # handed over the way this sampler does for Flux.1, and the text encoder cannot be tested offline here.
            raise ValueError(f"{type(pipeline).__name__} (a Flux.2 transformer) is not supported by this evaluation: "
                             "compare tuned and untuned calls of the pipeline yourself from the same `latents=`; "
                             "calibrate() does support it (pass prompt_embeds).")
        self.pipeline = pipeline
        self.params = params
        self.network = getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)
        if self.network is None:
            raise ValueError(f"{type(pipeline).__name__} has neither `.unet` nor `.transformer`: nothing to evaluate.")
        self.packed = callable(getattr(type(pipeline), "_pack_latents", None))  # Flux: latents as 2x2 patch tokens
        self.vae_scale_factor = int(getattr(pipeline, "vae_scale_factor", 8))
        multiple = self.vae_scale_factor * (2 if self.packed else 1)
        default = self._default_size()
        self.height = int(height) if height is not None else default
        self.width = int(width) if width is not None else default
        for name, size in (("height", self.height), ("width", self.width)):
            if size % multiple:
                raise ValueError(f"{name}={size} is not a multiple of {multiple} ({type(pipeline).__name__}'s VAE "
                                 f"scale factor{' x 2 for packed latents' if self.packed else ''}): pass a multiple.")
        self.prompts = list(prompts)
        self.call_kwargs: Dict[str, Any] = {"height": self.height, "width": self.width}
        if negative_prompt is not None:
            if "negative_prompt" not in params:
                raise ValueError(f"{type(pipeline).__name__} takes no negative_prompt: leave it out.")
            if "true_cfg_scale" in params and not (true_cfg_scale is not None and true_cfg_scale > 1):
                raise ValueError(f"{type(pipeline).__name__} uses negative_prompt only with true_cfg_scale > 1 "
                                 "(its guidance_scale is an embedded, distilled guidance): pass true_cfg_scale too.")
            self.call_kwargs["negative_prompt"] = negative_prompt
        for name, value in (("guidance_scale", guidance_scale), ("true_cfg_scale", true_cfg_scale)):
            if value is None:
                continue
            if name not in params:
                raise ValueError(f"{type(pipeline).__name__} takes no {name}: leave it out.")
            self.call_kwargs[name] = float(value)

    def _default_size(self) -> int:
        size = getattr(self.pipeline, "default_sample_size", None)
        if size is None:
            size = self.network.config.sample_size
            size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * self.vae_scale_factor

    @property
    def noise_shape(self) -> Tuple[int, ...]:
        """The shape of one x_T before packing: (latent channels, height / f, width / f)."""
        channels = int(self.network.config.in_channels) // (4 if self.packed else 1)
        return (channels, self.height // self.vae_scale_factor, self.width // self.vae_scale_factor)

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return (int(self.pipeline.vae.config.out_channels), self.height, self.width)

    def settings(self) -> Dict[str, Any]:
        """The arguments every call gets (for the report), with the pipeline's defaults for those not given."""
        out = dict(self.call_kwargs)
        for name in ("guidance_scale", "true_cfg_scale"):
            if name in self.params and name not in out:
                default = self.params[name].default
                out[name] = None if default is inspect.Parameter.empty else default
        return out

    def latents(self, noise: torch.Tensor) -> torch.Tensor:
        """x_T (B, C, h, w) in the layout the pipeline's ``latents=`` takes."""
        if not self.packed:
            return noise
        b, c, h, w = noise.shape
        return type(self.pipeline)._pack_latents(noise, b, c, h, w)

    def prompts_for(self, indices: Sequence[int]) -> List[str]:
        return [self.prompts[i % len(self.prompts)] for i in indices]

    @torch.no_grad()
    def __call__(self, scheduler, num_inference_steps: int, noise: torch.Tensor, indices: Sequence[int],
                 eta: Optional[float] = None, generators: Optional[List[torch.Generator]] = None,
                 decode: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(final latents as float32 on CPU, decoded images as uint8 on CPU or None) for x_T ``noise`` and the
        prompts of ``indices``; ``generators`` (one per sample) give the step noise of stochastic samplers. The
        call's (grid, timesteps fed) are left in ``last_timesteps``."""
        final: Dict[str, torch.Tensor] = {}

        def keep_latents(pipe, step, timestep, tensors):
            final["latents"] = tensors["latents"]
            return {}  # nothing changed

        kwargs = dict(self.call_kwargs, prompt=self.prompts_for(indices), num_inference_steps=int(num_inference_steps),
                      latents=self.latents(noise), output_type="pt" if decode else "latent",
                      callback_on_step_end=keep_latents, callback_on_step_end_tensor_inputs=["latents"])
        if "negative_prompt" in kwargs:  # one per prompt: Stable Diffusion wants the prompt's type (a list)
            kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * len(kwargs["prompt"])
        if generators is not None:
            kwargs["generator"] = generators
        if eta is not None and "eta" in self.params:
            kwargs["eta"] = float(eta)
        pipe = self.pipeline
        original, bar = pipe.scheduler, getattr(pipe, "_progress_bar_config", None)
        pipe.scheduler = copy.deepcopy(scheduler)
        pipe.set_progress_bar_config(disable=True)  # the evaluation shows one bar over every call
        try:
            images = pipe(**kwargs).images
            used = pipe.scheduler  # the grid and the times the network saw, as the pipeline set them (mu included)
            self.last_timesteps = ([float(t) for t in grid_timesteps(used)],
                                   [float(t) for t in used.timesteps])
        finally:
            pipe.scheduler = original
            if bar is None:
                del pipe._progress_bar_config
            else:
                pipe._progress_bar_config = bar
        latents = final["latents"].float().cpu()
        if not decode:
            return latents, None
        images = torch.as_tensor(images).float().cpu()
        return latents, (images * 255).round().clamp(0, 255).to(torch.uint8)
