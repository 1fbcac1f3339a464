"""Make an existing model channel-sparse: ``dce_kernels.convert(model)``.

``convert`` traces the model with torch.fx, works out which channels depend on
which (the analysis below), replaces every *eligible* ``nn.Conv2d`` by a
:class:`~dce_kernels.nn.ChannelSparseConv2d` and every ``nn.BatchNorm2d`` that
sees selectable channels by a :class:`~dce_kernels.nn.ChannelSparseBatchNorm2d`,
and records the channel groups on the model, where
:func:`dce_kernels.channels.plan_for` finds them. Like
``nn.SyncBatchNorm.convert_sync_batchnorm`` it changes the model in place
(``copy=True`` converts a deep copy instead) and the new layers *share* the old
layers' parameters and buffers (the same tensors, not copies), so an optimizer
or a reference to a parameter taken before conversion keeps working and the
``state_dict`` keys stay as they were. Nothing else changes: with all channels
active the converted model computes exactly what the original computes, with
the same gradients.

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

Eligible: an ``nn.Conv2d`` (exactly that class, or already a
``ChannelSparseConv2d``) that produces, carries or reads a selectable group.
Other convs stay plain ``nn.Conv2d`` (nothing to skip there).

Saliency needs each sparse conv's output unmodified in backward. An in-place
module applied directly to a converted conv's output (``nn.ReLU(inplace=True)``
right after a conv without BatchNorm) is switched to ``inplace=False`` (same
result, one more tensor). An in-place *function or method* there
(``F.relu(x, inplace=True)``, ``x.relu_()``) cannot be switched from outside:
that conv gets ``track_saliency = False`` and a warning. Python's ``x += y`` on a
conv's output is invisible to torch.fx (it traces as ``x + y``) and makes
backward raise; use ``x = x + y`` there.

Models torch.fx cannot trace (e.g. ``if x.sum() > 0:`` in ``forward``) still
convert, with a warning saying why: every ``nn.Conv2d`` with ``groups == 1``
becomes its own group, which reads all its input channels (correct, slower);
BatchNorms stay dense (so an inactive channel leaves its BatchNorm as the shift
``beta``), and no compact model can be exported from a partial selection.
"""
from __future__ import annotations

import copy as copy_module
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Union

import torch
import torch.fx
from torch import nn

from ..nn import ChannelSparseBatchNorm2d, ChannelSparseConv2d
from .optable import (ADD_FUNCTIONS, ADD_METHODS, CAST_METHODS, CAT_NAMES, DIV_FUNCTIONS,
                      DIV_METHODS, ELEMENTWISE_MODULES, ELEMENTWISE_NAMES, METADATA_NAMES,
                      MUL_FUNCTIONS, MUL_METHODS, RESHAPE_METHODS, SPATIAL_MODULES,
                      SPATIAL_NAMES, SPATIAL_REDUCTIONS)
from .group import SPEC_ATTR, ChannelSpec, GroupSpec, recorded_spec

__all__ = ["convert", "conversion_notes"]

def _is_conv(m: nn.Module) -> bool:
    return type(m) in (nn.Conv2d, ChannelSparseConv2d)


def _is_norm(m: nn.Module) -> bool:
    return type(m) in (nn.BatchNorm2d, ChannelSparseBatchNorm2d)


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


# -- the layout of a tensor's channels --------------------------------------------------

Layout = tuple[int, ...]  # the spaces a (N, C, H, W) tensor's channels consist of, in order


@dataclass(frozen=True)
class _Flat:
    """A (N, C*H*W) tensor: the flattened channels of ``layout``."""

    layout: Layout


class _Spaces:
    """Union-find over channel spaces (one per conv module) with a "keep full" mark."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.conv: list[str] = []        # the conv module whose outputs the space is
        self.reason: dict[int, str] = {}  # root -> why its channels must stay full

    def new(self, size: int, conv: str) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.conv.append(conv)
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        self.parent[rb] = ra
        if rb in self.reason and ra not in self.reason:
            self.reason[ra] = self.reason[rb]
        self.reason.pop(rb, None)

    def keep_full(self, s: int, reason: str) -> None:
        self.reason.setdefault(self.find(s), reason)

    def is_full(self, s: int) -> bool:
        return self.find(s) in self.reason


@dataclass
class _Use:
    """A layer that reads (or, for depthwise convs, also writes) a space at an offset."""

    layer: str
    role: str  # "consumer", "depthwise", "norm", "linear"
    space: int
    offset: int
    total: int = 0  # for linears: channels of the flattened map


@dataclass
class _Analysis:
    spaces: _Spaces = field(default_factory=_Spaces)
    space_of: dict[str, int] = field(default_factory=dict)  # conv name -> its output space
    uses: list[_Use] = field(default_factory=list)
    inplace_after: list[tuple[str, torch.fx.Node]] = field(default_factory=list)
    opaque_calls: set[str] = field(default_factory=set)  # layers also run on unknown channels
    order: list[str] = field(default_factory=list)  # conv names in the order they run


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


class _Analyzer:
    """Walks fx graphs, computing every node's channel layout. Several graphs of
    one model (its training and eval forwards) share one analysis: one space per
    conv module, and every use of any graph."""

    def __init__(self, modules: dict[str, nn.Module], exclude: tuple[str, ...]) -> None:
        self.modules = modules
        self.exclude = exclude
        self.a = _Analysis()
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

    def _excluded(self, name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in self.exclude)

    def _space_of_conv(self, name: str, conv: nn.Conv2d) -> int:
        # A conv module called twice writes one set of active channels: one space.
        if name not in self.a.space_of:
            self.a.space_of[name] = self.a.spaces.new(conv.out_channels, name)
            self.a.order.append(name)
            if self._excluded(name):
                self.a.spaces.keep_full(self.a.space_of[name], f"{name}: excluded by the caller")
        return self.a.space_of[name]

    def _record(self, layer: str, role: str, layout: Layout, total: int = 0) -> None:
        offset = 0
        for s in layout:
            self.a.uses.append(_Use(layer, role, s, offset, total))
            offset += self.a.spaces.size[s]

    def _channels(self, layout: Layout) -> int:
        return sum(self.a.spaces.size[s] for s in layout)

    # -- the walk ------------------------------------------------------------------

    def run(self, graph: torch.fx.Graph) -> _Analysis:
        self.value = {}
        for node in graph.nodes:
            handler = getattr(self, f"_on_{node.op}")
            handler(node)
            if node.op == "call_module" and _is_conv(self.modules[node.target]):
                for user in node.users:
                    if _is_inplace(user, self.modules):
                        self.a.inplace_after.append((node.target, user))
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
        if x is None and (_is_conv(m) or _is_norm(m) or type(m) is nn.Linear):
            self.a.opaque_calls.add(node.target)
        if _is_conv(m):
            self.value[node] = self._conv(node.target, m, x)
        elif _is_norm(m):
            if isinstance(x, _Flat):
                self._opaque(node, f"{node.target}: BatchNorm2d on a flattened tensor")
                return
            if x is not None:
                self._record(node.target, "norm", x)
            self.value[node] = x
        elif type(m) is nn.Linear:
            if isinstance(x, _Flat):
                self._record(node.target, "linear", x.layout, self._channels(x.layout))
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
                self._record(name, "consumer", x)
            return (self._space_of_conv(name, conv),)
        if _is_depthwise(conv) and x is not None:
            self.a.order.append(name)
            if self._excluded(name):
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


# -- from the analysis to channel groups ---------------------------------------------------

def _keep_conflicts_full(a: _Analysis) -> None:
    """A layer follows one channel list per role. Groups it cannot follow stay
    full: a group it sees at two offsets, groups that overlap other channels it
    sees (a module called on several tensors), flattened maps of different sizes,
    and every group of a layer that is also called on a tensor of unknown channels."""
    sp = a.spaces
    by_layer: dict[tuple[str, str], set[tuple[int, int, int, int]]] = {}
    for u in a.uses:
        by_layer.setdefault((u.layer, u.role), set()).add(
            (u.offset, u.offset + sp.size[u.space], u.space, u.total))
    changed = True
    while changed:
        changed = False
        for (layer, role), uses in by_layer.items():
            spans = sorted({(lo, hi, sp.find(s), t) for lo, hi, s, t in uses})
            bad = set()
            if layer in a.opaque_calls or len({t for *_, t in spans}) > 1:
                bad = {r for _, _, r, _ in spans}
            first: dict[int, int] = {}
            for i, (lo, hi, r, _) in enumerate(spans):
                if first.setdefault(r, lo) != lo:
                    bad.add(r)
                for lo2, _, r2, _ in spans[i + 1:]:
                    if lo2 < hi and r2 != r:
                        bad.update((r, r2))
            for r in bad:
                if r not in sp.reason:
                    sp.keep_full(r, f"{layer} ({role}) cannot follow one channel list for "
                                    "everything it reads")
                    changed = True


def _spec_from_analysis(a: _Analysis) -> ChannelSpec:
    """Plain-data channel groups: one per class of tied spaces that may be selected."""
    sp = a.spaces
    _keep_conflicts_full(a)
    classes: dict[int, list[str]] = {}
    for conv, space in a.space_of.items():
        classes.setdefault(sp.find(space), []).append(conv)
    groups = []
    for root, convs in classes.items():
        if root in sp.reason:
            continue
        convs = sorted(convs, key=a.order.index)
        members: dict[str, list[str]] = {"norms": [], "consumers": [], "linears": [],
                                         "depthwise": []}
        offsets: dict[str, int] = {}
        linear_channels: dict[str, int] = {}
        for u in a.uses:
            if sp.find(u.space) != root:
                continue
            names = members[{"consumer": "consumers", "norm": "norms", "linear": "linears",
                             "depthwise": "depthwise"}[u.role]]
            if u.layer not in names:
                names.append(u.layer)
            if u.offset:
                offsets[u.layer] = u.offset
            if u.role == "linear":
                linear_channels[u.layer] = u.total
        # Traced: every reader of the group is known (norms, channel-wise ops,
        # consumers), so ChannelPlan may pack it where can_pack allows.
        groups.append(GroupSpec(convs[0], name=convs[0], tied=tuple(convs[1:]),
                                offsets=tuple(offsets.items()),
                                linear_channels=tuple(linear_channels.items()),
                                readers_known=True, packed=True,
                                **{role: tuple(names) for role, names in members.items()}))
    order = {name: i for i, name in enumerate(a.order)}
    groups.sort(key=lambda g: order[g.producer])
    full = tuple((conv, sp.reason[sp.find(space)]) for conv, space in a.space_of.items()
                 if sp.is_full(space))
    return ChannelSpec(tuple(groups), full)


def _fallback_spec(model: nn.Module, exclude: tuple[str, ...]) -> ChannelSpec:
    groups, full = [], {}
    for name, m in model.named_modules():
        if not _is_conv(m):
            continue
        if any(name == p or name.startswith(p + ".") for p in exclude):
            full[name] = f"{name}: excluded by the caller"
        elif m.groups != 1:
            full[name] = f"{name}: grouped conv in a model fx could not trace"
        else:
            groups.append(GroupSpec(name, name=name, readers_known=False, packed=False))
    return ChannelSpec(tuple(groups), tuple(full.items()))


def conversion_notes(model: nn.Module) -> dict[str, str]:
    """For a converted model: every conv whose output channels stay full, and why."""
    spec = recorded_spec(model)
    if spec is None:
        raise ValueError(f"{type(model).__name__} was not converted by dce_kernels.convert")
    return dict(spec.kept_full)


# -- swapping the layers ------------------------------------------------------------------

def _sparse_norm(bn: nn.BatchNorm2d) -> ChannelSparseBatchNorm2d:
    """A ChannelSparseBatchNorm2d holding ``bn``'s very parameters and buffers."""
    ref = bn.weight if bn.weight is not None else bn.running_mean
    layer = ChannelSparseBatchNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum,
                                     affine=bn.affine, track_running_stats=bn.track_running_stats,
                                     device=ref.device if ref is not None else None,
                                     dtype=ref.dtype if ref is not None else None)
    for name in ("weight", "bias"):
        setattr(layer, name, getattr(bn, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(layer, name, getattr(bn, name))
    layer.train(bn.training)
    return layer


def _swap(model: nn.Module, replacements: dict[int, nn.Module]) -> None:
    """Replaces every occurrence of each old module (by identity; a module
    registered under several names is replaced everywhere)."""
    for parent in model.modules():
        for key, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                parent._modules[key] = replacements[id(child)]


def convert(model: nn.Module, *, exclude: Iterable[str] = (), copy: bool = False,
            concrete_args: Optional[dict[str, Any]] = None) -> nn.Module:
    """Makes ``model`` channel-sparse; returns it (converted in place unless ``copy``).

    Args:
        model: any ``nn.Module`` with ``nn.Conv2d`` layers.
        exclude: names of submodules (``"layer4"``, ``"features.0"``) whose convs'
            output channels are never selected.
        copy: convert a deep copy and leave ``model`` as it was.
        concrete_args: passed to ``torch.fx.Tracer.trace`` (for forwards with
            non-tensor arguments that steer control flow).

    Afterwards ``dce_kernels.channels.plan_for(model)`` returns the
    :class:`~dce_kernels.channels.ChannelPlan` of the groups found, and
    :func:`conversion_notes` says which convs keep all channels and why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    if isinstance(exclude, str):
        exclude = (exclude,)
    exclude = tuple(exclude)
    names = {n for n, _ in model.named_modules()}
    for p in exclude:
        if p not in names:
            raise ValueError(f"exclude: the model has no submodule {p!r}")
    if not any(_is_conv(m) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d to convert")
    if copy:
        model = copy_module.deepcopy(model)

    # Both modes' forwards: a model may run other layers in training (auxiliary
    # heads) and all of them must agree on the channels.
    was_training = model.training
    graphs = []
    try:
        for mode in (True, False):
            model.train(mode)
            graphs.append(_Tracer().trace(model, concrete_args=concrete_args))
    except Exception as e:  # fx raises many kinds (TraceError, TypeError, ...)
        warnings.warn(
            f"dce_kernels.convert: torch.fx cannot trace {type(model).__name__} "
            f"({type(e).__name__}: {e}). Converting without the graph: every Conv2d "
            "(groups=1) is its own channel group reading all its input channels (correct "
            "but slower), BatchNorms stay dense, and a compact model cannot be exported "
            "from a partial selection. Make forward traceable (no Python control flow on "
            "tensor values) for the full conversion.", stacklevel=2)
        spec = _fallback_spec(model, exclude)
        traced = False
        inplace_convs = []
    else:
        analyzer = _Analyzer(dict(model.named_modules()), exclude)
        for graph in graphs:
            analysis = analyzer.run(graph)
        spec = _spec_from_analysis(analysis)
        traced = True
        inplace_convs = analysis.inplace_after
    finally:
        model.train(was_training)

    modules = dict(model.named_modules())
    to_conv = set()
    to_norm = set()
    for g in spec.groups:
        to_conv.update([g.producer, *g.tied, *g.consumers, *g.depthwise])
        to_norm.update(g.norms)
    replacements: dict[int, nn.Module] = {}
    for name in sorted(to_conv):
        m = modules[name]
        if type(m) is nn.Conv2d and id(m) not in replacements:
            replacements[id(m)] = ChannelSparseConv2d.from_dense(m)
    for name in sorted(to_norm):
        m = modules[name]
        if type(m) is nn.BatchNorm2d and id(m) not in replacements:
            replacements[id(m)] = _sparse_norm(m)
    _swap(model, replacements)

    if traced:
        _make_saliency_safe(model, inplace_convs, to_conv)
    else:
        # No graph to see what follows a conv: every in-place module becomes
        # out-of-place (the same result), so none can overwrite a conv's output.
        for m in model.modules():
            if getattr(m, "inplace", None) is True:
                m.inplace = False
    setattr(model, SPEC_ATTR, spec)
    return model


def _make_saliency_safe(model: nn.Module, inplace_after: list[tuple[str, torch.fx.Node]],
                        converted: set[str]) -> None:
    warned = set()
    for conv_name, user in inplace_after:
        if conv_name not in converted or conv_name in warned:
            continue
        if user.op == "call_module":
            model.get_submodule(user.target).inplace = False
            continue
        conv = model.get_submodule(conv_name)
        conv.track_saliency = False
        warned.add(conv_name)
        warnings.warn(
            f"dce_kernels.convert: {user.format_node()} modifies the output of {conv_name} in "
            "place, which the saliency of a channel-sparse conv needs unmodified; that conv "
            "reports no saliency (track_saliency=False). Use the out-of-place op to get it.",
            stacklevel=3)
