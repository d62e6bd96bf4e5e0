"""The one place where "the time the model sees" is chosen.

Samplers, calibration and benchmarks never call a network directly: they call a :class:`Denoiser`, which turns a
diffusers network (UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel, or any module with the same call
signature) into ``denoiser(x, tau, cond) -> model_output`` in the scheduler's ``prediction_type``, with
classifier-free guidance applied exactly as diffusers pipelines apply it. Compare dpm-solver's ``model_wrapper`` /
``get_model_input_time``: :meth:`Denoiser.model_input_time` is that function here.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch

Conditioning = Optional[Mapping[str, Any]]


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
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        guidance_scale: float = 1.0,
        uncond: Conditioning = None,
        null_class_label: Optional[int] = None,
        keep_learned_variance: bool = False,
    ):
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
        cond = dict(cond or {})
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
        out = self.model(sample, t, **cond)
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
