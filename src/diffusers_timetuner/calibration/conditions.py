"""Models and their conditioning: unconditional, class labels, prompts (encoded once) or embeddings, plus CFG."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

import torch

from .prompts import encode_prompts


def resolve_model(model_or_pipeline):
    """(network, pipeline or None) from a Diffusers pipeline (``.unet`` / ``.transformer``) or a network."""
    for attr in ("unet", "transformer"):
        net = getattr(model_or_pipeline, attr, None)
        if net is not None and hasattr(model_or_pipeline, "scheduler"):
            return net, model_or_pipeline
    if callable(model_or_pipeline):
        return model_or_pipeline, None
    raise ValueError(
        f"Cannot calibrate a {type(model_or_pipeline).__name__}: pass a Diffusers network (called as "
        "model(x, t, **cond)) or a pipeline with `.unet` / `.transformer` and `.scheduler`."
    )


@dataclass
class ConditionSet:
    """Conditioning cycled over the sample index: entry k of a set of samples gets ``values[k % len]``.

    Args:
        key: the network keyword (``class_labels``, ``encoder_hidden_states``) or None for a dict / unconditional.
        values: batch-first tensor of the distinct conditions, or a dict of them.
        uncond: the unconditional branch for the :class:`~diffusers_timetuner.denoiser.Denoiser` (CFG).
        description: JSON-able summary for the report.
    """

    key: Optional[str]
    values: Any
    uncond: Optional[Dict[str, Any]]
    description: Dict[str, Any]

    def take(self, indices) -> Optional[Dict[str, Any]]:
        if self.values is None:
            return None
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        if isinstance(self.values, dict):
            return {k: (v[idx % v.shape[0]] if torch.is_tensor(v) and v.ndim > 0 else v)
                    for k, v in self.values.items()}
        return {self.key: self.values[idx % self.values.shape[0]]}


def build_conditions(model, pipeline, conditions, negative_conditions, guidance_scale: float,
                     null_class_label: Optional[int], device, network_call=None) -> ConditionSet:
    """Turn the user's ``conditions`` into a :class:`ConditionSet` (see :func:`~.api.calibrate`).

    ``network_call``: how the network is called (:func:`~diffusers_timetuner.denoiser.network_call_for`); it decides
    how prompts are encoded (SD3 / Flux transformers take their pipelines' prompt and pooled embeddings).
    """
    cfg = float(guidance_scale) != 1.0
    num_classes = getattr(getattr(model, "config", None), "num_class_embeds", None)
    if null_class_label is None:
        null_class_label = getattr(pipeline, "null_class_label", None)
        if null_class_label is None and num_classes is not None:
            null_class_label = int(num_classes) - 1

    # text prompts: encoded once by the pipeline's own encode_prompt (SD, SD3, Flux)
    if _is_prompts(conditions):
        prompts = [conditions] if isinstance(conditions, str) else list(conditions)
        negative = negative_conditions if negative_conditions is not None else ""
        if not isinstance(negative, str):
            raise ValueError("negative_conditions must be one negative prompt (a string) when conditions are prompts.")
        key, values, uncond = encode_prompts(pipeline, network_call, prompts, negative, cfg, device)
        return ConditionSet(key, values, uncond, {"kind": "prompts", "prompts": prompts, "negative_prompt": negative})

    if conditions is None and num_classes is not None and null_class_label is not None:
        conditions = list(range(int(null_class_label)))  # every real class in turn
    if conditions is None:
        if cfg:
            raise ValueError(f"guidance_scale={guidance_scale} needs an unconditional input, but the model is "
                             "unconditional (no conditions given): use guidance_scale=1.0.")
        return ConditionSet(None, None, None, {"kind": "unconditional"})

    if isinstance(conditions, dict):
        values = {k: (torch.as_tensor(v) if not torch.is_tensor(v) else v) for k, v in conditions.items()}
        uncond = dict(negative_conditions) if negative_conditions is not None else None
        if cfg and uncond is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs negative_conditions= (the unconditional inputs).")
        return ConditionSet(None, values, uncond, {"kind": "dict", "keys": sorted(values)})

    values = torch.as_tensor(conditions) if not torch.is_tensor(conditions) else conditions
    if not torch.is_floating_point(values):  # class labels
        values = values.reshape(-1).long()
        if num_classes is None:
            raise ValueError("Class labels were given but the model has no class embeddings "
                             "(config.num_class_embeds is None): pass conditions=None.")
        if values.min() < 0 or values.max() >= int(num_classes):
            raise ValueError(f"class labels must lie in [0, {int(num_classes) - 1}], got {values.tolist()}.")
        uncond = None
        if cfg:
            if null_class_label is None:
                raise ValueError(f"guidance_scale={guidance_scale} needs the null class label: "
                                 "pass null_class_label=.")
            uncond = {"class_labels": torch.tensor([int(null_class_label)])}
        return ConditionSet("class_labels", values, uncond,
                            {"kind": "class_labels", "labels": values.tolist(), "null_class_label": null_class_label})

    # prompt embeddings
    uncond = None
    if cfg:
        if negative_conditions is None:
            raise ValueError(f"guidance_scale={guidance_scale} with prompt embeddings needs negative_conditions= "
                             "(negative prompt embeddings of batch size 1).")
        uncond = {"encoder_hidden_states": torch.as_tensor(negative_conditions)}
    return ConditionSet("encoder_hidden_states", values, uncond,
                        {"kind": "embeddings", "shape": list(values.shape)})


def _is_prompts(conditions) -> bool:
    if isinstance(conditions, str):
        return True
    return isinstance(conditions, Sequence) and len(conditions) > 0 and all(isinstance(c, str) for c in conditions)
