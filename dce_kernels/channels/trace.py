"""The torch.fx analysis: which channels of a model depend on which.

How channels are linked (each conv's *output channels* are one "space"; the
analysis follows every tensor's list of spaces through the graph):

* Channel-wise ops that map a zero channel to a zero channel (ReLU and friends,
  pooling, dropout, interpolation, scaling by a number) pass the spaces
  through. A BatchNorm follows the spaces it normalizes (it becomes channel-sparse
  so that inactive channels stay exactly zero).
* ``x.permute(0, 2, 3, 1)`` moves the channels last (and ``permute(0, 3, 1, 2)``
  back): there channel-wise ops and LayerNorms over the channels may read them.
  A LayerNorm over the channels (``F.layer_norm`` as the whole forward of an
  ``nn.LayerNorm``, with or without the permute pair inside, as timm's
  LayerNorm2d) follows the spaces like a BatchNorm; it becomes channel-sparse,
  normalizing over the active channels only, as the compact model will.
* A product with a parameter or buffer of one entry per channel, shaped to
  broadcast along the channels only (layer scale: ``x * gamma.reshape(1, -1, 1, 1)``)
  keeps zeros zero; the scale follows its group (the compact model keeps its
  active entries).
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
  offset-shifted selections (DenseNet). A layer may see one group at several
  offsets (GhostNet's ``cat([x1, cheap(x1)])``, whose depthwise ``cheap`` carries
  x1's group). A conv added to (or gating) such a concatenation has the
  concatenation's groups as its channels: its space is *refined* into them
  and the conv is tied to each at its offset (GhostNet's shortcut and its
  squeeze-and-excitation expand conv).
* Slicing ``x[:, a:b]``, ``narrow``, ``split`` and ``chunk`` along the channels,
  with constant bounds, read the groups inside each part at shifted offsets
  (:mod:`.windows`). The compact model runs the same code with the same
  constants on fewer channels, so the groups before a position the op cuts at
  (after it, for a negative bound) stay full; a stop past the end needs
  nothing (GhostNet's ``out[:, :self.out_chs]``). Channels of a group outside a
  part are not read by its readers; the compact model produces them and the
  op drops them alike.
* A depthwise conv (``groups == in_channels == out_channels``) carries its input
  spaces to its output: its input *and* output channels follow them (active
  outputs imply the active inputs of the same group). Another grouped conv
  (``groups = g > 1``, RegNet's, ResNeXt's) reads one group as a consumer and
  writes a space of its own, as a plain conv, and both classes need ``g``
  *blocks*: their selections take equally many channels of every conv group, so
  that the conv runs, and exports, as a narrower conv of ``g`` groups. It must
  read exactly one space, of its whole width (not a concatenation: the conv
  groups would cut across the parts); else it reads all its input channels.
* Flattening (``torch.flatten(x, 1)``, ``nn.Flatten()``, ``x.view(x.size(0), -1)``,
  a mean over H and W) into a ``Linear``: the Linear's columns follow the channels
  (column ``j`` reads channel ``j // (in_features / channels)``).
* An ``nn.Linear``'s output features are a space of their own, like a conv's
  output channels (the hidden units of a classifier: ``Linear -> ReLU ->
  Dropout -> Linear``). They are the last dim of its output, so only
  channel-wise ops, scaling and another Linear (whose columns then follow them
  one to one) may read them; anything else, and the model's output (the
  logits), keeps them full. Sums of Linear outputs are not tied (they keep
  their spaces full). A Linear on a channels-last map (ConvNeXt's MLP) is a 1x1
  conv instead: its columns follow the channels one to one, and its outputs are
  channels of a map, which sums tie like a conv's.
* Anything the analysis does not understand (an unknown op or module, slicing
  with a step or along another dim, reshapes, the model's outputs) keeps every
  space that flows into it full:
  correct, just not selected. The stem conv reads all of the image's channels;
  its output channels are selectable.

The model is traced in training and in eval mode and both graphs are analysed
together, so layers that run in one mode only (auxiliary heads) are linked too.
"""
from __future__ import annotations

import inspect
import operator
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Union

import torch
import torch.fx
from torch import nn

from ..nn import (ChannelSparseBatchNorm2d, ChannelSparseConv2d, ChannelSparseGroupNorm,
                  ChannelSparseLayerNorm, ChannelSparseLinear, is_depthwise)
from .group import ChannelSpec, GroupSpec
from .optable import (ADD_FUNCTIONS, ADD_METHODS, CAST_METHODS, CAT_NAMES, DIV_FUNCTIONS,
                      DIV_METHODS, ELEMENTWISE_MODULES, ELEMENTWISE_NAMES, GATE_MODULES,
                      GATE_NAMES, LAYER_NORM_FUNCTIONS, LINEAR_FUNCTIONS, METADATA_NAMES,
                      MUL_FUNCTIONS, MUL_METHODS, NORM_FUNCTIONS, PERMUTE_NAMES,
                      RESHAPE_METHODS, SCALE_SHAPE_NAMES, SPATIAL_MODULES, SPATIAL_NAMES,
                      SPATIAL_REDUCTIONS)
from .spaces import OUTPUT_REASON, Analysis, Member, spec_from_analysis
from .windows import Cut, chunk_cut, narrow_cut, slice_cut, split_cut

__all__ = ["trace_modes", "link_graphs", "Linked", "link_without_graph", "is_convertible_conv",
           "is_convertible_linear"]


def is_convertible_conv(m: nn.Module) -> bool:
    """A conv convert may make channel-sparse: exactly nn.Conv2d, or already ours."""
    return type(m) in (nn.Conv2d, ChannelSparseConv2d)


def is_convertible_linear(m: nn.Module) -> bool:
    """A Linear convert may make channel-sparse: exactly nn.Linear, or already ours."""
    return type(m) in (nn.Linear, ChannelSparseLinear)


def _is_norm(m: nn.Module) -> bool:
    """A norm of (N, C, H, W) tensors that follows its channels as a leaf module."""
    return (type(m) is nn.BatchNorm2d or isinstance(m, ChannelSparseBatchNorm2d)
            or (isinstance(m, ChannelSparseLayerNorm) and m.channel_dim == 1)
            or _is_group_norm(m))


def _is_group_norm(m: nn.Module) -> bool:
    return type(m) is nn.GroupNorm or isinstance(m, ChannelSparseGroupNorm)


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


@dataclass
class Linked:
    """What :func:`link_graphs` found besides the groups (``spec``).

    ``inplace_after``: ``(conv name, node)`` for every in-place op on a conv's
    output or on a tensor that shares its memory (a view, an Identity, the result
    of another in-place op), including ``x += y`` (fx records it as ``x + y``; the
    source line tells). ``norm_after``: for each BatchNorm2d subclass that calls
    ``F.batch_norm`` in its own forward, the children it runs on the result, in
    order (timm's BatchNormAct2d: ``drop``, ``act``)."""

    spec: ChannelSpec
    inplace_after: list[tuple[str, torch.fx.Node]] = field(default_factory=list)
    norm_after: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # For each LayerNorm over channels: where its input has them (1: a (N, C, H, W)
    # tensor its forward permutes, as timm's LayerNorm2d; -1: channels last).
    layer_norms: dict[str, int] = field(default_factory=dict)


def link_graphs(model: nn.Module, graphs: Iterable[torch.fx.Graph], exclude: tuple[str, ...]
                ) -> Linked:
    """The channel groups of ``model`` from its graphs (see :class:`Linked`)."""
    analyzer = _Analyzer(dict(model.named_modules()), exclude)
    for graph in graphs:
        analyzer.run(graph)
    return Linked(spec_from_analysis(analyzer.a), analyzer.inplace_after, analyzer.norm_after,
                  analyzer.layer_norms)


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
    """torch.fx's default leaves (torch.nn modules), plus our own layers. Stack
    traces are recorded: they show ``x += y``, which fx records as ``x + y``."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (ChannelSparseConv2d, ChannelSparseLinear, ChannelSparseBatchNorm2d,
                          ChannelSparseLayerNorm)):
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


_AUGMENTED = re.compile(r"^\s*[\w.\[\]]+\s*(\+|-|\*|/)=")


def _augmented_assignment(node: torch.fx.Node) -> bool:
    """Whether ``node`` is Python's ``x += y`` (``-=``, ``*=``, ``/=``): in place on a
    tensor at run time, though fx records ``x + y``."""
    if node.op != "call_function" or node.target not in ADD_FUNCTIONS | MUL_FUNCTIONS \
            | DIV_FUNCTIONS:
        return False
    return bool(_AUGMENTED.match(_source_line(node)))


_TORCH_DIR = os.path.dirname(torch.__file__)
_FRAME = re.compile(r'^\s*File "(.*)", line \d+')


def _source_line(node: torch.fx.Node) -> str:
    """The line of the traced code that made ``node`` (its last frame outside torch)."""
    line, lines = "", (node.stack_trace or "").splitlines()
    for i, text in enumerate(lines[:-1]):
        frame = _FRAME.match(text)
        if frame and not frame.group(1).startswith(_TORCH_DIR):
            line = lines[i + 1]
    return line


def _is_inplace(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if _augmented_assignment(node):
        return True
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


@dataclass(frozen=True)
class _Gate:
    """A (N, C, H, W) tensor aligned with the channels of ``layout`` whose inactive
    channels are *not* zero (``sigmoid(conv(...))``): it may only scale a tensor
    of those channels (``x * gate``), which keeps that tensor's zeros zero."""

    layout: Layout


@dataclass(frozen=True)
class _Last:
    """A channels-last (N, H, W, C) tensor: ``x.permute(0, 2, 3, 1)`` of a
    tensor of the channels of ``layout``. Only channel-wise ops, LayerNorms over
    the channels, per-channel scales and the permute back may read it."""

    layout: Layout


@dataclass(frozen=True)
class _Parts:
    """The tuple ``split`` / ``chunk`` along the channels return: the layout of each
    part (None: a part of no channels of ours). Only indexing it is understood."""

    layouts: tuple[Optional[Layout], ...]


def _layout(v) -> Layout:
    if isinstance(v, _Parts):
        return tuple(s for part in v.layouts for s in (part or ()))
    return v.layout if isinstance(v, (_Flat, _Gate, _Last)) else (v or ())


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _channel_slice(key: Any) -> Optional[slice]:
    """The slice of dim 1 in ``x[key]`` when ``key`` slices only the channels
    (``x[:, a:b]``, ``x[:, a:b, ...]``, ``x[:, a:b, :, :]``); else None."""
    key = key if isinstance(key, tuple) else (key,)
    full = slice(None)
    if (len(key) < 2 or len(key) > 4 or not isinstance(key[0], slice) or key[0] != full
            or not isinstance(key[1], slice)):
        return None
    if not all(k is Ellipsis or (isinstance(k, slice) and k == full) for k in key[2:]):
        return None
    return key[1]


# What picks channels by position besides indexing (functions and tensor methods alike):
# name -> how to read its arguments into a Cut, given the channels of its input.
def _narrow(node: torch.fx.Node, channels: int) -> Optional[Cut]:
    if _argument(node, 1, "dim") != 1:
        return None
    return narrow_cut(channels, _argument(node, 2, "start"), _argument(node, 3, "length"))


def _split(node: torch.fx.Node, channels: int) -> Optional[Cut]:
    if _argument(node, 2, "dim", 0) != 1:
        return None
    sizes = _argument(node, 1, "split_size", _argument(node, 1, "split_size_or_sections"))
    return split_cut(channels, sizes)


def _chunk(node: torch.fx.Node, channels: int) -> Optional[Cut]:
    if _argument(node, 2, "dim", 0) != 1:
        return None
    return chunk_cut(channels, _argument(node, 1, "chunks"))


_CUTS = {"narrow": _narrow, "split": _split, "chunk": _chunk}


# Ops through which a tensor keeps sharing its input's memory: an in-place op on
# their result modifies the input too.
_ALIAS_METHODS = {"view", "reshape", "flatten", "contiguous", "to", "float", "double",
                  "half", "view_as", "expand", "expand_as", "squeeze", "unsqueeze",
                  "narrow", "split", "chunk"}


def _aliases(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(modules[node.target]) in (nn.Identity, nn.Flatten) or (
            type(modules[node.target]) in (nn.Dropout, nn.Dropout2d) and not
            modules[node.target].training)
    if node.op == "call_method":
        return node.target in _ALIAS_METHODS
    if node.op == "call_function":
        return _target_name(node.target) in {"flatten", "reshape", "contiguous", "squeeze",
                                             "unsqueeze", "getitem", "narrow", "split",
                                             "chunk"}
    return False


def _align(sp, xs: Layout, ys: Layout):
    """How two layouts of leaves line up channel by channel: ``(pairs, refinements)``,
    the spaces to tie, and the spaces to refine first into the run of the other
    side's spaces they line up with (a conv added to a concatenation); None if
    they cannot be made to line up."""
    xs, ys = list(xs), list(ys)
    if sum(sp.size[s] for s in xs) != sum(sp.size[s] for s in ys):
        return None
    pairs, refinements, refined = [], [], set()
    while xs and ys:
        if sp.size[xs[0]] == sp.size[ys[0]]:
            pairs.append((xs.pop(0), ys.pop(0)))
            continue
        big, small = (xs, ys) if sp.size[xs[0]] > sp.size[ys[0]] else (ys, xs)
        space, run, width = big.pop(0), [], 0
        while small and width < sp.size[space]:
            run.append(small.pop(0))
            width += sp.size[run[-1]]
        if (width != sp.size[space] or not sp.refinable(space) or space in refined
                or any(sp.find(s) == space for s in run)):
            return None
        refined.add(space)
        refinements.append((space, tuple(run)))
    return pairs, refinements


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
        self.value: dict[torch.fx.Node, Union[Layout, _Flat, _Gate, None]] = {}
        self.norm_after: dict[str, tuple[str, ...]] = {}
        self.layer_norms: dict[str, int] = {}
        self._chains: dict[torch.fx.Node, Union[tuple[str, tuple[str, ...]], str]] = {}

    # -- helpers -------------------------------------------------------------------

    def _val(self, arg):
        """The layout of an argument (None for constants and untracked values)."""
        return self.value.get(arg) if isinstance(arg, torch.fx.Node) else None

    def _layouts_in(self, args) -> list[Union[Layout, _Flat]]:
        found = []
        torch.fx.node.map_arg(args, lambda n: found.append(self.value.get(n)) or n)
        return [v for v in found if v is not None]

    def _keep_full(self, values: Iterable[Union[Layout, _Flat, _Gate, None]], reason: str
                   ) -> None:
        for v in values:
            for s in _layout(v):
                self.a.spaces.keep_full(s, reason)

    def _opaque(self, node: torch.fx.Node, reason: str) -> None:
        """An op we cannot see through: what flows into it stays full width."""
        self._keep_full(self._layouts_in((node.args, node.kwargs)), reason)
        self.value[node] = None

    def _tie(self, x, y, node: torch.fx.Node):
        sp = self.a.spaces
        lx, ly = sp.leaves(_layout(x)), sp.leaves(_layout(y))
        if any(s in self.a.linear_spaces for s in lx + ly):
            self._keep_full([x, y], f"{node.name}: combines a Linear's output features with "
                                    "another tensor")
            return x
        aligned = None if isinstance(x, _Flat) != isinstance(y, _Flat) else _align(sp, lx, ly)
        if aligned is None:
            self._keep_full([x, y], f"{node.name}: adds tensors whose channels do not line up")
            return x
        pairs, refinements = aligned
        for space, parts in refinements:
            sp.refine(space, parts)
        for a, b in pairs:
            sp.union(a, b)
        return x

    def _space_of_conv(self, name: str, conv: nn.Module) -> int:
        # A conv module called twice writes one set of active channels: one space.
        if name not in self.a.space_of:
            width = conv.out_features if isinstance(conv, nn.Linear) else conv.out_channels
            self.a.space_of[name] = self.a.spaces.new(width)
            self.a.order.append(name)
            if _excluded(name, self.exclude):
                self.a.spaces.keep_full(self.a.space_of[name], f"{name}: excluded by the caller")
        return self.a.space_of[name]

    def _space_of_linear(self, name: str, linear: nn.Linear) -> int:
        if name not in self.a.space_of:
            space = self._space_of_conv(name, linear)
            self.a.linear_spaces.add(space)
            self.a.linear_producers.add(name)
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
        self._chains = {}
        for node in graph.nodes:
            if node.op == "call_function" and _target_name(node.target) in NORM_FUNCTIONS:
                self._chains[node] = _norm_chain(node, self.modules)
        for node in graph.nodes:
            handler = getattr(self, f"_on_{node.op}")
            handler(node)
            if node.op == "call_module" and (is_convertible_conv(self.modules[node.target]) or
                                             is_convertible_linear(self.modules[node.target])):
                self._find_inplace(node)
        return self.a

    def _find_inplace(self, conv: torch.fx.Node) -> None:
        """Every in-place op on the conv's output or on a tensor sharing its memory."""
        seen, todo = {conv}, [conv]
        while todo:
            for user in todo.pop().users:
                if user in seen:
                    continue
                inplace = _is_inplace(user, self.modules)
                if inplace:
                    self.inplace_after.append((conv.target, user))
                if (inplace and not _augmented_assignment(user)) or _aliases(user, self.modules):
                    seen.add(user)
                    todo.append(user)

    def _on_placeholder(self, node):
        self.value[node] = None  # the image: its channels are not ours to select

    def _on_get_attr(self, node):
        self.value[node] = None

    def _on_output(self, node):
        self._opaque(node, OUTPUT_REASON)

    def _on_call_module(self, node):
        m = self.modules[node.target]
        x = self._val(node.args[0]) if node.args else None
        others = self._layouts_in((node.args[1:], node.kwargs))
        if isinstance(x, _Parts):
            self._opaque(node, f"{node.target}: module called on the parts of a split")
            return
        if isinstance(x, _Gate) and not isinstance(m, ELEMENTWISE_MODULES + GATE_MODULES
                                                   + SPATIAL_MODULES):
            # Only a product keeps a gate's inactive channels out: here they are read.
            self._keep_full([x], f"{node.target}: {type(m).__name__} reads a gate (channels "
                                 "that are not zero when inactive)")
            x = None
        if others:
            self._opaque(node, f"{node.target}: module called with several channel inputs")
            return
        if isinstance(x, _Last) or (isinstance(m, ChannelSparseLayerNorm)
                                    and m.channel_dim == -1):
            self._module_on_last(node, m, x)
            return
        if x is None and (is_convertible_conv(m) or _is_norm(m) or is_convertible_linear(m)):
            self.a.opaque_calls.add(node.target)
        if is_convertible_conv(m):
            self.value[node] = self._conv(node.target, m, x)
        elif _is_norm(m):
            if isinstance(x, _Flat):
                self._opaque(node, f"{node.target}: BatchNorm2d on a flattened tensor")
                return
            if x is not None and _is_group_norm(m):
                self._group_norm(node.target, m, x)
            elif x is not None:
                self._record(node.target, "norms", x)
            self.value[node] = x
        elif is_convertible_linear(m):
            if isinstance(x, _Flat):
                self._record(node.target, "linears", x.layout, self._channels(x.layout))
            elif x is not None:
                self._keep_full([x], f"{node.target}: Linear on a tensor that is not flattened")
            # Its output features, the last dim of what it returns, whatever its input.
            self.value[node] = _Flat((self._space_of_linear(node.target, m),))
        elif type(m) is nn.Flatten and x is not None and not isinstance(x, _Flat):
            if m.start_dim == 1 and m.end_dim == -1:
                self.value[node] = _Flat(x)
            else:
                self._opaque(node, f"{node.target}: Flatten(start_dim={m.start_dim})")
        elif type(m) in ELEMENTWISE_MODULES:
            self.value[node] = x
        elif type(m) in GATE_MODULES and x is not None and not isinstance(x, _Flat):
            self.value[node] = _Gate(_layout(x))
        elif type(m) in SPATIAL_MODULES and not isinstance(x, _Flat):
            self.value[node] = x
        else:
            self._opaque(node, f"{node.target}: {type(m).__name__} is not known to keep "
                               "channels apart")

    def _group_norm(self, name: str, norm: nn.GroupNorm, x) -> None:
        """A GroupNorm normalizes each of its groups over their active channels, as
        the compact model's narrower GroupNorm will: it follows one space of its
        whole width, whose blocks then include its groups."""
        sp = self.a.spaces
        if isinstance(x, tuple) and len(x) == 1 and sp.leaves(x) == x \
                and sp.size[x[0]] == norm.num_channels:
            self._record(name, "norms", x)
            sp.need_blocks(x[0], norm.num_groups)
        else:
            self._keep_full([x], f"{name}: GroupNorm over a concatenation or a part of a "
                                 "wider tensor (its groups would cut across the parts)")

    def _conv(self, name: str, conv: nn.Conv2d, x):
        if isinstance(x, _Flat):
            self._keep_full([x], f"{name}: conv on a flattened tensor")
            x = None
        if conv.groups == 1:
            if x is not None:
                self._record(name, "consumers", x)
            return (self._space_of_conv(name, conv),)
        if is_depthwise(conv) and x is not None:
            self.a.order.append(name)
            if _excluded(name, self.exclude):
                self._keep_full([x], f"{name}: excluded by the caller")
            self._record(name, "depthwise", x)
            return x  # the same channels, carried through
        space = self._space_of_conv(name, conv)
        sp = self.a.spaces
        sp.need_blocks(space, conv.groups)
        if (isinstance(x, tuple) and len(x) == 1 and sp.leaves(x) == x
                and sp.size[x[0]] == conv.in_channels):
            self._record(name, "consumers", x)
            sp.need_blocks(x[0], conv.groups)
        else:
            self._keep_full([x], f"{name}: grouped conv (groups={conv.groups}) reads a "
                                 "concatenation or a part of a wider tensor: all its inputs")
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
        if name in PERMUTE_NAMES or any(isinstance(v, _Last) for v in values):
            self._channels_last(node, name, values)
            return
        if target is operator.getitem and node.args:
            self._getitem(node, x)
            return
        if any(isinstance(v, _Parts) for v in values):
            self._opaque(node, f"{node.name}: {name} on the parts of a split")
            return
        if any(isinstance(v, _Gate) for v in values) and not (
                target in ADD_FUNCTIONS or target in MUL_FUNCTIONS or target in DIV_FUNCTIONS
                or name in ELEMENTWISE_NAMES or name in GATE_NAMES or name in SPATIAL_NAMES
                or name in METADATA_NAMES):
            self._opaque(node, f"{node.name}: {name} reads a gate (channels that are not "
                               "zero when inactive)")
            return
        if target in ADD_FUNCTIONS:
            self._binary_add(node)
        elif target in MUL_FUNCTIONS or target in DIV_FUNCTIONS:
            self._binary_mul(node, divide=target in DIV_FUNCTIONS)
        elif name in CAT_NAMES:
            self._cat(node)
        elif name in _CUTS:
            self._cut_op(node, x, _CUTS[name])
        elif name == "flatten":
            self._flatten(node, x, _argument(node, 1, "start_dim", 0),
                          _argument(node, 2, "end_dim", -1))
        elif name in SPATIAL_REDUCTIONS and x is not None:
            self._reduce_spatial(node, x)
        elif name == "reshape" and x is not None:
            self._view(node, x, _argument(node, 1, "shape"))
        elif name in NORM_FUNCTIONS:
            self._functional_norm(node, x)
        elif name in LINEAR_FUNCTIONS:
            self._functional_linear(node, x)
        elif name in GATE_NAMES and x is not None and len(values) == 1 \
                and not isinstance(x, _Flat):
            self.value[node] = _Gate(_layout(x))
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
        if name in PERMUTE_NAMES or any(isinstance(v, _Last) for v in values):
            self._channels_last(node, name, values)
            return
        if any(isinstance(v, _Parts) for v in values):
            self._opaque(node, f"{node.name}: .{name}() on the parts of a split")
            return
        if any(isinstance(v, _Gate) for v in values) and not (
                name in ADD_METHODS or name in MUL_METHODS or name in DIV_METHODS
                or name in ELEMENTWISE_NAMES or name in GATE_NAMES or name in CAST_METHODS
                or name in SPATIAL_NAMES or name in METADATA_NAMES):
            self._opaque(node, f"{node.name}: .{name}() reads a gate (channels that are not "
                               "zero when inactive)")
            return
        if name in METADATA_NAMES:
            self.value[node] = None
        elif name in ADD_METHODS:
            self._binary_add(node)
        elif name in _CUTS:
            self._cut_op(node, x, _CUTS[name])
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
        elif name in GATE_NAMES and x is not None and len(values) == 1 \
                and not isinstance(x, _Flat):
            self.value[node] = _Gate(_layout(x))
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
            tied = self._tie(va, vb, node)
            gate = isinstance(va, _Gate) or isinstance(vb, _Gate)
            self.value[node] = _Gate(_layout(tied)) if gate and tied is not None else tied
        elif isinstance(b if va is not None else a, (int, float)) \
                and not isinstance(va if va is not None else vb, _Flat):
            # x + 3: aligned with x's channels, but its zeros are not zero any more.
            self.value[node] = _Gate(_layout(va if va is not None else vb))
        else:
            # Adding an unrelated tensor turns zero channels non-zero.
            self._opaque(node, f"{node.name}: adds something that is not a conv's channels")

    def _binary_mul(self, node, divide: bool):
        a = node.args[0] if node.args else None
        b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        va, vb = self._val(a), self._val(b)
        if va is not None and isinstance(b, (int, float)):
            self.value[node] = va  # scaling keeps zeros zero (and a gate a gate)
        elif not divide and vb is not None and isinstance(a, (int, float)):
            self.value[node] = vb
        elif va is not None and vb is None and self._per_channel_scale(b, va):
            self.value[node] = va  # layer scale: zeros stay zero, the scale follows
        elif not divide and vb is not None and va is None and self._per_channel_scale(a, vb):
            self.value[node] = vb
        elif not divide and va is not None and vb is not None:
            # x * y is zero where either is; tying keeps export consistent. A gate
            # scales the other factor, whose zeros stay zero.
            tied = self._tie(va, vb, node)
            if isinstance(va, _Gate) and isinstance(vb, _Gate):
                self.value[node] = _Gate(_layout(tied))
            elif isinstance(va, _Gate):
                self.value[node] = vb
            elif isinstance(vb, _Gate):
                self.value[node] = va
            else:
                self.value[node] = tied
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

    def _getitem(self, node, x):
        """``parts[i]`` of a split, or ``x[:, a:b]``: a slice of the channels."""
        index = node.args[1] if len(node.args) > 1 else None
        if isinstance(x, _Parts):
            if _is_int(index) and -len(x.layouts) <= index < len(x.layouts):
                self.value[node] = x.layouts[index]
            else:
                self._opaque(node, f"{node.name}: indexes the parts of a split with {index!r}")
            return
        window = _channel_slice(index)
        cut = None
        if window is not None and x is not None and not isinstance(x, (_Flat, _Gate)):
            cut = slice_cut(self._channels(x), window.start, window.stop, window.step)
        if cut is None:
            self._opaque(node, f"{node.name}: indexing that is not a slice of the channels "
                               "with constant bounds and step 1")
            return
        self.value[node] = self._cut(node, x, cut)[0]

    def _cut_op(self, node, x, read: Any):
        """``narrow``, ``split`` or ``chunk`` (``read`` reads its arguments)."""
        cut = None
        if x is not None and not isinstance(x, (_Flat, _Gate)):
            cut = read(node, self._channels(x))
        if cut is None:
            self._opaque(node, f"{node.name}: {_target_name(node.target)} that is not along "
                               "the channels with constant sizes")
            return
        parts = self._cut(node, x, cut)
        self.value[node] = parts[0] if _target_name(node.target) == "narrow" \
            else _Parts(tuple(parts))

    def _cut(self, node, x: Layout, cut: Cut) -> list[Optional[Layout]]:
        """The layout of each part of ``cut``. The spaces the compact model needs
        at fixed positions (see :mod:`.windows`) stay full; a space a part holds
        only some channels of is full, so that piece becomes a full space of its own
        (its channels are always read)."""
        sp = self.a.spaces
        spans, lo = [], 0
        for s in sp.leaves(x):
            spans.append((s, lo, lo + sp.size[s]))
            lo += sp.size[s]
        reason = (f"{node.name}: {cut.what} of {cut.channels} channels cuts at fixed "
                  f"positions, as the compact model will, so channels {cut.pinned_text()} "
                  "stay")
        for s, lo, hi in spans:
            if cut.pinned(lo, hi):
                sp.keep_full(s, reason)
        parts = []
        for part_lo, part_hi in cut.parts:
            layout = []
            for s, lo, hi in spans:
                a, b = max(lo, part_lo), min(hi, part_hi)
                if a >= b:
                    continue
                if (a, b) == (lo, hi):
                    layout.append(s)
                else:
                    sp.keep_full(s, reason)  # cut positions are pinned: full already
                    piece = sp.new(b - a)
                    sp.keep_full(piece, reason)
                    layout.append(piece)
            parts.append(tuple(layout) or None)
        return parts

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

    def _functional_linear(self, node, x):
        weight = _argument(node, 1, "weight")
        owner = (weight.target.rpartition(".")[0] if isinstance(weight, torch.fx.Node)
                 and weight.op == "get_attr" and weight.target.endswith(".weight") else None)
        if owner is None or not isinstance(self.modules.get(owner), nn.Linear) \
                or owner not in _scope(node) or self._layouts_in((node.args[1:], node.kwargs)):
            self._opaque(node, f"{node.name}: linear on a weight that is not an nn.Linear's own")
        elif isinstance(x, _Flat):
            self._record(owner, "linears", x.layout, self._channels(x.layout))
            self.value[node] = None
        else:
            self._opaque(node, f"{node.name}: linear on a tensor that is not flattened")

    def _functional_norm(self, node, x):
        """``F.batch_norm`` in the forward of a BatchNorm2d subclass (see _norm_chain)."""
        chain = self._chains.get(node)
        if isinstance(x, _Flat) or x is None or not isinstance(chain, tuple):
            why = chain if isinstance(chain, str) else "on a tensor of unknown channels"
            self._opaque(node, f"{node.name}: batch_norm {why}")
            return
        owner, after = chain
        if self.norm_after.setdefault(owner, after) != after:
            self._opaque(node, f"{node.name}: {owner} runs different layers after batch_norm "
                               "in training and in eval")
            return
        self._record(owner, "norms", x)
        self.value[node] = x

    # -- channels last: LayerNorms over the channels, layer scale ------------------------

    def _channels_last(self, node, name, values):
        """A permute, or an op on a channels-last tensor (:class:`_Last`)."""
        x = self._val(node.args[0]) if node.args else None
        if name in PERMUTE_NAMES:
            dims = _permute_dims(node)
            if len(values) == 1 and isinstance(x, tuple) and dims == (0, 2, 3, 1):
                self.value[node] = _Last(x)
            elif len(values) == 1 and isinstance(x, _Last) and dims == (0, 3, 1, 2):
                self.value[node] = x.layout
            else:
                self._opaque(node, f"{node.name}: permute{dims} is not known to keep "
                                   "channels apart")
            return
        target = node.target
        if name in METADATA_NAMES:
            self.value[node] = None
        elif name in LAYER_NORM_FUNCTIONS and node.op == "call_function":
            self._layer_norm(node, x)
        elif (target in MUL_FUNCTIONS or target in DIV_FUNCTIONS if node.op == "call_function"
              else name in MUL_METHODS or name in DIV_METHODS):
            divide = target in DIV_FUNCTIONS or name in DIV_METHODS
            a = node.args[0] if node.args else None
            b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
            va, vb = self._val(a), self._val(b)
            if isinstance(va, _Last) and vb is None and (
                    isinstance(b, (int, float)) or self._per_channel_scale(b, va)):
                self.value[node] = va
            elif not divide and isinstance(vb, _Last) and va is None and (
                    isinstance(a, (int, float)) or self._per_channel_scale(a, vb)):
                self.value[node] = vb
            else:
                self._opaque(node, f"{node.name}: multiplies a channels-last tensor by a "
                                   "tensor of unknown channels")
        elif len(values) == 1 and isinstance(x, _Last) and (
                name in ELEMENTWISE_NAMES or (node.op == "call_method" and name in CAST_METHODS)):
            self.value[node] = x
        else:
            self._opaque(node, f"{node.name}: {name} on a channels-last tensor")

    def _module_on_last(self, node, m, x):
        if type(m) in ELEMENTWISE_MODULES and isinstance(x, _Last):
            self.value[node] = x
        elif (type(m) is nn.LayerNorm or isinstance(m, ChannelSparseLayerNorm)) \
                and isinstance(x, _Last) and tuple(m.normalized_shape) == (self._channels(
                    x.layout),) and getattr(m, "channel_dim", -1) == -1 and m.weight is not None:
            self._note_layer_norm(node, node.target, -1, x)
        elif is_convertible_linear(m) and isinstance(x, _Last):
            # Over the channels of a channels-last map, as a 1x1 conv (ConvNeXt's MLP
            # without conv_mlp): its columns follow them one to one, and its output
            # features are channels of a map again, which a sum may tie.
            self._record(node.target, "linears", x.layout, self._channels(x.layout))
            self.a.map_linears.add(node.target)
            self.value[node] = _Last((self._space_of_conv(node.target, m),))
        elif isinstance(m, ChannelSparseLayerNorm) and x is None:
            self.a.opaque_calls.add(node.target)
            self.value[node] = None
        else:
            what = "Linear" if isinstance(m, nn.Linear) else type(m).__name__
            self._opaque(node, f"{node.target}: {what} on a channels-last tensor is not "
                               "followed")

    def _layer_norm(self, node, x):
        """``F.layer_norm`` over the channels of a channels-last tensor, as the whole
        forward of an nn.LayerNorm (see _layer_norm_owner)."""
        owner = _layer_norm_owner(node, self.modules)
        if isinstance(owner, str) or not isinstance(x, _Last):
            why = owner if isinstance(owner, str) else "on a tensor of unknown channels"
            self._opaque(node, f"{node.name}: layer_norm {why}")
            return
        name, channel_dim = owner
        shape = _argument(node, 1, "normalized_shape")
        if tuple(shape if isinstance(shape, (list, tuple)) else (shape,)) != (
                self._channels(x.layout),):
            self._opaque(node, f"{node.name}: layer_norm over {shape}, not over the channels")
            return
        self._note_layer_norm(node, name, channel_dim, x)

    def _note_layer_norm(self, node, name, channel_dim, x):
        if self.layer_norms.setdefault(name, channel_dim) != channel_dim:
            self._opaque(node, f"{node.name}: {name} normalizes channels in different dims "
                               "in training and in eval")
            return
        self._record(name, "norms", x.layout)
        self.value[node] = x

    def _per_channel_scale(self, arg, x) -> bool:
        """Whether ``arg`` is a parameter or buffer of one entry per channel of
        ``x`` (one group's), shaped to broadcast along its channels only
        (``gamma.reshape(1, -1, 1, 1)``; on a channels-last tensor, ``gamma``):
        then it is recorded as the group's scale."""
        last = isinstance(x, _Last)
        layout = _layout(x)
        if not (last or isinstance(x, tuple)) or len(layout) != 1:
            return False
        steps, n = [], arg
        while isinstance(n, torch.fx.Node) and n.op in ("call_method", "call_function"):
            if _target_name(n.target) not in SCALE_SHAPE_NAMES or not n.args:
                return False
            found = []
            torch.fx.node.map_arg((n.args[1:], n.kwargs), found.append)
            if found:
                return False  # shaped by values of the run: not a fixed layout
            steps.append(n)
            n = n.args[0]
        if not isinstance(n, torch.fx.Node) or n.op != "get_attr":
            return False
        owner, _, attr = n.target.rpartition(".")
        scale = getattr(self.modules.get(owner), attr, None)
        if not torch.is_tensor(scale):
            return False
        with torch.no_grad():
            value = scale.detach()
            for step in reversed(steps):
                if step.op == "call_method":
                    value = getattr(value, step.target)(*step.args[1:], **step.kwargs)
                else:
                    value = step.target(value, *step.args[1:], **step.kwargs)
        if value.dim() > 4:
            return False
        c = self._channels(layout)
        shape = (1,) * (4 - value.dim()) + tuple(value.shape)
        if shape != ((1, 1, 1, c) if last else (1, c, 1, 1)):
            return False
        self._record(n.target, "scales", layout)
        return True


def _permute_dims(node: torch.fx.Node):
    """The dims of ``x.permute(...)`` / ``torch.permute(x, dims)``, as a tuple."""
    rest = node.args[1:]
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        rest = rest[0]
    elif not rest:
        rest = node.kwargs.get("dims", ())
    return tuple(rest)


def _layer_norm_owner(node: torch.fx.Node, modules: dict[str, nn.Module]
                      ) -> Union[tuple[str, int], str]:
    """For ``F.layer_norm`` on the weight (and bias) of an nn.LayerNorm, in that
    module's forward and with its eps, when that is all its forward does, or all
    but a permute of a (N, C, H, W) input to channels last before it and back
    after it (timm's LayerNorm2d): the module's name and where its input has the
    channels (-1, 1). Else why not (a string): only then can a channel-sparse
    LayerNorm replace the module."""
    found = _owning_module(node, ((2, "weight"), (3, "bias")), nn.LayerNorm, modules,
                           constants=False, not_one="without the weight of one LayerNorm")
    if isinstance(found, str):
        return found
    owner, module = found
    if _argument(node, 4, "eps", 1e-5) != module.eps:
        return f"with another eps than {owner}'s"
    inside = [n for n in node.graph.nodes if n.op != "get_attr" and owner in _scope(n)]
    if inside == [node]:
        return owner, -1
    source = node.args[0]
    if (len(inside) == 3 and inside[1] is node and inside[0] is source
            and _target_name(source.target) in PERMUTE_NAMES
            and _permute_dims(source) == (0, 2, 3, 1)
            and list(node.users) == [inside[2]] and inside[2].args[0] is node
            and _target_name(inside[2].target) in PERMUTE_NAMES
            and _permute_dims(inside[2]) == (0, 3, 1, 2)):
        return owner, 1
    return f"in {owner}, whose forward does more than a layer norm over channels"


# F.batch_norm's tensor arguments after the input, and the BatchNorm2d attribute
# each must be for the call to be that module's own normalization.
_NORM_ARGS = ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))


def _owning_module(node: torch.fx.Node, args: tuple[tuple[int, str], ...], kind: type,
                   modules: dict[str, nn.Module], constants: bool, not_one: str
                   ) -> Union[tuple[str, nn.Module], str]:
    """The ``kind`` module (name, module) in whose forward ``node`` runs on that
    module's own attributes: the tensor arguments ``args`` ((index, attribute name)
    pairs), each read with ``get_attr``. Else why not (a string; ``not_one`` when
    they are not one module's). ``constants``: an argument that is not a graph node
    may be anything (else: only None)."""
    owners = set()
    for index, attr in args:
        arg = _argument(node, index, attr)
        if not isinstance(arg, torch.fx.Node) and (arg is None or constants):
            continue
        if not isinstance(arg, torch.fx.Node) or arg.op != "get_attr" \
                or not arg.target.endswith("." + attr):
            return f"on tensors that are not a {kind.__name__}'s own"
        owners.add(arg.target.rpartition(".")[0])
    if len(owners) != 1:
        return not_one
    owner = owners.pop()
    module = modules.get(owner)
    if not isinstance(module, kind) or owner not in _scope(node):
        return f"outside the forward of the {kind.__name__} {owner}"
    return owner, module


def _scope(node: torch.fx.Node) -> tuple[str, ...]:
    """The names of the modules whose forward ``node`` runs in, outermost first."""
    return tuple(v[0] if isinstance(v, tuple) else k
                 for k, v in node.meta.get("nn_module_stack", {}).items())


def _norm_chain(node: torch.fx.Node, modules: dict[str, nn.Module]
                ) -> Union[tuple[str, tuple[str, ...]], str]:
    """For ``F.batch_norm`` called by a BatchNorm2d subclass on its own parameters
    and buffers, as the first thing its forward does to the input: the module's
    name and the children its forward then runs on the result, one after the
    other (each channel-wise), which is all it does. Else why not (a string):
    only then can a channel-sparse BatchNorm followed by those children replace it."""
    found = _owning_module(node, _NORM_ARGS, nn.BatchNorm2d, modules, constants=True,
                           not_one="on tensors that are not one BatchNorm2d's own")
    if isinstance(found, str):
        return found
    owner, module = found
    children = dict(module.named_children())
    after, current = [], node
    while True:
        inside = [u for u in current.users if owner in _scope(u)]
        if not inside:
            break
        user = inside[0]
        child = user.target[len(owner) + 1:] if user.op == "call_module" else None
        if (len(inside) > 1 or child not in children or user.args != (current,)
                or user.kwargs or type(children[child]) not in ELEMENTWISE_MODULES):
            return (f"in {owner}, whose forward does more than batch_norm and channel-wise "
                    "children after it")
        after.append(child)
        current = user
    return owner, tuple(after)
