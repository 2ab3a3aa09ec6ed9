"""Turn any family's network into a sparse runtime network: ``SparseConv2d`` convs, fused epilogues.

``sparsify(module, model_file)``:
1. loads every tensor of the file into ``module`` (typically built on the meta device: nothing
   was allocated for it), replacing each eligible ``nn.Conv2d`` by a ``SparseConv2d`` and keeping
   every other layer (ineligible convs included) dense;
2. traces the network with ``torch.fx`` and fuses into the convs' epilogues what follows them
   (see ``_PASSES``): an activation, a pixel shuffle, a residual add with a constant scale;
3. gives every conv whose output only other convs read a buffer kept across forwards
   (``_keep_outputs``; the graph's output is never one).

A forward that cannot be traced (data-dependent control flow, e.g. RRDBNet x2's padding of odd
sizes) keeps its own layers unfused and its children are traced one by one instead: fusions are
an optimisation, the result is correct either way.
"""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

from sparsesr.errors import BackendError
from sparsesr.format.reader import SparseModelFile
from sparsesr.runtime.conv import SparseConv2d
from sparsesr.runtime.kept import KeptOutputs

ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.PReLU)


def sparsify(module: nn.Module, model_file: SparseModelFile, backend: str = "auto") -> nn.Module:
    """``module`` (the file's network, on any device, meta included) with the file's tensors,
    ``SparseConv2d`` for every eligible conv and fused epilogues. Returns a new module (a
    ``torch.fx.GraphModule`` when the whole forward traces); ``module`` itself is changed too."""
    _replace_convs(module, model_file, backend)
    _load_other_tensors(module, model_file)
    return _fused(module)


# --- loading ------------------------------------------------------------------------------------


def is_eligible(conv: nn.Module) -> bool:
    """Whether ``SparseConv2d`` computes exactly what ``conv`` does: a plain ``nn.Conv2d`` (a
    subclass may compute something else), stride 1, no dilation or groups, zero padding that keeps
    the size (odd kernel, ``k // 2`` on each side)."""
    if type(conv) is not nn.Conv2d:
        return False
    kh, kw = conv.kernel_size
    same = conv.padding == "same" or tuple(conv.padding) == (kh // 2, kw // 2)
    return (kh % 2 == 1 and kw % 2 == 1 and same and conv.padding_mode == "zeros"
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1)


def _replace_convs(module: nn.Module, model_file: SparseModelFile, backend: str) -> None:
    """Every eligible conv of the file -> ``SparseConv2d``; the others get their dense weight."""
    replaced: dict[int, SparseConv2d] = {}  # a conv reachable under two names stays one module
    for name, conv in list(module.named_modules(remove_duplicate=False)):
        layer = model_file.layers.get(name)
        if layer is None or not isinstance(conv, nn.Conv2d):
            continue
        if not is_eligible(conv):
            weight = layer.to_dense().to(conv.weight.dtype, copy=True)
            conv.weight = nn.Parameter(weight, requires_grad=False)
            continue
        if id(conv) not in replaced:
            replaced[id(conv)] = SparseConv2d(layer, model_file.tensors.get(f"{name}.bias"), backend=backend)
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent), child, replaced[id(conv)])


def _load_other_tensors(module: nn.Module, model_file: SparseModelFile) -> None:
    """Biases of dense convs, PReLU weights, buffers: from the file, in the module's own dtype
    (the file stores them all as fp32, BatchNorm's int64 ``num_batches_tracked`` too)."""
    for owner_name, owner in module.named_modules():
        if isinstance(owner, SparseConv2d):  # holds its tensors already
            continue
        for kind in ("_parameters", "_buffers"):
            for name, tensor in list(getattr(owner, kind).items()):
                key = f"{owner_name}.{name}" if owner_name else name
                if tensor is None or (isinstance(owner, nn.Conv2d) and name == "weight" and owner_name in model_file.layers):
                    continue  # absent, or a dense conv's weight (loaded from its layer)
                if key not in model_file.tensors:  # the file holds the whole state dict (the reader checks)
                    raise BackendError(f"{model_file.source}: the network has a tensor {key!r} that is not "
                                       "stored in the file (a non-persistent buffer?); it cannot be built")
                value = model_file.tensors[key].to(tensor.dtype, copy=True)  # copies: the file's stay untouched
                setattr(owner, name, nn.Parameter(value, requires_grad=False) if kind == "_parameters" else value)


# --- tracing --------------------------------------------------------------------------------------


class _Tracer(fx.Tracer):
    """Keeps ``SparseConv2d`` calls as single nodes (they are what the passes fuse into)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, SparseConv2d) or super().is_leaf_module(m, qualname)


def _trace(module: nn.Module) -> fx.GraphModule:
    return fx.GraphModule(module, _Tracer().trace(module), module.__class__.__name__)


def _fused(module: nn.Module) -> nn.Module:
    """``module`` traced and fused; if its forward does not trace, its children one by one."""
    if isinstance(module, SparseConv2d) or not any(isinstance(m, SparseConv2d) for m in module.modules()):
        return module  # nothing to fuse into
    try:
        traced = _trace(module)
    except Exception:  # noqa: BLE001 - fx raises several types for untraceable code; fusing is optional
        for name, child in list(module.named_children()):
            setattr(module, name, _fused(child))
        return module
    calls = [n.target for n in traced.graph.nodes if n.op == "call_module"]
    for fuse in _PASSES:
        fuse(traced, calls)
    traced.graph.eliminate_dead_code()
    _keep_outputs(traced)
    traced.graph.lint()
    traced.recompile()
    traced.delete_all_unused_submodules()  # the fused activations and shuffles
    # The parent's forward (or a caller) may read plain attributes such as a config or a scale.
    for name, value in vars(module).items():
        if not name.startswith("_") and name != "training" and not hasattr(traced, name):
            setattr(traced, name, value)
    return traced


# --- fusion passes: each rewrites ``y = f(conv(x))`` into ``y = conv(x)`` with f in the epilogue -----


def _conv_of(gm: fx.GraphModule, node: object, calls: list[str]) -> SparseConv2d | None:
    """The ``SparseConv2d`` that ``node`` calls, if its output may be fused into: called once in
    the whole graph (fusing changes the module, so every call of it), used by one node only, and
    with no residual yet (an activation or a shuffle cannot come after the residual add)."""
    if not (isinstance(node, fx.Node) and node.op == "call_module" and len(node.users) == 1 and not node.kwargs):
        return None
    module = gm.get_submodule(node.target)
    return module if isinstance(module, SparseConv2d) and calls.count(node.target) == 1 else None


def _absorb(node: fx.Node, into: fx.Node, gm: fx.GraphModule) -> None:
    """Drop ``node`` from the graph: its users read ``into`` (which now computes it) instead."""
    node.replace_all_uses_with(into)
    gm.graph.erase_node(node)


def _fuse_activations(gm: fx.GraphModule, calls: list[str]) -> None:
    """conv -> ReLU / LeakyReLU / PReLU module: the activation in the epilogue.

    After a pixel-shuffled conv only a scalar slope is fused: shuffling moves values between
    channels, so it commutes with an elementwise function of one slope, not with PReLU's slope per
    channel (those slopes index the shuffled channels, not the conv's).
    """
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        act = gm.get_submodule(node.target)
        conv = _conv_of(gm, node.args[0], calls) if isinstance(act, ACTIVATIONS) else None
        if conv is None or (conv.shuffle > 1 and isinstance(act, nn.PReLU) and act.weight.numel() > 1):
            continue
        if conv.fuse_activation(act):
            _absorb(node, node.args[0], gm)


def _fuse_pixel_shuffles(gm: fx.GraphModule, calls: list[str]) -> None:
    """conv -> PixelShuffle module: the conv stores its output shuffled (no pass of its own)."""
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        shuffle = gm.get_submodule(node.target)
        conv = _conv_of(gm, node.args[0], calls) if isinstance(shuffle, nn.PixelShuffle) else None
        if conv is not None and conv.shuffle == 1:
            conv.shuffle = int(shuffle.upscale_factor)
            _absorb(node, node.args[0], gm)


_ADDS = (operator.add, torch.add)
_MULS = (operator.mul, torch.mul)


def _scaled_conv(gm: fx.GraphModule, node: object, calls: list[str]) -> tuple[fx.Node, float] | None:
    """``(conv node, c)`` when ``node`` is ``conv(x)`` (c = 1) or ``conv(x) * c`` / ``c * conv(x)``
    with a constant number c, and the conv may take a residual (not pixel-shuffled)."""
    scale = 1.0
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target in _MULS \
            and len(node.args) == 2 and not node.kwargs and len(node.users) == 1:
        a, b = node.args
        node, scale = (a, b) if isinstance(b, (int, float)) else (b, a)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            return None
    conv = _conv_of(gm, node, calls)
    return (node, float(scale)) if conv is not None and conv.shuffle == 1 else None


def _fuse_residuals(gm: fx.GraphModule, calls: list[str]) -> None:
    """``other + conv(x) * c`` (either order, c = 1 without the product) -> ``conv(x, residual=other,
    res_scale=c)``: the add happens in the epilogue, not in a pass over memory of its own.

    ``other`` must be a tensor computed in the graph (not a constant); a residual of another shape
    (broadcasting) is handled by ``SparseConv2d`` itself. In-place adds (``+=``) are left alone:
    they write into ``other``, which someone else may read.
    """
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _ADDS or len(node.args) != 2 or node.kwargs:
            continue
        for term, other in (node.args, node.args[::-1]):
            found = _scaled_conv(gm, term, calls)
            if found is None or not isinstance(other, fx.Node) or other is term:
                continue
            conv_node, scale = found
            product = term if term is not conv_node else None
            node.prepend(conv_node)  # after ``other``, which the graph may compute after the conv
            conv_node.kwargs = {"residual": other, "res_scale": scale}
            _absorb(node, conv_node, gm)
            if product is not None:
                gm.graph.erase_node(product)
            break


# Activations before shuffles (a per-channel PReLU fuses only there), then the activations after a
# shuffle, then the residual adds (which come after the activation in the epilogue).
_PASSES = (_fuse_activations, _fuse_pixel_shuffles, _fuse_activations, _fuse_residuals)


# --- kept output buffers ------------------------------------------------------------------------------


def _keep_outputs(gm: fx.GraphModule) -> None:
    """Every conv call whose output only other conv calls read (as input or residual) writes into
    a buffer kept across forwards: ``conv(x, out=kept_outputs(conv, x, slot))``.

    Slots are shared by lifetime: a value's slot is free again once its last reader has run, and
    a call never writes into the slot of a value it reads (the kernel's ``out`` must not overlap
    its inputs). A chain of residual blocks takes three (block input, middle, block output).
    Values read by anything else (a torch op, the graph's output) stay fresh tensors: those ops
    may return views of them or keep them, and the caller keeps the output.
    """
    def is_conv(node: fx.Node) -> bool:
        return node.op == "call_module" and isinstance(gm.get_submodule(node.target), SparseConv2d)

    def takes_out(node: fx.Node) -> bool:  # conv(x) or conv(x, residual=..., res_scale=...)
        return is_conv(node) and len(node.args) == 1 and set(node.kwargs) <= {"residual", "res_scale"}

    kept = {n for n in gm.graph.nodes if takes_out(n) and n.users and all(is_conv(u) for u in n.users)}
    if not kept:
        return
    last_reader = {value: node for node in gm.graph.nodes for value in node.all_input_nodes}
    slot_of: dict[fx.Node, int] = {}
    free: list[int] = []
    for node in gm.graph.nodes:
        if node in kept:  # before freeing what this call reads: its output must not overlap them
            slot_of[node] = free.pop() if free else len(set(slot_of.values()))
        for value in node.all_input_nodes:
            if value in slot_of and last_reader[value] is node:
                free.append(slot_of[value])
    gm.add_module("kept_outputs", KeptOutputs())
    for node, slot in slot_of.items():
        with gm.graph.inserting_before(node):
            conv = gm.graph.get_attr(node.target)
            out = gm.graph.call_module("kept_outputs", (conv, node.args[0], slot))
        node.kwargs = {**node.kwargs, "out": out}
