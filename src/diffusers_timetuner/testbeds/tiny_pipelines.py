"""Random, offline `StableDiffusion3Pipeline` / `FluxPipeline` / `Flux2Pipeline` components, for tests and the
overhead benchmark.

By default no text encoders or tokenizers: the prompt embeddings are seeded random tensors passed to the pipeline
directly. ``text_encoders=True`` adds one-layer random CLIP (and for Flux T5) encoders with tokenizers built in memory
(one token per one-letter word), so prompts such as ``"a b c"`` run through the pipeline's own ``encode_prompt``
(Flux2 has no such option: its Mistral3 encoder's chat-template processor needs files).
``scale="tiny"`` is the smallest configuration the transformers accept (one block; a network call takes well under a
millisecond, so scheduler cost weighs the most); ``scale="realistic"`` keeps the architecture but gives it more
blocks, wider attention and a longer token sequence, so one transformer call takes tens of milliseconds on one CPU
core, in proportion to the per-step work of a real model. Everything is seeded: a call gives the same weights.
"""

from __future__ import annotations

import string

import torch

# Transformer sizes per scale. SD3: (blocks, attention heads, head dimension, patch size); Flux and Flux2: (double
# blocks, single blocks, attention heads, head dimension). At "realistic" a 64x64 image (a 32x32 latent with these
# VAEs) is 256 image tokens for all three, as the real models' 2x2 patches / packing make them.
SCALES = {
    "tiny": dict(sd3=(1, 4, 8, 1), flux=(1, 1, 2, 16), flux2=(1, 1, 2, 16)),
    "realistic": dict(sd3=(2, 4, 32, 2), flux=(1, 2, 4, 32), flux2=(1, 2, 4, 32)),
}
# Pixel size (height = width) at which each scale is sampled by default.
IMAGE_SIZE = {"tiny": 16, "realistic": 64}


def _check_scale(scale: str) -> None:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {sorted(SCALES)}, got {scale!r}.")


def tiny_vae():
    """A two-block `AutoencoderKL` (4 latent channels, downsampling by 2), SD3's shift / scaling factors."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
        shift_factor=0.0609, scaling_factor=1.5035,
    ).eval()


def clip_tokenizer():
    """A `CLIPTokenizer` built in memory with one token per one-letter word: with no merges, BPE keeps single
    characters only, so a vocabulary of longer words would turn every prompt into the same end-of-text tokens."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2,
             **{f"{c}</w>": i + 3 for i, c in enumerate(string.ascii_lowercase)}}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def clip_text_config():
    """A one-layer CLIP text encoder config (hidden size and projection 32)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=32, intermediate_size=37,
                          num_attention_heads=4, num_hidden_layers=1, vocab_size=100, layer_norm_eps=1e-5,
                          projection_dim=32)


def t5_parts():
    """(`T5TokenizerFast` built in memory, a one-layer `T5EncoderModel` of width 32)."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"\u2581{c}", -1.0) for c in string.ascii_lowercase]
    encoder = T5EncoderModel(T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                                      decoder_start_token_id=0)).eval()
    return T5TokenizerFast(vocab=vocab, extra_ids=0), encoder


def sd3_text_components():
    """Seeded `StableDiffusion3Pipeline` text components: two CLIP encoders with projections, no T5 (the pipeline
    then uses zero T5 embeddings)."""
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    return dict(text_encoder=CLIPTextModelWithProjection(clip_text_config()).eval(), tokenizer=clip_tokenizer(),
                text_encoder_2=CLIPTextModelWithProjection(clip_text_config()).eval(), tokenizer_2=clip_tokenizer())


def flux_text_components():
    """Seeded `FluxPipeline` text components: a CLIP encoder (pooled embedding) and a T5 encoder."""
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(clip_text_config()).eval()
    tokenizer_2, text_encoder_2 = t5_parts()
    return dict(text_encoder=text_encoder, tokenizer=clip_tokenizer(), text_encoder_2=text_encoder_2,
                tokenizer_2=tokenizer_2)


def sd3_parts(scale: str = "tiny", text_encoders: bool = False):
    """(components for `StableDiffusion3Pipeline(**components, scheduler=...)`, prompt embeddings with negatives).

    ``text_encoders=True``: with tiny CLIP text encoders and tokenizers (the transformer is the same either way)."""
    from diffusers import SD3Transformer2DModel

    _check_scale(scale)
    layers, heads, head_dim, patch = SCALES[scale]["sd3"]
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=patch, in_channels=4, num_layers=layers, attention_head_dim=head_dim,
        num_attention_heads=heads, caption_projection_dim=heads * head_dim, joint_attention_dim=32,
        pooled_projection_dim=64, out_channels=4,
    ).eval()
    components = dict(transformer=transformer, vae=tiny_vae(), text_encoder=None, tokenizer=None,
                      text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    if text_encoders:
        components.update(sd3_text_components())
    return components, _prompt_embeddings(pooled_dim=64)


def _prompt_embeddings(pooled_dim: int) -> dict:
    """Seeded prompt / pooled embeddings (7 tokens of width 32) with negatives at half their scale."""
    g = torch.Generator().manual_seed(1)
    pe, pp = torch.randn(1, 7, 32, generator=g), torch.randn(1, pooled_dim, generator=g)
    return dict(prompt_embeds=pe, pooled_prompt_embeds=pp, negative_prompt_embeds=0.5 * pe,
                negative_pooled_prompt_embeds=0.5 * pp)


def flux_parts(scale: str = "tiny", guidance_embeds: bool = False, text_encoders: bool = False):
    """(components for `FluxPipeline(**components, scheduler=...)`, prompt embeddings with negatives).

    ``guidance_embeds=True`` gives the transformer FLUX.1-dev's guidance embedding (the pipeline's
    ``guidance_scale`` is then a network input, not classifier-free guidance). ``text_encoders=True``: with tiny
    CLIP and T5 text encoders and tokenizers (the transformer is the same either way).
    """
    from diffusers import FluxTransformer2DModel

    _check_scale(scale)
    double, single, heads, head_dim = SCALES[scale]["flux"]
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=double, num_single_layers=single, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[head_dim // 4, head_dim // 4, head_dim // 2], guidance_embeds=guidance_embeds,
    ).eval()
    components = dict(transformer=transformer, vae=tiny_vae(), text_encoder=None, tokenizer=None,
                      text_encoder_2=None, tokenizer_2=None)
    if text_encoders:
        components.update(flux_text_components())
    return components, _prompt_embeddings(pooled_dim=32)


def tiny_flux2_vae():
    """A two-block `AutoencoderKLFlux2`: 4 latent channels, downsampling by 2 (the pipeline's 2x2 patches make 16)."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    return AutoencoderKLFlux2(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), norm_num_groups=4,
        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=16, mid_block_add_attention=False,
    ).eval()


def flux2_parts(scale: str = "tiny", guidance_embeds: bool = True):
    """(components for `Flux2Pipeline(**components, scheduler=...)`, prompt embeddings).

    No text encoder or tokenizer (`Flux2Pipeline` needs neither when given ``prompt_embeds``); the pipeline has no
    negative prompt, so only ``prompt_embeds``. ``guidance_embeds=True`` (FLUX.2-dev's default) gives the transformer
    its guidance embedding, which takes the pipeline's ``guidance_scale``.
    """
    from diffusers import Flux2Transformer2DModel

    _check_scale(scale)
    double, single, heads, head_dim = SCALES[scale]["flux2"]
    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=double, num_single_layers=single, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=32, timestep_guidance_channels=32,
        axes_dims_rope=(head_dim // 4,) * 4, guidance_embeds=guidance_embeds,
    ).eval()
    components = dict(transformer=transformer, vae=tiny_flux2_vae(), text_encoder=None, tokenizer=None)
    g = torch.Generator().manual_seed(1)
    return components, dict(prompt_embeds=torch.randn(1, 7, 32, generator=g))
