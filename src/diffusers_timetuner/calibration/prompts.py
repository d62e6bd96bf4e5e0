"""Text prompts, encoded once by the pipeline's own ``encode_prompt`` into the inputs its network takes.

Stable Diffusion (a UNet): ``encoder_hidden_states``. SD3 / Flux transformers: the embeddings their pipelines pass
(``prompt_embeds`` and ``pooled_prompt_embeds``), the same keys a user passing embeddings gives, so a table calibrated
from prompts equals one calibrated from the embeddings ``encode_prompt`` returns. Classifier-free guidance encodes the
negative prompt as the pipeline does: SD3 in the same ``encode_prompt`` call, Flux in a second one (FluxPipeline's
``true_cfg_scale`` with ``negative_prompt``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from ..denoiser import Flux2TransformerCall, FluxTransformerCall, NetworkCall, SD3TransformerCall

# per network call: the text components its pipeline's encode_prompt needs (SD3 runs without its T5 encoder)
REQUIRED_TEXT_COMPONENTS = {
    SD3TransformerCall: ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
    FluxTransformerCall: ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
}
EMBEDDINGS_HINT = ("pass conditions={'prompt_embeds': ..., 'pooled_prompt_embeds': ...} from the pipeline's "
                   "encode_prompt (negative_conditions likewise for guidance)")


def check_prompt_pipeline(pipeline, network_call: Optional[NetworkCall]) -> None:
    """Refuse, before any encoding, a pipeline that cannot encode prompts for this network."""
    if isinstance(network_call, Flux2TransformerCall):
        # its Mistral3 encoder and chat-template processor cannot be built offline, so this path would go untested
        raise ValueError("Prompts for a Flux2Transformer2DModel are not encoded here: pass "
                         "conditions={'prompt_embeds': pipe.encode_prompt(prompts)[0]} (Flux2Pipeline's own "
                         "encoding).")
    transformer = type(network_call) in REQUIRED_TEXT_COMPONENTS
    if pipeline is None or not hasattr(pipeline, "encode_prompt"):
        if transformer:
            raise ValueError(f"Prompts for a {network_call.name} need its pipeline (StableDiffusion3Pipeline / "
                             f"FluxPipeline with its text encoders): pass the pipeline, or {EMBEDDINGS_HINT}.")
        raise ValueError("Prompts need a pipeline with `encode_prompt` (e.g. StableDiffusionPipeline): pass the "
                         "pipeline, or pass prompt embeddings as a tensor.")
    if transformer:
        missing = [name for name in REQUIRED_TEXT_COMPONENTS[type(network_call)]
                   if getattr(pipeline, name, None) is None]
        if missing:
            raise ValueError(f"{type(pipeline).__name__} has no {', '.join(missing)} (loaded without its text "
                             f"encoders?): load the pipeline with them to calibrate on prompts, or {EMBEDDINGS_HINT}.")


@torch.no_grad()
def encode_prompts(pipeline, network_call: Optional[NetworkCall], prompts: List[str], negative: str, cfg: bool,
                   device) -> Tuple[Optional[str], Any, Optional[Dict[str, Any]]]:
    """(ConditionSet key, batch-first values, unconditional inputs or None) for ``prompts``, as the pipeline encodes
    them (the negative prompt only with guidance, batch size 1). The text encoders run where they are (the network
    may have been moved to an accelerator without them); the embeddings come back on the CPU."""
    check_prompt_pipeline(pipeline, network_call)
    device = _text_encoder_device(pipeline, device)
    if isinstance(network_call, SD3TransformerCall):
        embeds, neg, pooled, neg_pooled = pipeline.encode_prompt(
            prompts, None, None, device=device, num_images_per_prompt=1, do_classifier_free_guidance=cfg,
            negative_prompt=negative)
        values = {"prompt_embeds": embeds.cpu(), "pooled_prompt_embeds": pooled.cpu()}
        uncond = {"prompt_embeds": neg[:1].cpu(), "pooled_prompt_embeds": neg_pooled[:1].cpu()} if cfg else None
        return None, values, uncond
    if isinstance(network_call, FluxTransformerCall):
        # text ids: FluxTransformerCall builds the same zeros the pipeline's encode_prompt returns
        embeds, pooled, _ = pipeline.encode_prompt(prompts, None, device=device, num_images_per_prompt=1)
        values = {"prompt_embeds": embeds.cpu(), "pooled_prompt_embeds": pooled.cpu()}
        uncond = None
        if cfg:  # FluxPipeline's true CFG: the negative prompt encoded by a second call
            neg, neg_pooled, _ = pipeline.encode_prompt([negative], None, device=device, num_images_per_prompt=1)
            uncond = {"prompt_embeds": neg.cpu(), "pooled_prompt_embeds": neg_pooled.cpu()}
        return None, values, uncond
    embeds, neg = pipeline.encode_prompt(prompts, device, 1, cfg, negative_prompt=[negative] * len(prompts))
    uncond = {"encoder_hidden_states": neg[:1].cpu()} if cfg else None
    return "encoder_hidden_states", embeds.cpu(), uncond


def _text_encoder_device(pipeline, default):
    encoder = getattr(pipeline, "text_encoder", None)
    params = list(encoder.parameters())[:1] if isinstance(encoder, torch.nn.Module) else []
    return params[0].device if params else default
