"""Tiny random diffusers pipelines of each family, built offline, with prompt embeddings for text.

Each recipe gives the pipeline with its family's own scheduler and the call kwargs a user makes with
the pipeline's defaults: text encoders are bypassed by passing prompt embeddings of the length the
pipeline's default ``max_sequence_length`` would produce (PixArt-alpha 120, PixArt-Sigma 300, SD3
77 CLIP + 256 T5, Flux 512).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch


def tiny_vae(blocks: int = 1, latent_channels: int = 4, shift: bool = False):
    """An AutoencoderKL with ``2 ** (blocks - 1)`` downscaling; SD3/Flux read a shift factor."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=(4,) * blocks,
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=2, sample_size=8,
                         shift_factor=0.0 if shift else None, scaling_factor=0.5).eval()


@dataclasses.dataclass
class Recipe:
    name: str
    make_transformer: Callable[[], torch.nn.Module]
    make_scheduler: Callable[[], object]
    make_pipeline: Callable[[torch.nn.Module, object], object]
    call_kwargs: Callable[[], dict]  # the prompt embeddings; everything else stays at the pipeline's default
    grid: tuple[int, int]


def _embeds(batch: int, length: int, dim: int, seed: int, valid: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, length, dtype=torch.int64)
    mask[:, : (valid or length)] = 1  # a short prompt padded to the pipeline's length, as T5 tokenizers pad
    return torch.randn(batch, length, dim, generator=g), mask


# --- DiT ---------------------------------------------------------------------------------------------------
def _dit_transformer():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)  # DiTPipeline uses class 1000 as the null label: 1000 classes
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()


def _dit_pipeline(transformer, scheduler):
    from diffusers import DiTPipeline

    return DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=scheduler)


# --- PixArt ------------------------------------------------------------------------------------------------
def _pixart_transformer():
    from diffusers import PixArtTransformer2DModel

    # sample_size 32: the smallest the pipelines' default resolution binning accepts (256 px); patch 4 and a
    # VAE with 8x downscaling keep it to 8x8 tokens
    torch.manual_seed(0)
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                    num_layers=2, sample_size=32, patch_size=4, cross_attention_dim=16,
                                    caption_channels=32, norm_type="ada_norm_single", num_embeds_ada_norm=1000).eval()


def _pixart_pipeline(cls_name: str):
    def make(transformer, scheduler):
        import diffusers

        return getattr(diffusers, cls_name)(tokenizer=None, text_encoder=None, vae=tiny_vae(blocks=4),
                                            transformer=transformer, scheduler=scheduler)
    return make


def _pixart_kwargs(length: int):
    def kwargs():
        pe, pm = _embeds(1, length, 32, seed=1, valid=7)
        ne, nm = _embeds(1, length, 32, seed=2, valid=1)
        return {"prompt_embeds": pe, "prompt_attention_mask": pm, "negative_prompt_embeds": ne,
                "negative_prompt_attention_mask": nm, "negative_prompt": None}  # "" is its default: embedded here
    return kwargs


def _dpm():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler()  # PixArt-alpha and -Sigma ship DPM-Solver++


# --- SD3 ---------------------------------------------------------------------------------------------------
def _sd3_transformer():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16).eval()


def _sd3_pipeline(transformer, scheduler):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=tiny_vae(shift=True),
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)


def _sd3_kwargs():
    g = torch.Generator().manual_seed(3)
    pe, _ = _embeds(1, 77 + 256, 32, seed=1)  # CLIP's 77 tokens + T5's default 256
    ne, _ = _embeds(1, 77 + 256, 32, seed=2)
    return {"prompt_embeds": pe, "negative_prompt_embeds": ne,
            "pooled_prompt_embeds": torch.randn(1, 16, generator=g),
            "negative_pooled_prompt_embeds": torch.randn(1, 16, generator=g)}


def _sd3_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3-medium's


# --- Flux --------------------------------------------------------------------------------------------------
def _flux_transformer(guidance: bool):
    def make():
        from diffusers import FluxTransformer2DModel

        torch.manual_seed(0)
        return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                      attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                      pooled_projection_dim=16, axes_dims_rope=(4, 2, 2),
                                      guidance_embeds=guidance).eval()
    return make


def _flux_pipeline(transformer, scheduler):
    from diffusers import FluxPipeline

    return FluxPipeline(scheduler=scheduler, vae=tiny_vae(shift=True), text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)


def _flux_kwargs():
    g = torch.Generator().manual_seed(3)
    pe, _ = _embeds(1, 512, 32, seed=1)  # T5's default 512 tokens
    return {"prompt_embeds": pe, "pooled_prompt_embeds": torch.randn(1, 16, generator=g)}


def _flux_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # FLUX.1's: resolution-dependent shift
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)


def _ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler()


RECIPES = {
    "dit": Recipe("dit", _dit_transformer, _ddim, _dit_pipeline, lambda: {"class_labels": [3]}, (4, 4)),
    "pixart-alpha": Recipe("pixart-alpha", _pixart_transformer, _dpm, _pixart_pipeline("PixArtAlphaPipeline"),
                           _pixart_kwargs(120), (8, 8)),
    "pixart-sigma": Recipe("pixart-sigma", _pixart_transformer, _dpm, _pixart_pipeline("PixArtSigmaPipeline"),
                           _pixart_kwargs(300), (8, 8)),
    "sd3": Recipe("sd3", _sd3_transformer, _sd3_scheduler, _sd3_pipeline, _sd3_kwargs, (4, 4)),
    "flux": Recipe("flux", _flux_transformer(False), _flux_scheduler, _flux_pipeline, _flux_kwargs, (64, 64)),
    "flux-guidance": Recipe("flux-guidance", _flux_transformer(True), _flux_scheduler, _flux_pipeline, _flux_kwargs,
                            (64, 64)),
}


def pipeline(recipe: Recipe, transformer):
    pipe = recipe.make_pipeline(transformer, recipe.make_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe
