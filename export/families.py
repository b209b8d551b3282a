"""How each supported diffusers DiT family is exported: its example inputs, its call, its token grid.

One recipe per family, each readable on its own (diffusers' single-file habit): the inputs are those
its pipeline passes to ``transformer(...)``. Their names, axes, dtypes and the family's timesteps are
:mod:`runtime.families` (what the runtime feeds); this module adds what only export needs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from passes.errors import DitmergeError
from runtime.families import FAMILY_INPUTS, FamilyInputs


@dataclasses.dataclass(frozen=True, kw_only=True)
class Family(FamilyInputs):
    # (model, batch, grid, text_len, generator) -> ordered dict of example inputs, named as the graph inputs
    example_inputs: Callable[[torch.nn.Module, int, tuple[int, int], int, torch.Generator], dict[str, torch.Tensor]]
    # model.forward keyword arguments from the flat graph inputs
    call: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    default_grid: Callable[[torch.nn.Module], tuple[int, int]]
    # how its pipeline sets the scheduler's timesteps: (scheduler, steps, image tokens) -> None
    set_timesteps: Callable[[object, int, int | None], None] = lambda sched, steps, tokens: sched.set_timesteps(steps)

    def check_inputs(self, inputs: dict[str, torch.Tensor]) -> None:
        """Example inputs must be the runtime's (:mod:`runtime.families`): same names, order and dtypes."""
        want = [n for n in self.inputs if n in inputs or n not in self.optional]
        got = {n: str(v.dtype).removeprefix("torch.") for n, v in inputs.items()}
        if list(got) != want or any(got[n] != self.dtype(n) for n in want):
            raise DitmergeError(f"{self.name} example inputs {got} differ from runtime.families "
                                f"{ {n: self.dtype(n) for n in want} }")


def _recipe(name: str, example_inputs, call, default_grid, **export_only) -> Family:
    spec = FAMILY_INPUTS[name]
    return Family(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(FamilyInputs)},
                  example_inputs=example_inputs, call=call, default_grid=default_grid, **export_only)


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


def flow_shift_mu(image_tokens: int, base_tokens: int, max_tokens: int, base_shift: float, max_shift: float) -> float:
    """The resolution-dependent shift ``mu`` of flow-matching pipelines: linear in the image token count,
    ``base_shift`` at ``base_tokens`` and ``max_shift`` at ``max_tokens`` (and extrapolated beyond)."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return slope * image_tokens + (base_shift - slope * base_tokens)  # this order: the pipelines' float rounding


def _mu(sched, image_tokens: int | None, default_max_shift: float) -> float:
    if image_tokens is None:
        raise DitmergeError(f"{type(sched).__name__} shifts its timesteps by resolution (use_dynamic_shifting); "
                            "step schedules need the image token count (the plan's grid) to be placed")
    c = sched.config
    return flow_shift_mu(image_tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                         c.get("base_shift", 0.5), c.get("max_shift", default_max_shift))


def _sd3_set_timesteps(sched, steps: int, image_tokens: int | None) -> None:
    """StableDiffusion3Pipeline: the scheduler's own spacing (its fixed ``shift``: 1000.0 first); with
    dynamic shifting ``mu`` from the token count (its fallback max shift is 1.16, Flux's 1.15)."""
    if sched.config.get("use_dynamic_shifting", False):
        sched.set_timesteps(steps, mu=_mu(sched, image_tokens, 1.16))
    else:
        sched.set_timesteps(steps)


def _flux_set_timesteps(sched, steps: int, image_tokens: int | None) -> None:
    """FluxPipeline: sigmas ``linspace(1, 1/steps, steps)`` (unless the scheduler makes its own flow
    sigmas), shifted by ``mu`` from the packed latents' token count, which is the plan's grid."""
    import numpy as np

    sigmas = None if sched.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
    mu = _mu(sched, image_tokens, 1.15) if sched.config.get("use_dynamic_shifting", False) else None
    if sigmas is None:
        sched.set_timesteps(steps, mu=mu)
    else:
        sched.set_timesteps(sigmas=sigmas, mu=mu)


def _square_grid(model) -> tuple[int, int]:
    s = model.config.sample_size // model.config.patch_size
    return s, s


FAMILIES = {f.class_name: f for f in [
    _recipe("dit", _dit_inputs, _dit_call, _square_grid),
    _recipe("pixart", _pixart_inputs, _pixart_call, _square_grid),
    _recipe("sd3", _sd3_inputs, _sd3_call, _square_grid, set_timesteps=_sd3_set_timesteps),
    _recipe("flux", _flux_inputs, _flux_call, lambda m: (64, 64), set_timesteps=_flux_set_timesteps),
]}


def pipeline_scheduler(scheduler_config: dict | None, num_train_timesteps: int = 1000):
    """The sampler the model's pipeline runs: the scheduler saved beside the model, except a training-only
    DDPMScheduler, which pipelines (and ``runtime.generate``) replace by DDIM on the same betas."""
    import diffusers

    cfg = dict(scheduler_config or {})
    name = cfg.pop("_class_name", "DDIMScheduler")
    if name == "DDPMScheduler":
        name = "DDIMScheduler"
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "set_timesteps"):
        raise DitmergeError(f"the model's scheduler {name} is not a diffusers scheduler this diffusers knows")
    cfg.setdefault("num_train_timesteps", num_train_timesteps)
    return cls.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})


def reference_timesteps(scheduler_config: dict | None, steps: int, num_train_timesteps: int = 1000,
                        family: Family | None = None, image_tokens: int | None = None) -> list[float]:
    """The timesteps the model's own pipeline scheduler sends for ``steps`` steps, noisiest first.

    Step-based schedules (SDTM's stages, CA-ToMe's checkpoints) are placed on these, so they follow DDIM
    "leading", DPM-Solver "linspace", a flow-matching shift or any other spacing as the pipeline runs it.
    ``family``: whose pipeline sets the timesteps (Flux's passes its own sigmas; None: the scheduler's
    ``set_timesteps(steps)``); ``image_tokens``: the plan's grid, which a resolution-dependent shift
    (Flux) needs. Without a scheduler config beside the model: diffusers' DDIMScheduler defaults.
    """
    sched = pipeline_scheduler(scheduler_config, num_train_timesteps)
    pipeline_set_timesteps(sched, family, steps, image_tokens)
    return [float(t) for t in sched.timesteps]


def pipeline_set_timesteps(sched, family: Family | None, steps: int, image_tokens: int | None = None) -> None:
    """``sched.set_timesteps`` as ``family``'s pipeline calls it for ``steps`` steps at ``image_tokens`` tokens."""
    if family is not None:
        family.set_timesteps(sched, steps, image_tokens)
    elif sched.config.get("use_dynamic_shifting", False):
        sched.set_timesteps(steps, mu=_mu(sched, image_tokens, 1.15))
    else:
        sched.set_timesteps(steps)


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


class BroadcastMaskAttnProcessor:
    """Scaled-dot-product attention with the mask broadcast over heads, for export only.

    The math of diffusers' ``AttnProcessor2_0`` for plain (non-spatial, 3-D) attention, except that a
    ``[B, 1, L]`` mask is broadcast to ``[B, 1, Nq, L]`` instead of being repeated per head and viewed as
    ``[B, heads, -1, L]``: torch.export cannot prove that ``-1`` is 1 when the batch is dynamic.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        import torch.nn.functional as F

        b = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        d = k.shape[-1] // attn.heads
        q, k, v = (t.view(b, -1, attn.heads, d).transpose(1, 2) for t in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if attention_mask is not None and attention_mask.ndim == 3:
            # [B, 1, L] -> [B, 1, Nq, L]: onnxruntime's Attention wants the query axis in full, and adding a
            # zero slice of q takes Nq from q at run time (a constant would bake the token count in)
            attention_mask = attention_mask[:, None] + q[:, :1, :, :1].detach() * 0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * d).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def export_processors(model: torch.nn.Module) -> dict | None:
    """Processors to export ``model`` with (None: keep its own). PixArt's masked cross-attention needs one."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    if type(model).__name__ != "PixArtTransformer2DModel":
        return None
    procs = {}
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            plain = (isinstance(module.processor, AttnProcessor2_0) and module.spatial_norm is None
                     and module.group_norm is None and not module.residual_connection)
            procs[f"{name}.processor"] = BroadcastMaskAttnProcessor() if plain else module.processor
    return procs
