"""The one place where "the time the model sees" is chosen.

Samplers, calibration and benchmarks never call a network directly: they call a :class:`Denoiser`, which turns a
diffusers network (UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel, SD3Transformer2DModel,
FluxTransformer2DModel, Flux2Transformer2DModel, or any module with the UNet call signature) into
``denoiser(x, tau, cond) -> model_output`` in the scheduler's ``prediction_type``, with classifier-free guidance
applied exactly as diffusers pipelines apply it. Compare dpm-solver's ``model_wrapper`` / ``get_model_input_time``: :meth:`Denoiser.model_input_time` is that
function here (tau in the scheduler's units), and a :class:`NetworkCall` hands it to the network the way the
network's own pipeline does (SD3: as it is, by keyword; Flux and Flux2: ``tau / 1000`` on packed latents).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional

import torch

Conditioning = Optional[Mapping[str, Any]]


class NetworkCall:
    """How a network is called: ``model(sample, t, **cond)`` (UNets, DiT, the testbeds), t in scheduler units."""

    description: Dict[str, Any] = {"call": "model(sample, t, **cond)"}

    def inputs(self, cond: Optional[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
        """The network's keyword inputs from the user's conditioning (pipeline argument names accepted)."""
        return None if cond is None else dict(cond)

    def __call__(self, model, sample: torch.Tensor, t: torch.Tensor, cond: Dict[str, Any]):
        return model(sample, t, **cond)

    def default_sample_shape(self, model):
        """The per-sample shape the network's pipeline samples by default, or `None` (then the config's)."""
        return None

    def image_seq_len(self, shape) -> Optional[int]:
        """Image tokens of a sample of this shape (the dynamic shift's input); `None` where it does not apply."""
        return None

    def pipeline_sigmas(self, num_inference_steps: int, scheduler) -> Optional[list]:
        """The sigma grid the network's pipeline passes to `set_timesteps` for n steps, `None` when it passes none."""
        return None

    # Whether the network's pipeline applies classifier-free guidance (a table tuned with CFG must be usable there).
    pipeline_cfg = True
    # Whether the pipeline's dynamic shift `mu` depends on the step count as well as on the image size.
    mu_depends_on_steps = False

    def pipeline_mu(self, scheduler, shape, num_inference_steps: int) -> Optional[float]:
        """The dynamic shift `mu` the network's pipeline passes for samples of `shape` at n steps (diffusers'
        `calculate_shift` of the image tokens, the scheduler's shift settings), for a scheduler with
        ``use_dynamic_shifting``; else `None`."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        seq_len = self.image_seq_len(shape)
        if seq_len is None or not scheduler.config.get("use_dynamic_shifting", False):
            return None
        c = scheduler.config
        return float(calculate_shift(seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                     c.get("base_shift", 0.5), c.get("max_shift", 1.15)))


def _embedded_guidance(model, guidance: Optional[float], default: float, name: str, variant: str) -> Optional[float]:
    """The guidance-embedding value a guidance-distilled transformer gets (`default`: its pipeline's), `None` for a
    transformer without one; refuses a value it cannot take."""
    embeds = bool(getattr(model.config, "guidance_embeds", False))
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float))
                                 or not math.isfinite(guidance)):
        raise ValueError(f"embedded_guidance_scale must be a finite number, got {guidance!r}.")
    if guidance is not None and not embeds:
        raise ValueError(f"embedded_guidance_scale={guidance} is for a transformer with a guidance embedding "
                         f"(guidance_embeds=True, {variant}); this {name} has none: leave it unset.")
    return (default if guidance is None else float(guidance)) if embeds else None


def _flux_sigmas(num_inference_steps: int, scheduler) -> Optional[list]:
    """The grid FluxPipeline and Flux2Pipeline pass: ``linspace(1, 1/n, n)``, none with ``use_flow_sigmas``."""
    if getattr(scheduler.config, "use_flow_sigmas", False):
        return None
    n = int(num_inference_steps)
    return [float(v) for v in torch.linspace(1.0, 1.0 / n, n, dtype=torch.float64)]


class _TransformerCall(NetworkCall):
    """SD3 / Flux / Flux2 transformers: keyword inputs; the pipelines' embedding names map to the network's."""

    RENAME = {"prompt_embeds": "encoder_hidden_states", "negative_prompt_embeds": "encoder_hidden_states",
              "pooled_prompt_embeds": "pooled_projections", "negative_pooled_prompt_embeds": "pooled_projections"}
    REQUIRED = ("encoder_hidden_states", "pooled_projections")
    CONDITIONS_HINT = "{'prompt_embeds': ..., 'pooled_prompt_embeds': ...}"

    def __init__(self, name: str):
        self.name = name

    def inputs(self, cond):
        if cond is None:
            return None
        out = {}
        for key, value in cond.items():
            name = self.RENAME.get(key, key)
            if name in out:
                raise ValueError(f"conditions give the {self.name} input {name!r} twice (as {key!r} too).")
            out[name] = value
        return out

    def _check(self, cond: Dict[str, Any]) -> None:
        missing = [k for k in self.REQUIRED if k not in cond]
        if missing:
            raise ValueError(
                f"The {self.name} needs {missing} among its inputs: pass conditions={self.CONDITIONS_HINT} (the "
                "embeddings the pipeline takes), and negative_conditions likewise for classifier-free guidance."
            )


class SD3TransformerCall(_TransformerCall):
    """`SD3Transformer2DModel` as `StableDiffusion3Pipeline` calls it: latents (B, C, H, W), the timestep as it is
    (scheduler units, ``sigma * 1000``)."""

    def __init__(self, model):
        super().__init__(type(model).__name__)
        self.patch_size = int(model.config.patch_size)
        self.description = {"call": "StableDiffusion3Pipeline", "network_time": "tau"}

    def __call__(self, model, sample, t, cond):
        self._check(cond)
        return model(hidden_states=sample, timestep=t, return_dict=False, **cond)[0]

    def image_seq_len(self, shape) -> int:
        # as StableDiffusion3Pipeline computes it for its dynamic shift
        return (int(shape[-2]) // self.patch_size) * (int(shape[-1]) // self.patch_size)


class FluxTransformerCall(_TransformerCall):
    """`FluxTransformer2DModel` as `FluxPipeline` calls it: the sample is the unpacked latent (B, C, H, W) that
    `FluxPipeline.prepare_latents` draws before packing, packed into 2x2 patches around the call; the network sees
    ``tau / 1000``; a guidance-distilled transformer (``guidance_embeds``, FLUX.1-dev) gets `guidance` (the
    pipeline's ``guidance_scale``, default 3.5) in its guidance embedding."""

    DEFAULT_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale

    def __init__(self, model, guidance: Optional[float] = None):
        super().__init__(type(model).__name__)
        self.guidance = _embedded_guidance(model, guidance, self.DEFAULT_GUIDANCE, self.name, "FLUX.1-dev")
        self.channels = int(model.config.in_channels) // 4
        self.description = {"call": "FluxPipeline", "network_time": "tau / 1000", "guidance": self.guidance}

    def __call__(self, model, sample, t, cond):
        from diffusers import FluxPipeline

        self._check(cond)
        b, c, h, w = sample.shape
        if h % 2 or w % 2:
            raise ValueError(f"Flux packs 2x2 latent patches: the latent height and width must be even, got {h}x{w}.")
        packed = FluxPipeline._pack_latents(sample, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, sample.device, sample.dtype)
        txt_ids = torch.zeros(cond["encoder_hidden_states"].shape[1], 3, device=sample.device, dtype=sample.dtype)
        guidance = None if self.guidance is None else torch.full((b,), self.guidance, device=sample.device)
        out = model(hidden_states=packed, timestep=t / 1000, guidance=guidance, img_ids=img_ids, txt_ids=txt_ids,
                    return_dict=False, **cond)[0]
        return FluxPipeline._unpack_latents(out, h, w, 1)

    def default_sample_shape(self, model):
        # FluxPipeline's default image (default_sample_size 128 times the VAE factor) is a 128 x 128 latent
        return (self.channels, 128, 128)

    def image_seq_len(self, shape) -> int:
        return (int(shape[-2]) // 2) * (int(shape[-1]) // 2)  # packed tokens, as FluxPipeline computes it

    def pipeline_sigmas(self, num_inference_steps, scheduler):
        return _flux_sigmas(num_inference_steps, scheduler)


class Flux2TransformerCall(_TransformerCall):
    """`Flux2Transformer2DModel` as `Flux2Pipeline` calls it: the sample is the latent (B, C, H, W) that
    `Flux2Pipeline.prepare_latents` draws (already in 2x2 patches), flattened into tokens around the call with the
    pipeline's own helpers and 4-axis image / text ids; the network sees ``tau / 1000`` and, with a guidance
    embedding (FLUX.2-dev), `guidance` (the pipeline's ``guidance_scale``, default 4.0). The pipeline has no negative
    prompt, so no classifier-free guidance, and its `mu` depends on the step count too (`compute_empirical_mu`)."""

    DEFAULT_GUIDANCE = 4.0  # Flux2Pipeline's default guidance_scale
    REQUIRED = ("encoder_hidden_states",)
    CONDITIONS_HINT = "{'prompt_embeds': ...}"
    pipeline_cfg = False
    mu_depends_on_steps = True

    def __init__(self, model, guidance: Optional[float] = None):
        super().__init__(type(model).__name__)
        self.guidance = _embedded_guidance(model, guidance, self.DEFAULT_GUIDANCE, self.name, "FLUX.2-dev")
        self.channels = int(model.config.in_channels)
        self.description = {"call": "Flux2Pipeline", "network_time": "tau / 1000", "guidance": self.guidance}

    def __call__(self, model, sample, t, cond):
        from diffusers import Flux2Pipeline

        self._check(cond)
        b, c, h, w = sample.shape
        img_ids = Flux2Pipeline._prepare_latent_ids(sample).to(sample.device)
        txt_ids = Flux2Pipeline._prepare_text_ids(cond["encoder_hidden_states"]).to(sample.device)
        guidance = None if self.guidance is None else torch.full((b,), self.guidance, device=sample.device)
        out = model(hidden_states=Flux2Pipeline._pack_latents(sample), timestep=t / 1000, guidance=guidance,
                    img_ids=img_ids, txt_ids=txt_ids, return_dict=False, **cond)[0]
        return out.permute(0, 2, 1).reshape(b, c, h, w)  # the inverse of _pack_latents

    def default_sample_shape(self, model):
        # Flux2Pipeline's default image (default_sample_size 128 times the VAE factor 8): a 64 x 64 patched latent
        return (self.channels, 64, 64)

    def image_seq_len(self, shape) -> int:
        return int(shape[-2]) * int(shape[-1])  # one token per patched latent pixel, as Flux2Pipeline counts them

    def pipeline_sigmas(self, num_inference_steps, scheduler):
        return _flux_sigmas(num_inference_steps, scheduler)

    def pipeline_mu(self, scheduler, shape, num_inference_steps):
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        if not scheduler.config.get("use_dynamic_shifting", False):
            return None
        return float(compute_empirical_mu(image_seq_len=self.image_seq_len(shape), num_steps=int(num_inference_steps)))


def network_call_for(model, embedded_guidance_scale: Optional[float] = None) -> NetworkCall:
    """The :class:`NetworkCall` of `model`: by its class for SD3 / Flux / Flux2 transformers, the UNet call
    otherwise."""
    from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel, SD3Transformer2DModel

    if isinstance(model, Flux2Transformer2DModel):
        return Flux2TransformerCall(model, embedded_guidance_scale)
    if isinstance(model, FluxTransformer2DModel):
        return FluxTransformerCall(model, embedded_guidance_scale)
    if embedded_guidance_scale is not None:
        raise ValueError(f"embedded_guidance_scale is for a Flux transformer with a guidance embedding, not a "
                         f"{type(model).__name__}: leave it unset.")
    if isinstance(model, SD3Transformer2DModel):
        return SD3TransformerCall(model)
    return NetworkCall()


class Denoiser:
    """Wrap a diffusers network as ``denoiser(sample, timestep, cond)``.

    Args:
        model: the network. Called as ``model(sample, timestep, **cond)``; its output may be a tensor, a tuple
            or a diffusers output with ``.sample``.
        guidance_scale: classifier-free guidance scale g. ``1.0`` (default) runs the conditional branch only; any
            other value needs ``uncond`` (or ``null_class_label`` for class-conditional models) and computes
            ``uncond + g * (cond - uncond)`` from one batched forward over ``[uncond, cond]``, as diffusers pipelines do.
        uncond: keyword inputs of the unconditional branch, e.g. ``{"encoder_hidden_states": negative_embeds}``.
            Tensors of batch size 1 are broadcast to the batch.
        null_class_label: for class-conditional models, the label of the "no class" embedding; builds ``uncond``
            as ``{"class_labels": null_class_label}`` when ``uncond`` is not given.
        keep_learned_variance: models that also predict a variance return ``2 * C`` channels. By default only the
            first ``C`` channels (the mean prediction) are returned, as ``DiTPipeline`` does; set ``True`` when the
            scheduler consumes the variance channels itself (``DDPMScheduler(variance_type="learned")``).
        network_call: how the network is called (default: `network_call_for(model)`, which knows SD3, Flux and
            Flux2 transformers).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        guidance_scale: float = 1.0,
        uncond: Conditioning = None,
        null_class_label: Optional[int] = None,
        keep_learned_variance: bool = False,
        network_call: Optional[NetworkCall] = None,
    ):
        self.network_call = network_call if network_call is not None else network_call_for(model)
        uncond = self.network_call.inputs(uncond)
        if uncond is None and null_class_label is not None:
            uncond = {"class_labels": torch.tensor([int(null_class_label)])}
        if float(guidance_scale) != 1.0 and uncond is None:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs an unconditional input: pass `uncond=` (e.g. negative prompt "
                "embeddings) or `null_class_label=` for a class-conditional model, or use guidance_scale=1.0."
            )
        self.model = model
        self.guidance_scale = float(guidance_scale)
        self.uncond = dict(uncond) if uncond is not None else None
        self.keep_learned_variance = keep_learned_variance
        self.num_forward_samples = 0  # samples pushed through the network (a CFG call counts two per sample)

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.guidance_scale != 1.0

    def model_input_time(self, timestep: torch.Tensor | float, batch_size: int, device: torch.device) -> torch.Tensor:
        """The time the model sees: tau_i as a float32 tensor of shape (B,).

        Always a tensor: ``UNet2DModel`` casts a Python float to long (437.3 would act as 437), and DiT needs (B,).
        Integer grid timesteps become exact float32 values, so untuned sampling is unchanged.
        """
        t = torch.as_tensor(timestep, device=device)
        if not torch.is_floating_point(t):
            t = t.to(torch.float32)
        if t.ndim == 0:
            t = t.expand(batch_size)
        if t.shape != (batch_size,):
            raise ValueError(f"timestep must be a scalar or have shape ({batch_size},), got {tuple(t.shape)}.")
        return t

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor | float, cond: Conditioning = None) -> torch.Tensor:
        cond = self.network_call.inputs(cond) or {}
        batch = sample.shape[0]
        if not self.do_classifier_free_guidance:
            return self._forward(sample, self.model_input_time(timestep, batch, sample.device), cond)

        uncond = {k: _broadcast(v, batch) for k, v in self.uncond.items()}
        keys = set(cond) | set(uncond)
        both = {k: _cat(uncond.get(k), cond.get(k), batch) for k in keys}
        t = self.model_input_time(timestep, batch, sample.device)
        out = self._forward(torch.cat([sample, sample]), torch.cat([t, t]), both)
        out_uncond, out_cond = out.chunk(2)
        return out_uncond + self.guidance_scale * (out_cond - out_uncond)

    def _forward(self, sample: torch.Tensor, t: torch.Tensor, cond: Dict[str, Any]) -> torch.Tensor:
        cond = {k: (v.to(sample.device) if torch.is_tensor(v) else v) for k, v in cond.items()}
        out = self.network_call(self.model, sample, t, cond)
        out = out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, (tuple, list)) else out)
        self.num_forward_samples += sample.shape[0]
        if not bool(torch.isfinite(out.detach()).all()):
            times = sorted({round(float(v), 4) for v in t.detach().reshape(-1).tolist()})
            raise NonFiniteOutputError(type(self.model).__name__, times, bool(torch.isfinite(sample).all()))
        channels = sample.shape[1]
        if out.shape[1] == 2 * channels and not self.keep_learned_variance:
            out = out[:, :channels]
        return out


class NonFiniteOutputError(ValueError):
    """The network returned NaN or inf. ``where`` (added by a caller that knows it, e.g. the calibration step) says
    at which step of which sampler, ``fed`` what the timestep given to the network was (a tau, a grid time)."""

    def __init__(self, model_name: str, times, input_finite: bool, where: Optional[str] = None,
                 fed: str = "timestep(s)"):
        self.model_name, self.times, self.input_finite, self.where = model_name, times, input_finite, where
        at = f"{where}, fed {fed} {times}," if where else f"at {fed} {times}"
        super().__init__(
            f"{model_name} returned non-finite values (NaN or inf) {at} for an input with "
            f"{'finite' if input_finite else 'non-finite'} values; check the network (weights, dtype overflow in "
            "float16) and the data before calibrating."
        )

    def at(self, where: str, fed: str) -> "NonFiniteOutputError":
        """The same error, saying where it happened and what the network was fed."""
        return NonFiniteOutputError(self.model_name, self.times, self.input_finite, where, fed)


def slice_conditioning(cond: Conditioning, index) -> Conditioning:
    """Select rows ``index`` of every batch-first tensor in ``cond`` (used to split calibration batches)."""
    if cond is None:
        return None
    return {k: (v[index] if torch.is_tensor(v) and v.ndim > 0 else v) for k, v in cond.items()}


def _broadcast(value, batch: int):
    if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == 1 and batch != 1:
        return value.expand(batch, *value.shape[1:])
    return value


def _cat(uncond_value, cond_value, batch: int):
    if uncond_value is None or cond_value is None:
        missing = "unconditional" if uncond_value is None else "conditional"
        raise ValueError(f"a conditioning input is missing from the {missing} branch; give both branches the same keys.")
    if not torch.is_tensor(cond_value):
        return cond_value
    return torch.cat([_broadcast(uncond_value, batch), _broadcast(cond_value, batch)])
