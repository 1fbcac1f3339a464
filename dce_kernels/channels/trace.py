"""The torch.fx analysis: which channels of a model depend on which.

How channels are linked (each conv's *output channels* are one "space"; the
analysis follows every tensor's list of spaces through the graph):

* Channel-wise ops that map a zero channel to a zero channel (ReLU and friends,
  pooling, dropout, interpolation, scaling by a number) pass the spaces
  through. A BatchNorm follows the spaces it normalizes (it becomes channel-sparse
  so that inactive channels stay exactly zero).
* Residual adds **tie** their two inputs' spaces into one group: the tied
  producers always activate the same channels, so a sum has exactly the group's
  channels. Why tying rather than a union of the two inputs' channels: with a
  union, the sum (and every block after it on an identity path) would carry
  the channels of all blocks of a stage, the channels a consumer must read could
  not be removed from the exported model, and the bandit's independence
  assumption (which the poster names as the reason skips hurt) would break
  further. Tying is what structured pruning does (Torch-Pruning's dependency
  groups); it selects a ResNet stage's residual stream as one group, so export
  shrinks whole stages consistently. An add whose inputs cannot be tied (an
  opaque tensor, a scalar, channel counts that differ) keeps its spaces full.
* Concatenation along channels lays the spaces side by side: a layer after it
  sees each group at an *offset*, and its active channels are the union of the
  offset-shifted selections (DenseNet).
* A depthwise conv (``groups == in_channels == out_channels``) carries its input
  spaces to its output: its input *and* output channels follow them (active
  outputs imply the active inputs of the same group). Other grouped convs read
  and write all their channels: a compact grouped conv needs the same number of
  channels in every group, which an arbitrary selection does not give.
* Flattening (``torch.flatten(x, 1)``, ``nn.Flatten()``, ``x.view(x.size(0), -1)``,
  a mean over H and W) into a ``Linear``: the Linear's columns follow the channels
  (column ``j`` reads channel ``j // (in_features / channels)``).
* Anything the analysis does not understand (an unknown op or module, slicing,
  reshapes, the model's outputs) keeps every space that flows into it full:
  correct, just not selected. The stem conv reads all of the image's channels;
  its output channels are selectable.

The model is traced in training and in eval mode and both graphs are analysed
together, so layers that run in one mode only (auxiliary heads) are linked too.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

import torch
import torch.fx
from torch import nn

from ..nn import ChannelSparseBatchNorm2d, ChannelSparseConv2d
from .group import ChannelSpec, GroupSpec
from .optable import (ADD_FUNCTIONS, ADD_METHODS, CAST_METHODS, CAT_NAMES, DIV_FUNCTIONS,
                      DIV_METHODS, ELEMENTWISE_MODULES, ELEMENTWISE_NAMES, METADATA_NAMES,
                      MUL_FUNCTIONS, MUL_METHODS, RESHAPE_METHODS, SPATIAL_MODULES,
                      SPATIAL_NAMES, SPATIAL_REDUCTIONS)
from .spaces import Analysis, Member, spec_from_analysis

__all__ = ["trace_modes", "link_graphs", "link_without_graph", "is_convertible_conv"]


def is_convertible_conv(m: nn.Module) -> bool:
    """A conv convert may make channel-sparse: exactly nn.Conv2d, or already ours."""
    return type(m) in (nn.Conv2d, ChannelSparseConv2d)


def _is_norm(m: nn.Module) -> bool:
    return type(m) in (nn.BatchNorm2d, ChannelSparseBatchNorm2d)


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def trace_modes(model: nn.Module, concrete_args: Optional[dict[str, Any]] = None
                ) -> list[torch.fx.Graph]:
    """The graphs of ``model``'s training and eval forwards (a model may run other
    layers in training, such as auxiliary heads, and all of them must agree on
    the channels). Raises what torch.fx raises; leaves the model's mode as it was."""
    was_training = model.training
    try:
        graphs = []
        for mode in (True, False):
            model.train(mode)
            graphs.append(_Tracer().trace(model, concrete_args=concrete_args))
        return graphs
    finally:
        model.train(was_training)


def link_graphs(model: nn.Module, graphs: Iterable[torch.fx.Graph], exclude: tuple[str, ...]
                ) -> tuple[ChannelSpec, list[tuple[str, torch.fx.Node]]]:
    """The channel groups of ``model`` from its graphs, and the in-place ops
    applied directly to a conv's output (``(conv name, node)``)."""
    analyzer = _Analyzer(dict(model.named_modules()), exclude)
    for graph in graphs:
        analyzer.run(graph)
    return spec_from_analysis(analyzer.a), analyzer.inplace_after


def _excluded(name: str, exclude: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in exclude)


def link_without_graph(model: nn.Module, exclude: tuple[str, ...]) -> ChannelSpec:
    """For a model fx cannot trace: every conv with ``groups == 1`` is its own
    group, whose readers are unknown."""
    groups, full = [], {}
    for name, m in model.named_modules():
        if not is_convertible_conv(m):
            continue
        if _excluded(name, exclude):
            full[name] = f"{name}: excluded by the caller"
        elif m.groups != 1:
            full[name] = f"{name}: grouped conv in a model fx could not trace"
        else:
            groups.append(GroupSpec(name, name=name, readers_known=False))
    return ChannelSpec(tuple(groups), tuple(full.items()))


class _Tracer(torch.fx.Tracer):
    """torch.fx's default leaves (torch.nn modules), plus our own layers."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (ChannelSparseConv2d, ChannelSparseBatchNorm2d)):
            return True
        return super().is_leaf_module(m, qualname)


def _target_name(target: Any) -> str:
    return getattr(target, "__name__", str(target))


def _is_torch_function(target: Any) -> bool:
    module = getattr(target, "__module__", None) or ""
    return module.startswith("torch") or module in ("operator", "_operator")


def _argument(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    args = node.args
    return args[index] if len(args) > index else default


def _is_inplace(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return bool(getattr(modules[node.target], "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_function":
        name = _target_name(node.target)
        if name.endswith("_") and not name.startswith("_"):
            return True
        if node.kwargs.get("inplace") is True:
            return True
        try:
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
        except (TypeError, ValueError):
            return False
        return bound.arguments.get("inplace") is True
    return False


# -- the layout of a tensor's channels --------------------------------------------------

Layout = tuple[int, ...]  # the spaces a (N, C, H, W) tensor's channels consist of, in order


@dataclass(frozen=True)
class _Flat:
    """A (N, C*H*W) tensor: the flattened channels of ``layout``."""

    layout: Layout


class _Analyzer:
    """Walks fx graphs, computing every node's channel layout. Several graphs of
    one model (its training and eval forwards) share one analysis: one space per
    conv module, and the members found in any graph."""

    def __init__(self, modules: dict[str, nn.Module], exclude: tuple[str, ...]) -> None:
        self.modules = modules
        self.exclude = exclude
        self.a = Analysis()
        # (conv name, node) of every in-place op applied directly to a conv's output
        self.inplace_after: list[tuple[str, torch.fx.Node]] = []
        self.value: dict[torch.fx.Node, Union[Layout, _Flat, None]] = {}

    # -- helpers -------------------------------------------------------------------

    def _val(self, arg):
        """The layout of an argument (None for constants and untracked values)."""
        return self.value.get(arg) if isinstance(arg, torch.fx.Node) else None

    def _layouts_in(self, args) -> list[Union[Layout, _Flat]]:
        found = []
        torch.fx.node.map_arg(args, lambda n: found.append(self.value.get(n)) or n)
        return [v for v in found if v is not None]

    def _keep_full(self, values: Iterable[Union[Layout, _Flat, None]], reason: str) -> None:
        for v in values:
            layout = v.layout if isinstance(v, _Flat) else v
            for s in layout or ():
                self.a.spaces.keep_full(s, reason)

    def _opaque(self, node: torch.fx.Node, reason: str) -> None:
        """An op we cannot see through: what flows into it stays full width."""
        self._keep_full(self._layouts_in((node.args, node.kwargs)), reason)
        self.value[node] = None

    def _tie(self, x, y, node: torch.fx.Node):
        sp = self.a.spaces
        lx = x.layout if isinstance(x, _Flat) else x
        ly = y.layout if isinstance(y, _Flat) else y
        if (isinstance(x, _Flat) != isinstance(y, _Flat) or len(lx) != len(ly)
                or any(sp.size[a] != sp.size[b] for a, b in zip(lx, ly))):
            self._keep_full([x, y], f"{node.name}: adds tensors whose channels do not line up")
            return x
        for a, b in zip(lx, ly):
            sp.union(a, b)
        return x

    def _space_of_conv(self, name: str, conv: nn.Conv2d) -> int:
        # A conv module called twice writes one set of active channels: one space.
        if name not in self.a.space_of:
            self.a.space_of[name] = self.a.spaces.new(conv.out_channels)
            self.a.order.append(name)
            if _excluded(name, self.exclude):
                self.a.spaces.keep_full(self.a.space_of[name], f"{name}: excluded by the caller")
        return self.a.space_of[name]

    def _record(self, layer: str, role: str, layout: Layout, total: int = 0) -> None:
        offset = 0
        for s in layout:
            self.a.members.append(Member(layer, role, s, offset, total))
            offset += self.a.spaces.size[s]

    def _channels(self, layout: Layout) -> int:
        return sum(self.a.spaces.size[s] for s in layout)

    # -- the walk ------------------------------------------------------------------

    def run(self, graph: torch.fx.Graph) -> Analysis:
        self.value = {}
        for node in graph.nodes:
            handler = getattr(self, f"_on_{node.op}")
            handler(node)
            if node.op == "call_module" and is_convertible_conv(self.modules[node.target]):
                for user in node.users:
                    if _is_inplace(user, self.modules):
                        self.inplace_after.append((node.target, user))
        return self.a

    def _on_placeholder(self, node):
        self.value[node] = None  # the image: its channels are not ours to select

    def _on_get_attr(self, node):
        self.value[node] = None

    def _on_output(self, node):
        self._opaque(node, "reaches the model's output")

    def _on_call_module(self, node):
        m = self.modules[node.target]
        x = self._val(node.args[0]) if node.args else None
        others = self._layouts_in((node.args[1:], node.kwargs))
        if others:
            self._opaque(node, f"{node.target}: module called with several channel inputs")
            return
        if x is None and (is_convertible_conv(m) or _is_norm(m) or type(m) is nn.Linear):
            self.a.opaque_calls.add(node.target)
        if is_convertible_conv(m):
            self.value[node] = self._conv(node.target, m, x)
        elif _is_norm(m):
            if isinstance(x, _Flat):
                self._opaque(node, f"{node.target}: BatchNorm2d on a flattened tensor")
                return
            if x is not None:
                self._record(node.target, "norms", x)
            self.value[node] = x
        elif type(m) is nn.Linear:
            if isinstance(x, _Flat):
                self._record(node.target, "linears", x.layout, self._channels(x.layout))
                self.value[node] = None
            else:
                self._opaque(node, f"{node.target}: Linear on a tensor that is not flattened")
        elif type(m) is nn.Flatten and x is not None and not isinstance(x, _Flat):
            if m.start_dim == 1 and m.end_dim == -1:
                self.value[node] = _Flat(x)
            else:
                self._opaque(node, f"{node.target}: Flatten(start_dim={m.start_dim})")
        elif type(m) in ELEMENTWISE_MODULES:
            self.value[node] = x
        elif type(m) in SPATIAL_MODULES and not isinstance(x, _Flat):
            self.value[node] = x
        else:
            self._opaque(node, f"{node.target}: {type(m).__name__} is not known to keep "
                               "channels apart")

    def _conv(self, name: str, conv: nn.Conv2d, x):
        if isinstance(x, _Flat):
            self._keep_full([x], f"{name}: conv on a flattened tensor")
            x = None
        if conv.groups == 1:
            if x is not None:
                self._record(name, "consumers", x)
            return (self._space_of_conv(name, conv),)
        if _is_depthwise(conv) and x is not None:
            self.a.order.append(name)
            if _excluded(name, self.exclude):
                self._keep_full([x], f"{name}: excluded by the caller")
            self._record(name, "depthwise", x)
            return x  # the same channels, carried through
        self._keep_full([x], f"{name}: grouped conv (groups={conv.groups}) reads all its inputs")
        space = self._space_of_conv(name, conv)
        self.a.spaces.keep_full(space, f"{name}: grouped conv (groups={conv.groups}) writes "
                                       "all its outputs")
        return (space,)

    def _on_call_function(self, node):
        target = node.target
        name = _target_name(target)
        values = self._layouts_in((node.args, node.kwargs))
        if not values:
            self.value[node] = None  # nothing of ours flows through here
            return
        if target is getattr:
            self.value[node] = None  # x.shape, x.dtype: metadata only
            return
        if not _is_torch_function(target):
            self._opaque(node, f"{node.name}: unknown function {name}")
            return
        x = self._val(node.args[0]) if node.args else None
        if target in ADD_FUNCTIONS:
            self._binary_add(node)
        elif target in MUL_FUNCTIONS or target in DIV_FUNCTIONS:
            self._binary_mul(node, divide=target in DIV_FUNCTIONS)
        elif name in CAT_NAMES:
            self._cat(node)
        elif name == "flatten":
            self._flatten(node, x, _argument(node, 1, "start_dim", 0),
                          _argument(node, 2, "end_dim", -1))
        elif name in SPATIAL_REDUCTIONS and x is not None:
            self._reduce_spatial(node, x)
        elif name == "reshape" and x is not None:
            self._view(node, x, _argument(node, 1, "shape"))
        elif x is not None and len(values) == 1 and (
                name in ELEMENTWISE_NAMES or (name in SPATIAL_NAMES and not isinstance(x, _Flat))):
            self.value[node] = x
        elif name in METADATA_NAMES:
            self.value[node] = None
        else:
            self._opaque(node, f"{node.name}: {name} is not known to keep channels apart")

    def _on_call_method(self, node):
        name = node.target
        values = self._layouts_in((node.args, node.kwargs))
        if not values:
            self.value[node] = None
            return
        x = self._val(node.args[0])
        if name in METADATA_NAMES:
            self.value[node] = None
        elif name in ADD_METHODS:
            self._binary_add(node)
        elif name in MUL_METHODS or name in DIV_METHODS:
            self._binary_mul(node, divide=name in DIV_METHODS)
        elif name == "flatten":
            self._flatten(node, x, _argument(node, 1, "start_dim", 0),
                          _argument(node, 2, "end_dim", -1))
        elif name in RESHAPE_METHODS and x is not None:
            shape = node.args[1:] if len(node.args) > 2 else _argument(node, 1, "shape")
            self._view(node, x, shape)
        elif name in SPATIAL_REDUCTIONS and x is not None:
            self._reduce_spatial(node, x)
        elif x is not None and len(values) == 1 and (
                name in ELEMENTWISE_NAMES or name in CAST_METHODS
                or (name in SPATIAL_NAMES and not isinstance(x, _Flat))):
            self.value[node] = x
        else:
            self._opaque(node, f"{node.name}: .{name}() is not known to keep channels apart")

    # -- the ops with rules of their own -----------------------------------------

    def _binary_add(self, node):
        a = node.args[0] if node.args else None
        b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        va, vb = self._val(a), self._val(b)
        if va is not None and vb is not None:
            self.value[node] = self._tie(va, vb, node)
        else:
            # Adding a number or an unrelated tensor turns zero channels non-zero.
            self._opaque(node, f"{node.name}: adds something that is not a conv's channels")

    def _binary_mul(self, node, divide: bool):
        a = node.args[0] if node.args else None
        b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        va, vb = self._val(a), self._val(b)
        if va is not None and isinstance(b, (int, float)):
            self.value[node] = va  # scaling keeps zeros zero
        elif not divide and vb is not None and isinstance(a, (int, float)):
            self.value[node] = vb
        elif not divide and va is not None and vb is not None:
            # x * y is zero where either is; tying keeps export consistent.
            self.value[node] = self._tie(va, vb, node)
        else:
            self._opaque(node, f"{node.name}: multiplies by a tensor of unknown channels")

    def _cat(self, node):
        tensors = _argument(node, 0, "tensors")
        dim = _argument(node, 1, "dim", 0)
        parts = [self._val(t) for t in (tensors if isinstance(tensors, (list, tuple)) else [])]
        if dim != 1 or not parts or any(p is None or isinstance(p, _Flat) for p in parts):
            self._opaque(node, f"{node.name}: concatenation that is not along the channels "
                               "of conv outputs")
            return
        self.value[node] = tuple(s for p in parts for s in p)

    def _flatten(self, node, x, start_dim, end_dim):
        if x is not None and not isinstance(x, _Flat) and start_dim == 1 and end_dim == -1:
            self.value[node] = _Flat(x)
        else:
            self._opaque(node, f"{node.name}: flatten(start_dim={start_dim}, end_dim={end_dim})")

    def _view(self, node, x, shape):
        # x.view(x.size(0), -1) / x.reshape(n, -1): flatten everything but the batch.
        if (not isinstance(x, _Flat) and isinstance(shape, (list, tuple)) and len(shape) == 2
                and shape[1] == -1 and isinstance(shape[0], torch.fx.Node)):
            self.value[node] = _Flat(x)
        else:
            self._opaque(node, f"{node.name}: reshape to {shape}")

    def _reduce_spatial(self, node, x):
        dims = _argument(node, 1, "dim")
        keepdim = _argument(node, 2, "keepdim", False)
        dims = set(dims) if isinstance(dims, (list, tuple)) else {dims}
        if isinstance(x, _Flat) or dims not in ({2, 3}, {-1, -2}):
            self._opaque(node, f"{node.name}: reduction over dims {sorted(dims, key=str)}")
        else:
            self.value[node] = x if keepdim else _Flat(x)  # (N, C): one feature per channel
