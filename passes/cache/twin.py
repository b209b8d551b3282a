"""The step cache's eager twin: forward hooks on the diffusers model's blocks computing what the graph does.

``full``: run as usual and record, per stream, the output of block ``end-1`` minus the input of block
``start`` (and the image input as the front output). ``cached``: replace block ``end-1``'s output with the
recorded input plus the given residual, so the back blocks run on it (the span's blocks still run here,
their result is discarded: the twin checks the arithmetic, not the saving).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from passes.cache.rewrite import EPS


def model_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks in execution order, as :func:`passes.cache.block_paths` orders them."""
    return list(getattr(model, "transformer_blocks", [])) + list(getattr(model, "single_transformer_blocks", []))


class CacheTwin:
    """Args:
        model: the diffusers transformer.
        start, end: the span, blocks ``start..end-1``.
        variant: "full" or "cached".
        residuals: per stream ("image", "text"), the residual a cached run adds.
        front_ref: the front output of the last full step (cached, adaptive): ``outputs["change"]`` is recorded.
    """

    def __init__(self, model: torch.nn.Module, start: int, end: int, variant: str,
                 residuals: dict[str, torch.Tensor] | None = None, front_ref: torch.Tensor | None = None) -> None:
        self.model, self.start, self.end, self.variant = model, start, end, variant
        self.residuals = {k: torch.as_tensor(v) for k, v in (residuals or {}).items()}
        self.front_ref = None if front_ref is None else torch.as_tensor(front_ref)
        self.before: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[CacheTwin]:
        blocks = model_blocks(self.model)
        handles = [blocks[self.start].register_forward_pre_hook(self._pre, with_kwargs=True),
                   blocks[self.end - 1].register_forward_hook(self._post, with_kwargs=True)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _pre(self, _module, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        self.before = {"image": hs}
        ehs = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if ehs is not None:
            self.before["text"] = ehs
        self.outputs["front"] = hs
        if self.front_ref is not None:
            diff = (hs - self.front_ref).abs().mean(dim=(1, 2))
            self.outputs["change"] = diff / (self.front_ref.abs().mean(dim=(1, 2)) + EPS)

    def _post(self, _module, _args, _kwargs, output):
        # DiT / PixArt blocks return the image tokens; MMDiT blocks (SD3, Flux) (text, image)
        pairs = {"image": output} if torch.is_tensor(output) else {"text": output[0], "image": output[1]}
        pairs = {k: v for k, v in pairs.items() if v is not None and k in self.before}
        if self.variant == "full":
            for k, v in pairs.items():
                self.outputs[k] = v - self.before[k]
            return None
        # streams without a residual are those the graph drops after the span (Flux's last text output)
        new = {k: self.before[k] + self.residuals[k] for k in pairs if k in self.residuals}
        if torch.is_tensor(output):
            return new["image"]
        return (new.get("text", output[0]), new["image"])
