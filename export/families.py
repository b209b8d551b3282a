"""How each supported diffusers DiT family is called: its inputs, its token grid, its wrapper.

One recipe per family, each readable on its own (diffusers' single-file habit): the inputs are those
its pipeline passes to ``transformer(...)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from passes.errors import DitmergeError


@dataclasses.dataclass
class Family:
    name: str
    class_name: str
    # (model, batch, grid, text_len, generator) -> ordered dict of example inputs, named as the graph inputs
    example_inputs: Callable[[torch.nn.Module, int, tuple[int, int], int, torch.Generator], dict[str, torch.Tensor]]
    # model.forward keyword arguments from the flat graph inputs
    call: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    patch: Callable[[torch.nn.Module], int]  # patch size
    default_grid: Callable[[torch.nn.Module], tuple[int, int]]
    timestep_scale: float = 1.0  # transformer timestep = scheduler timestep * scale
    batch_inputs: tuple[str, ...] = ()  # inputs whose first axis is the batch


def _latents(model: torch.nn.Module, batch: int, grid: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    p = model.config.patch_size
    return torch.randn(batch, model.config.in_channels, grid[0] * p, grid[1] * p, generator=g)


# --- DiT: class-conditional, latents [B, C, H, W], timestep, class_labels ---------------------------
def _dit_inputs(model, batch, grid, text_len, g):
    n_cls = model.config.num_embeds_ada_norm
    return {
        "hidden_states": _latents(model, batch, grid, g),
        "timestep": torch.randint(0, 1000, (batch,), generator=g),
        "class_labels": torch.randint(0, n_cls + 1, (batch,), generator=g),  # index n_cls is the null class
    }


def _dit_call(model, x):
    return model(x["hidden_states"], timestep=x["timestep"], class_labels=x["class_labels"], return_dict=False)[0]


# --- PixArt: text-conditional, latents, T5 embeddings and their mask, timestep ----------------------
def _pixart_inputs(model, batch, grid, text_len, g):
    x = {
        "hidden_states": _latents(model, batch, grid, g),
        "encoder_hidden_states": torch.randn(batch, text_len, model.config.caption_channels, generator=g),
        "encoder_attention_mask": torch.ones(batch, text_len, dtype=torch.int64),
        "timestep": torch.randint(0, 1000, (batch,), generator=g),
    }
    x["encoder_attention_mask"][:, text_len // 2 + 1:] = 0  # padded prompt tail, as the pipeline gives it
    if model.use_additional_conditions:
        p = model.config.patch_size * 8
        x["resolution"] = torch.tensor([[grid[0] * p, grid[1] * p]] * batch, dtype=torch.float32)
        x["aspect_ratio"] = torch.tensor([[grid[0] / grid[1]]] * batch, dtype=torch.float32)
    return x


def _pixart_call(model, x):
    added = {"resolution": x.get("resolution"), "aspect_ratio": x.get("aspect_ratio")}
    return model(x["hidden_states"], encoder_hidden_states=x["encoder_hidden_states"], timestep=x["timestep"],
                 added_cond_kwargs=added, encoder_attention_mask=x["encoder_attention_mask"], return_dict=False)[0]


# --- SD3: MMDiT, latents, text embeddings, pooled projections, float timestep -----------------------
def _sd3_inputs(model, batch, grid, text_len, g):
    c = model.config
    return {
        "hidden_states": _latents(model, batch, grid, g),
        "encoder_hidden_states": torch.randn(batch, text_len, c.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(batch, c.pooled_projection_dim, generator=g),
        "timestep": torch.rand(batch, generator=g) * 1000,
    }


def _sd3_call(model, x):
    return model(x["hidden_states"], encoder_hidden_states=x["encoder_hidden_states"],
                 pooled_projections=x["pooled_projections"], timestep=x["timestep"], return_dict=False)[0]


# --- Flux: packed latents [B, N, C], text, pooled, timestep in [0, 1], position ids -----------------
def _flux_inputs(model, batch, grid, text_len, g):
    c = model.config
    ids = torch.zeros(grid[0], grid[1], 3)
    ids[..., 1] = torch.arange(grid[0])[:, None]
    ids[..., 2] = torch.arange(grid[1])[None, :]
    x = {
        "hidden_states": torch.randn(batch, grid[0] * grid[1], c.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(batch, text_len, c.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(batch, c.pooled_projection_dim, generator=g),
        "timestep": torch.rand(batch, generator=g),
        "img_ids": ids.reshape(-1, 3),
        "txt_ids": torch.zeros(text_len, 3),
    }
    if c.guidance_embeds:
        x["guidance"] = torch.full((batch,), 3.5)
    return x


def _flux_call(model, x):
    return model(x["hidden_states"], encoder_hidden_states=x["encoder_hidden_states"],
                 pooled_projections=x["pooled_projections"], timestep=x["timestep"], img_ids=x["img_ids"],
                 txt_ids=x["txt_ids"], guidance=x.get("guidance"), return_dict=False)[0]


def _square_grid(model) -> tuple[int, int]:
    s = model.config.sample_size // model.config.patch_size
    return s, s


FAMILIES = {
    "DiTTransformer2DModel": Family("dit", "DiTTransformer2DModel", _dit_inputs, _dit_call,
                                    lambda m: m.config.patch_size, _square_grid,
                                    batch_inputs=("hidden_states", "timestep", "class_labels")),
    "PixArtTransformer2DModel": Family("pixart", "PixArtTransformer2DModel", _pixart_inputs, _pixart_call,
                                       lambda m: m.config.patch_size, _square_grid,
                                       batch_inputs=("hidden_states", "encoder_hidden_states", "encoder_attention_mask",
                                                     "timestep", "resolution", "aspect_ratio")),
    "SD3Transformer2DModel": Family("sd3", "SD3Transformer2DModel", _sd3_inputs, _sd3_call,
                                    lambda m: m.config.patch_size, _square_grid,
                                    batch_inputs=("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")),
    "FluxTransformer2DModel": Family("flux", "FluxTransformer2DModel", _flux_inputs, _flux_call,
                                     lambda m: 1, lambda m: (64, 64), timestep_scale=1e-3,
                                     batch_inputs=("hidden_states", "encoder_hidden_states", "pooled_projections",
                                                   "timestep", "guidance")),
}


def family_of(model: torch.nn.Module) -> Family:
    name = type(model).__name__
    if name not in FAMILIES:
        raise DitmergeError(f"unsupported model class {name}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]


class GraphWrapper(torch.nn.Module):
    """Flat tensor inputs -> the family's call; this is what torch.onnx.export traces."""

    def __init__(self, model: torch.nn.Module, family: Family, names: list[str]) -> None:
        super().__init__()
        self.model, self.family, self.names = model, family, names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.family.call(self.model, dict(zip(self.names, args)))
