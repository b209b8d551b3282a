"""What each supported DiT family's transformer takes: its graph inputs, their axes and dtypes, its timesteps.

The one description both sides read: export (:mod:`export.families`) makes example inputs of these names,
dtypes and dynamic axes and exports them; the runtime (:mod:`runtime.transformer`) builds the same inputs
from the keyword arguments a diffusers pipeline passes to ``transformer(...)``.
"""

from __future__ import annotations

import dataclasses

import torch

from passes.errors import DitmergeError


@dataclasses.dataclass(frozen=True)
class FamilyInputs:
    name: str
    class_name: str
    # graph inputs in order; ``optional`` ones exist only for some configs (PixArt's size conditions, Flux's guidance)
    inputs: tuple[str, ...]
    optional: tuple[str, ...] = ()
    batch_inputs: tuple[str, ...] = ()  # inputs whose first axis is the batch
    # input -> its prompt-length axis: exported dynamic, since pipelines send their own prompt length
    text_inputs: dict[str, int] = dataclasses.field(default_factory=dict)
    dtypes: dict[str, str] = dataclasses.field(default_factory=dict)  # input -> torch dtype name; float32 if absent
    # inputs the pipeline passes inside a dict keyword argument: input -> that argument
    nested: dict[str, str] = dataclasses.field(default_factory=dict)
    timestep_scale: float = 1.0  # transformer timestep = scheduler timestep * scale
    # the timesteps its pipelines send (scheduler scale): "discrete" 0..T-1 (DDPM-trained: DDIM, DPM-Solver, ...)
    # or "flow" in [0, T] (flow matching: sigma * T, with 1000.0 at the first step)
    timesteps: str = "discrete"
    scheduler: str = "ddpm"  # the kind of scheduler its pipelines use: "ddpm" (epsilon/v on betas) or "flow"

    @property
    def kwargs(self) -> frozenset[str]:
        """The keyword arguments of a transformer call that the graph takes (besides hidden_states, timestep)."""
        return frozenset(self.nested.get(n, n) for n in self.inputs) - {"hidden_states", "timestep"}

    def dtype(self, name: str) -> str:
        return self.dtypes.get(name, "float32")

    def feed(self, hidden_states: object, timestep: object, kw: dict) -> dict[str, object]:
        """The graph inputs from a diffusers transformer call (None where the call leaves one out)."""
        values = {"hidden_states": hidden_states, "timestep": timestep}
        out = {}
        for name in self.inputs:
            if name in values:
                out[name] = values[name]
            elif name in self.nested:
                out[name] = (kw.get(self.nested[name]) or {}).get(name)
            else:
                out[name] = kw.get(name)
        if "encoder_attention_mask" in out and out["encoder_attention_mask"] is None:
            ehs = out.get("encoder_hidden_states")
            if ehs is not None:  # no mask: every prompt token counts
                out["encoder_attention_mask"] = torch.ones(ehs.shape[:2], dtype=torch.int64)
        return out


FAMILY_INPUTS = {f.name: f for f in [
    # DiT: class-conditional, latents [B, C, H, W], integer timestep, class_labels
    FamilyInputs("dit", "DiTTransformer2DModel", ("hidden_states", "timestep", "class_labels"),
                 batch_inputs=("hidden_states", "timestep", "class_labels"),
                 dtypes={"timestep": "int64", "class_labels": "int64"}),
    # PixArt: text-conditional, latents, T5 embeddings and their mask, integer timestep, size conditions
    FamilyInputs("pixart", "PixArtTransformer2DModel",
                 ("hidden_states", "encoder_hidden_states", "encoder_attention_mask", "timestep", "resolution",
                  "aspect_ratio"), optional=("resolution", "aspect_ratio"),
                 batch_inputs=("hidden_states", "encoder_hidden_states", "encoder_attention_mask", "timestep",
                               "resolution", "aspect_ratio"),
                 text_inputs={"encoder_hidden_states": 1, "encoder_attention_mask": 1},
                 dtypes={"encoder_attention_mask": "int64", "timestep": "int64"},
                 nested={"resolution": "added_cond_kwargs", "aspect_ratio": "added_cond_kwargs"}),
    # SD3: MMDiT, latents, text embeddings, pooled projections, float timestep (flow matching)
    FamilyInputs("sd3", "SD3Transformer2DModel",
                 ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"),
                 batch_inputs=("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"),
                 text_inputs={"encoder_hidden_states": 1}, timesteps="flow", scheduler="flow"),
    # Flux: packed latents [B, N, C], text, pooled, timestep in [0, 1], position ids, guidance
    FamilyInputs("flux", "FluxTransformer2DModel",
                 ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids",
                  "guidance"), optional=("guidance",),
                 batch_inputs=("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance"),
                 text_inputs={"encoder_hidden_states": 1, "txt_ids": 0}, timestep_scale=1e-3, timesteps="flow",
                 scheduler="flow"),
]}


def family_inputs(name: str) -> FamilyInputs:
    """The inputs of family ``name`` (as a plan records it: dit, pixart, sd3, flux)."""
    if name not in FAMILY_INPUTS:
        raise DitmergeError(f"plan is for an unknown model family {name!r}; known: {', '.join(FAMILY_INPUTS)}")
    return FAMILY_INPUTS[name]
