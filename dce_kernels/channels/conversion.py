"""Make an existing model channel-sparse: ``dce_kernels.convert(model)``.

``convert`` traces the model with torch.fx, works out which channels depend on
which (:mod:`dce_kernels.channels.trace` says how), replaces every *eligible* ``nn.Conv2d`` by a
:class:`~dce_kernels.nn.ChannelSparseConv2d` and every ``nn.BatchNorm2d`` that
sees selectable channels by a :class:`~dce_kernels.nn.ChannelSparseBatchNorm2d`
(an ``nn.LayerNorm`` over such channels by a
:class:`~dce_kernels.nn.ChannelSparseLayerNorm`), and records the channel groups on the model, where
:func:`dce_kernels.channels.plan_for` finds them. Like
``nn.SyncBatchNorm.convert_sync_batchnorm`` it changes the model in place
(``copy=True`` converts a deep copy instead) and the new layers *share* the old
layers' parameters and buffers (the same tensors, not copies), so an optimizer
or a reference to a parameter taken before conversion keeps working and the
``state_dict`` keys stay as they were. Nothing else changes: with all channels
active the converted model computes exactly what the original computes, with
the same gradients.

Eligible: an ``nn.Conv2d`` (exactly that class, or already a
``ChannelSparseConv2d``) that produces, carries or reads a selectable group.
Other convs stay plain ``nn.Conv2d`` (nothing to skip there). Likewise an
``nn.Linear`` (exactly that class) whose output features are selectable (the
hidden units of a classifier) or that reads selectable channels becomes a
:class:`~dce_kernels.nn.ChannelSparseLinear`; the final classifier's outputs
(the logits) are never selected.

Saliency needs each sparse conv's output unmodified in backward. An in-place
module applied directly to a converted conv's output (``nn.ReLU(inplace=True)``
right after a conv without BatchNorm) is switched to ``inplace=False`` (same
result, one more tensor). An in-place *function or method* there
(``F.relu(x, inplace=True)``, ``x.relu_()``) cannot be switched from outside:
that conv gets ``track_saliency = False`` and a warning. Python's ``x += y`` on a
conv's output is invisible to torch.fx (it traces as ``x + y``) and makes
backward raise; use ``x = x + y`` there.

Models torch.fx cannot trace as a whole (``if x.sum() > 0:`` in ``forward``,
timm's VGG) are linked in pieces when ``example_inputs`` are given: the modules
that do trace are analysed as above, and how they connect comes from one
observed forward per mode (:mod:`dce_kernels.channels.pieces`); what that does
not make certain stays full, and ``conversion_notes`` says how each untraceable
module was linked. Without ``example_inputs`` they still convert, with a
warning saying why: every ``nn.Conv2d`` with ``groups == 1`` becomes its own
group, which reads all its input channels (correct, slower); BatchNorms stay
dense (so an inactive channel leaves its BatchNorm as the shift ``beta``), and
no compact model can be exported from a partial selection.
"""
from __future__ import annotations

import copy as copy_module
import dataclasses
import warnings
from typing import Any, Iterable, Optional

import torch
import torch.fx
from torch import nn

from ..nn import (CHANNEL_SPARSE_NORMS, ChannelSparseBatchNorm2d, ChannelSparseConv2d,
                  ChannelSparseGroupNorm, ChannelSparseLayerNorm, ChannelSparseLinear,
                  ChannelSparseNormAct)
from .group import SPEC_ATTR, recorded_spec
from .pieces import link_pieces
from .trace import (_augmented_assignment, is_convertible_conv, is_convertible_linear,
                    link_graphs, link_without_graph, trace_modes)

__all__ = ["convert", "conversion_notes"]


def conversion_notes(model: nn.Module) -> dict[str, str]:
    """For a converted model: every conv whose output channels stay full, and why;
    for a model traced in pieces also every module fx could not trace, and how its
    children were linked (the model's class name for the model itself)."""
    spec = recorded_spec(model)
    if spec is None:
        raise ValueError(f"{type(model).__name__} was not converted by dce_kernels.convert")
    return {**dict(spec.kept_full), **dict(spec.linked)}


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
            concrete_args: Optional[dict[str, Any]] = None,
            example_inputs: Any = None) -> nn.Module:
    """Makes ``model`` channel-sparse; returns it (converted in place unless ``copy``).

    Args:
        model: any ``nn.Module`` with ``nn.Conv2d`` layers.
        exclude: names of submodules (``"layer4"``, ``"features.0"``) whose convs'
            output channels are never selected.
        copy: convert a deep copy and leave ``model`` as it was.
        concrete_args: passed to ``torch.fx.Tracer.trace`` (for forwards with
            non-tensor arguments that steer control flow).
        example_inputs: a tensor or a tuple of the model's positional arguments,
            used only when fx cannot trace the whole model: one forward on them per
            mode shows how the traceable pieces connect. The links hold for inputs
            that take the same paths through the untraced code (the same size, for
            a branch on the size).

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
    if not any(is_convertible_conv(m) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d to convert")
    if copy:
        model = copy_module.deepcopy(model)

    if torch.is_tensor(example_inputs):
        example_inputs = (example_inputs,)
    elif example_inputs is not None and not isinstance(example_inputs, (tuple, list)):
        raise TypeError("example_inputs: a tensor or a tuple of the model's arguments, got "
                        f"{type(example_inputs).__name__}")
    in_pieces = False
    try:
        graphs = trace_modes(model, concrete_args)
    except Exception as e:  # fx raises many kinds (TraceError, TypeError, ...)
        if example_inputs is not None:
            # No one graph shows what follows a conv across pieces: every in-place
            # module becomes out-of-place (the same result) before they are traced.
            _inplace_off(model)
            linked, links = link_pieces(model, tuple(example_inputs), exclude, concrete_args)
            spec = dataclasses.replace(linked.spec, linked=links)
            inplace_after, norm_after = linked.inplace_after, linked.norm_after
            layer_norms, traced, in_pieces = linked.layer_norms, False, True
        else:
            warnings.warn(
                f"dce_kernels.convert: torch.fx cannot trace {type(model).__name__} "
                f"({type(e).__name__}: {e}). Converting without the graph: every Conv2d "
                "(groups=1) is its own channel group reading all its input channels "
                "(correct but slower), BatchNorms stay dense, and a compact model cannot be "
                "exported from a partial selection. Pass example_inputs to link the modules "
                "that do trace, or make forward traceable (no Python control flow on "
                "tensor values) for the full conversion.", stacklevel=2)
            spec = link_without_graph(model, exclude)
            traced = False
            norm_after: dict[str, tuple[str, ...]] = {}
            layer_norms: dict[str, int] = {}
    else:
        linked = link_graphs(model, graphs, exclude)
        spec, inplace_after, norm_after = linked.spec, linked.inplace_after, linked.norm_after
        layer_norms = linked.layer_norms
        traced = True

    modules = dict(model.named_modules())
    to_conv = set()
    to_norm = set()
    to_linear = set()
    for g in spec.groups:
        producer = modules[g.producer]
        (to_linear if isinstance(producer, nn.Linear) else to_conv).add(g.producer)
        # A tied Linear (over the channels of a channels-last map) is a Linear still.
        to_linear.update(n for n in g.tied if isinstance(modules[n], nn.Linear))
        to_conv.update([*(n for n in g.tied if not isinstance(modules[n], nn.Linear)),
                        *g.consumers, *g.depthwise])
        to_norm.update(g.norms)
        # Exactly nn.Linear (not a subclass with a forward of its own): it computes
        # only the active columns; other Linears stay plain and read them all.
        to_linear.update(n for n in g.linears if is_convertible_linear(modules[n]))
    replacements: dict[int, nn.Module] = {}
    for name in sorted(to_conv):
        m = modules[name]
        if type(m) is nn.Conv2d and id(m) not in replacements:
            replacements[id(m)] = ChannelSparseConv2d.from_dense(m)
    for name in sorted(to_linear):
        m = modules[name]
        if type(m) is nn.Linear and id(m) not in replacements:
            replacements[id(m)] = ChannelSparseLinear.from_dense(m)
    for name in sorted(to_norm):
        m = modules[name]
        if id(m) in replacements or isinstance(m, CHANNEL_SPARSE_NORMS):
            continue
        if type(m) is nn.BatchNorm2d:
            replacements[id(m)] = _sparse_norm(m)
        elif type(m) is nn.GroupNorm:
            replacements[id(m)] = ChannelSparseGroupNorm.from_module(m)
        elif isinstance(m, nn.LayerNorm):  # over the channels, in the dim the trace showed
            replacements[id(m)] = ChannelSparseLayerNorm.from_module(m, layer_norms[name])
        else:  # a subclass calling F.batch_norm, then the children the trace showed
            replacements[id(m)] = ChannelSparseNormAct.from_module(m, norm_after[name])
    _swap(model, replacements)

    if traced:
        sparse = to_conv | to_linear
        if _make_saliency_safe(model, inplace_after, sparse, warn=False):
            # Flags switched inside modules of other libraries: check on a new trace
            # that the ops are out of place now; what still is loses its saliency.
            again = link_graphs(model, trace_modes(model, concrete_args), exclude)
            _make_saliency_safe(model, again.inplace_after, sparse, switch=False)
    elif in_pieces:
        # In-place functions in the pieces' graphs (their modules are out of place).
        _make_saliency_safe(model, inplace_after, to_conv | to_linear, switch=False)
    else:
        # No graph to see what follows a conv: every in-place module becomes
        # out-of-place (the same result), so none can overwrite a conv's output.
        _inplace_off(model)
    setattr(model, SPEC_ATTR, spec)
    return model


def _inplace_off(model: nn.Module) -> None:
    for m in model.modules():
        if getattr(m, "inplace", None) is True:
            m.inplace = False


def _inplace_switch(model: nn.Module, user: torch.fx.Node) -> Optional[nn.Module]:
    """The module whose ``inplace = True`` makes ``user`` in place, if that is how
    it is: a torch module called on the output, or the innermost module whose own
    forward ran the in-place function (timm's activations take ``inplace``)."""
    if user.op == "call_module":
        return model.get_submodule(user.target)
    scope = list(user.meta.get("nn_module_stack", {}).values())
    if not scope or _augmented_assignment(user):
        return None
    owner = model.get_submodule(scope[-1][0])
    return owner if getattr(owner, "inplace", None) is True else None


def _make_saliency_safe(model: nn.Module, inplace_after: list[tuple[str, torch.fx.Node]],
                        converted: set[str], switch: bool = True, warn: bool = True) -> bool:
    """In-place ops on a sparse conv's output (which its saliency needs in backward)
    made out of place where a module's ``inplace`` flag says so (``switch``); with
    ``warn``, every other such conv stops tracking saliency, with a warning. Returns
    whether a flag inside another module's forward was switched (``warn=False``
    then leaves the rest to a check on a new trace)."""
    warned, switched_inside = set(), False
    for conv_name, user in inplace_after:
        if conv_name not in converted or conv_name in warned:
            continue
        module = _inplace_switch(model, user) if switch else None
        if module is not None:
            module.inplace = False
            switched_inside |= user.op != "call_module"
            continue
        if not warn:
            switched_inside = True  # the second pass warns
            continue
        conv = model.get_submodule(conv_name)
        conv.track_saliency = False
        warned.add(conv_name)
        warnings.warn(
            f"dce_kernels.convert: {user.format_node()} modifies the output of {conv_name} in "
            "place, which the saliency of a channel-sparse conv needs unmodified; that conv "
            "reports no saliency (track_saliency=False). Use the out-of-place op to get it.",
            stacklevel=3)
    return switched_inside
