"""Find the attention and feed-forward modules of an exported DiT graph, by meaning.

The dynamo exporter stamps every node with the module path (``pkg.torch.onnx.name_scopes``) and the
module classes (``pkg.torch.onnx.class_hierarchy``) it came from. A module's nodes are the nodes whose
scope list contains its path; its boundary tensors are what those nodes read from outside and write to
outside. The image-token boundary is then checked by shape: ``[B, N, C]`` with ``N`` the token count.
A module that does not fit is not an exception but a :class:`Site` with a ``reason``.
"""

from __future__ import annotations

import collections
import dataclasses
import re

import onnx

from passes.onnxutil import constant_value, tensor_shapes  # tensor_shapes: re-exported for the passes that take it from here

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
CLASSES_KEY = "pkg.torch.onnx.class_hierarchy"

# transformer_blocks.3.attn1 -> ("transformer_blocks", "3", "attn1")
_MODULE_RE = re.compile(r"(?:^|\.)((single_transformer_blocks|transformer_blocks)\.(\d+))\.(attn1|attn2|attn|ff)$")

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


@dataclasses.dataclass
class Site:
    """One merge location: a sublayer whose image-token input and output get merged/unmerged."""

    path: str  # e.g. "transformer_blocks.3.attn1"
    block: str  # e.g. "transformer_blocks.3"
    index: int  # block index
    kind: str  # "attn" (self-attention), "xattn" (cross-attention queries), "joint" (MMDiT), "mlp"
    nodes: list[str]
    image_input: str | None = None
    image_output: str | None = None
    reason: str | None = None  # why this site cannot be merged; None when it can

    @property
    def ok(self) -> bool:
        return self.reason is None

    def fail(self, reason: str) -> Site:
        self.reason = reason
        return self


def _node_scopes(node: onnx.NodeProto) -> tuple[list[str], list[str]]:
    md = {p.key: p.value for p in node.metadata_props}
    scopes = _parse_list(md.get(SCOPES_KEY, "[]"))
    classes = _parse_list(md.get(CLASSES_KEY, "[]"))
    return scopes, classes


def _parse_list(text: str) -> list[str]:
    text = text.strip()
    if not text.startswith("["):
        return [text]
    # The exporter writes Python list reprs of strings; none of the entries contain quotes.
    return [s.strip().strip("'\"") for s in text[1:-1].split(",") if s.strip()]


def _kind(attr: str, block_class: str) -> str:
    if attr == "ff":
        return "mlp"
    if attr == "attn2":
        return "xattn"
    if attr == "attn1":
        return "attn"
    # "attn": MMDiT joint attention in SD3/Flux double blocks, a text+image sequence in Flux single blocks.
    if "Single" in block_class:
        return "single"
    return "joint"


def image_like(shapes: dict, name: str, num_tokens: int) -> bool:
    """A float ``[B, N, C]`` tensor (``shapes`` as :func:`tensor_shapes` gives them): the image-token stream."""
    elem, dims = shapes.get(name, (0, []))
    return elem in FLOAT_TYPES and dims is not None and len(dims) == 3 and dims[1] == num_tokens


@dataclasses.dataclass
class Topology:
    """Who writes and who reads each tensor of a shaped graph: what finding a module's boundary needs."""

    producers: dict[str, str]
    consumers: dict[str, set[str]]
    graph_outputs: set[str]
    inits: set[str]
    shapes: dict[str, tuple[int, list[int | str]]]
    num_tokens: int

    @classmethod
    def of(cls, model: onnx.ModelProto, num_tokens: int) -> Topology:
        consumers: dict[str, set[str]] = collections.defaultdict(set)
        for n in model.graph.node:
            for t in n.input:
                consumers[t].add(n.name)
        return cls({o: n.name for n in model.graph.node for o in n.output}, consumers,
                   {o.name for o in model.graph.output}, {i.name for i in model.graph.initializer},
                   tensor_shapes(model), num_tokens)

    def image_like(self, name: str) -> bool:
        return image_like(self.shapes, name, self.num_tokens)

    def boundary(self, nodes: list[onnx.NodeProto]) -> tuple[list[str], list[str]]:
        """The tensors ``nodes`` read from outside themselves (initializers aside) and those read outside them."""
        names = {n.name for n in nodes}
        ins = [t for n in nodes for t in n.input if t and t not in self.inits and self.producers.get(t) not in names]
        outs = [t for n in nodes for t in n.output if t in self.graph_outputs or self.consumers[t] - names]
        return list(dict.fromkeys(ins)), list(dict.fromkeys(outs))


def find_sites(model: onnx.ModelProto, num_tokens: int) -> list[Site]:
    """Every attention / feed-forward module of every transformer block, checked by shape.

    ``model`` must carry shapes (run shape inference first) and the exporter's scope metadata.
    """
    members: dict[str, list[onnx.NodeProto]] = collections.OrderedDict()
    info: dict[str, tuple[str, str, str, str]] = {}  # scope -> (block path, index, attribute, block class)
    for node in model.graph.node:
        scopes, classes = _node_scopes(node)
        for i, scope in enumerate(scopes):
            m = _MODULE_RE.search(scope)
            if not m:
                continue
            members.setdefault(scope, []).append(node)
            if scope not in info:
                block_class = classes[i - 1] if 0 < i <= len(classes) else ""
                info[scope] = (m.group(1), m.group(3), m.group(4), block_class)

    topo = Topology.of(model, num_tokens)
    shapes, image_like = topo.shapes, topo.image_like

    sites = []
    for scope, nodes in members.items():
        block_path, index, attr, block_class = info[scope]
        path = scope[scope.index(block_path):]
        site = Site(path=path, block=block_path, index=int(index), kind=_kind(attr, block_class),
                    nodes=[n.name for n in nodes])
        ins, outs = topo.boundary(nodes)
        baked = _baked_token_count(model, nodes, num_tokens)
        img_in = [t for t in ins if image_like(t)]
        img_out = [t for t in outs if image_like(t)]
        # [N + L, D] position tables (L symbolic with a dynamic prompt length; "batch" marks [B, C] embeddings)
        rotary = [t for t in ins if shapes.get(t, (0, []))[0] in FLOAT_TYPES and len(shapes[t][1]) == 2
                  and ((isinstance(shapes[t][1][0], int) and shapes[t][1][0] > num_tokens)
                       or (isinstance(shapes[t][1][0], str) and shapes[t][1][0] != "batch"))]
        if site.kind == "single":
            site.fail("text and image tokens share one sequence in this block")
        elif site.kind == "joint" and rotary:
            site.fail(f"rotary position embeddings ({rotary[0]}) span the joint sequence; merging them is not supported yet")
        elif baked:
            site.fail(f"the token count {num_tokens} is baked into {baked}")
        elif len(img_in) != 1:
            site.fail(f"expected one [B, {num_tokens}, C] input, found {len(img_in)}")
        elif len(img_out) != 1:
            site.fail(f"expected one [B, {num_tokens}, C] output, found {len(img_out)}")
        else:
            site.image_input, site.image_output = img_in[0], img_out[0]
        sites.append(site)
    sites.sort(key=lambda s: (s.block.startswith("single"), s.index, s.path))
    return sites


def _baked_token_count(model: onnx.ModelProto, nodes: list[onnx.NodeProto], num_tokens: int) -> str | None:
    """Name a Reshape / Slice / Split inside the module whose constant shape holds the token count."""
    positions = {"Reshape": (1,), "Slice": (1, 2), "Split": (1,), "Expand": (1,)}
    for n in nodes:
        for i in positions.get(n.op_type, ()):
            if i < len(n.input) and n.input[i]:
                v = constant_value(model, n.input[i])
                if v is not None and v.dtype.kind == "i" and num_tokens in v.reshape(-1).tolist():
                    return f"{n.op_type} {n.name}"
    return None
