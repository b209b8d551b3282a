"""Eager twin of an SDTM bucket graph: the same math as forward hooks on the diffusers model.

Built from the graph's ``sdtm`` metadata, so twin and graph merge at the same sites, read the same
inputs (counters, partition, caches) and produce the same extra outputs (counters, caches).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from passes.sdtm import eager as sdtm_math
from passes.tome import eager as tome_math
from passes.sdtm.rewrite import COUNTER_OUTPUT, cache_output
from passes.sdtm.graph import WindowGeometry
from passes.tome.twin import _image_arg


class SdtmTwin:
    """Run ``model`` as the SDTM graph described by ``meta`` would.

    Args:
        model: the diffusers transformer.
        meta: the graph's ``sdtm`` metadata (:class:`passes.sdtm.SdtmPass`).
        prompt: the graph's ``sdtm_prompt`` metadata (:class:`passes.sdtm.PromptWeightPass`), if any.
    """

    def __init__(self, model: torch.nn.Module, meta: dict, prompt: dict | None = None) -> None:
        self.model, self.meta, self.prompt = model, meta, prompt or {}
        self.counter: torch.Tensor | None = None
        self.partition: tuple[torch.Tensor, torch.Tensor] | None = None
        self.caches: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}  # extra graph outputs of the last forward, by graph name
        self._matches: dict[str, object] = {}
        self._state: torch.Tensor | None = None

    def set_inputs(self, counter=None, partition=None, caches: dict | None = None) -> None:
        """The graph's extra inputs: ``counter [B, N]``, ``(partition, inverse)``, caches by site path."""
        self.counter = None if counter is None else torch.as_tensor(counter, dtype=torch.float32)
        self.partition = None if partition is None else tuple(torch.as_tensor(p) for p in partition)
        self.caches = {k: torch.as_tensor(v) for k, v in (caches or {}).items()}

    @contextlib.contextmanager
    def installed(self) -> Iterator[SdtmTwin]:
        meta = self.meta
        handles = [self.model.register_forward_pre_hook(self._start),
                   self.model.register_forward_hook(self._finish)]
        for path in self.prompt.get("sites", []):  # prompt reweighting: scale attention before the out projection
            weight = self.prompt["weight"]
            handles.append(self.model.get_submodule(path).to_out[0].register_forward_pre_hook(
                lambda _m, args, w=weight: (args[0] * w, *args[1:])))
        if meta["variant"] == "full":
            for path in meta["cache_sites"]:
                handles.append(self.model.get_submodule(path).register_forward_hook(self._record(path)))
        else:
            merged = set(meta["sites"])
            for block, metric in meta["metric_sites"].items():
                if metric not in merged:
                    handles.append(self.model.get_submodule(metric).register_forward_pre_hook(
                        self._pre(block, merge=False), with_kwargs=True))
            for path in meta["cache_sites"]:
                block = path.rsplit(".", 1)[0]
                module = self.model.get_submodule(path)
                if path in merged:
                    handles.append(module.register_forward_pre_hook(self._pre(block, merge=True), with_kwargs=True))
                    handles.append(module.register_forward_hook(self._post(block, path), with_kwargs=True))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._matches.clear()

    def _start(self, *_):
        self._matches.clear()
        self.outputs = {}
        self._state = self.counter

    def _finish(self, *_):
        if self.meta["variant"] != "full":
            self.outputs[COUNTER_OUTPUT] = self._state

    def _match(self, block: str, x: torch.Tensor):
        if block in self._matches:
            return self._matches[block]
        meta = self.meta
        if self._state is None:
            raise RuntimeError("SdtmTwin.set_inputs(counter=...) was not called")
        if meta["merge"] == "window":
            mt = sdtm_math.window_match(x, self._state, WindowGeometry(tuple(meta["grid"]), meta["k"]), meta["a_s"])
            independent = mt.independent
        else:
            if self.partition is None:
                raise RuntimeError("SdtmTwin.set_inputs(partition=...) was not called")
            mt = tome_math.match(x, *self.partition, meta["num_src"], meta["r"], meta["bands"])
            independent = mt.row < meta["num_src"] - meta["r"]
        self._state = sdtm_math.counter_update(self._state, independent)
        self._matches[block] = (mt, independent)
        return self._matches[block]

    def _pre(self, block: str, merge: bool):
        def hook(_module, args, kwargs):
            x, rebuild = _image_arg(args, kwargs)
            mt, _ = self._match(block, x)
            if not merge:
                return None
            if self.meta["merge"] == "window":
                return rebuild(sdtm_math.window_merge(x, mt))
            return rebuild(tome_math.merge(x, mt))
        return hook

    def _post(self, block: str, path: str):
        def hook(_module, _args, _kwargs, output):
            mt, independent = self._matches[block]
            y = output[0] if isinstance(output, tuple) else output
            y = sdtm_math.gather_unmerge(y, mt.row)
            if self.meta.get("blend") is not None:
                y = sdtm_math.blend(y, self.caches[path], independent, self.meta["blend"])
            return (y, *output[1:]) if isinstance(output, tuple) else y
        return hook

    def _record(self, path: str):
        def hook(_module, _args, output):
            self.outputs[cache_output(path)] = (output[0] if isinstance(output, tuple) else output).detach().clone()
        return hook
