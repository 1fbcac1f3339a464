"""Linking a model torch.fx cannot trace as a whole, from the pieces that it can.

``convert`` falls back to this when tracing the model raises and it was given
``example_inputs``:

1. *Pieces.* The model is traced with every module whose own forward fx cannot
   trace as a leaf (found one at a time: the innermost module a trace error
   passes through). Such a module is *opaque*: its children are traced the same
   way, each on its own, and an opaque child's children in turn. When the
   model's own forward does not trace, the model itself is opaque.
2. *Evidence.* One forward pass on ``example_inputs`` per mode (training and
   eval, the model's state restored afterwards), with hooks on every module and
   a ``TorchFunctionMode`` that sees every torch op run by the opaque modules'
   own code. Per call of an opaque module it records, for each call of a child,
   which tensor it was given: the opaque module's input, a child's output (the
   same object), or a tensor its own code made; which of those tensors its own
   code read (reading only the shape, dtype or device is not reading); and
   which tensor it returned. A channel-wise op of the op table (elementwise,
   spatial) that its own code applies to one such tensor, keeping batch and
   channels, carries its channels (timm's ``ConvMlp`` pools its input so).
3. *Analysis.* The analysis of traced graphs (:mod:`.trace`) walks the pieces'
   graphs in the order they ran, each graph's input bound to the channels of the
   tensor it was given, so spaces, members and full marks come out as for one
   graph. A tensor two children read is read by both, as a fork in one graph
   is: every read was observed. What the evidence does not make certain stays
   full with a reason: a tensor read otherwise by an opaque module's own code
   (``y.mean() > 0``, ``a + b``: the other rules need the graph) or returned
   inside a tuple, a child called with several tensors, a child given a tensor
   made by untraced code (it reads channels of nobody's group), an opaque module
   called more than once, and every layer that also runs outside the traced
   pieces (called by untraced code directly).

The evidence holds for inputs that take the paths the example inputs took
through the untraced code (a branch on the input's size, as timm's ``ConvMlp``
takes, is taken alike for every input of that size). Not seen: untraced code
that branches on the channel count (indexing ``x.shape`` is plain Python), which
the narrower compact model would change. Groups whose channels pass between
pieces never pack (the untraced code sees full-width tensors).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.fx
from torch import nn
from torch.overrides import TorchFunctionMode, resolve_name
from torch.utils._pytree import tree_flatten

from .optable import ELEMENTWISE_NAMES, SPATIAL_NAMES
from .spaces import OUTPUT_REASON, spec_from_analysis
from .trace import (Linked, _Analyzer, _layout, _Tracer, is_convertible_conv,
                    is_convertible_linear)

__all__ = ["link_pieces"]

# Ops that read a tensor's metadata, not its values: untraced code may call them on
# our channels (``if x.shape[-1] > 7``) without reading any channel.
_METADATA = {f"torch.Tensor.{name}" for name in (
    "shape.__get__", "size", "dim", "ndim.__get__", "dtype.__get__", "device.__get__",
    "numel", "__len__", "is_contiguous", "layout.__get__", "requires_grad.__get__",
    "is_cuda.__get__", "grad_fn.__get__", "ndimension", "nelement")}
# Ops that untraced code may apply to our channels: each channel on its own, zero to zero.
_CHANNELWISE = ELEMENTWISE_NAMES | SPATIAL_NAMES


class _CutTracer(_Tracer):
    """Our tracer with the modules in ``opaque`` as leaves; when tracing raises, the
    innermost module whose forward the error passed through is ``culprit``."""

    def __init__(self, opaque: set[str]) -> None:
        super().__init__()
        self.opaque = opaque
        self.culprit: Optional[str] = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.opaque or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.culprit is None:
                self.culprit = self.path_of_module(m)
            raise


class _Call(nn.Module):
    """A root for tracing ``model.<path>`` alone, whose module names are the
    model's own: it shares the model's children, parameters and buffers."""

    def __init__(self, model: nn.Module, path: str) -> None:
        super().__init__()
        self._modules = model._modules
        self._parameters = model._parameters
        self._buffers = model._buffers
        self.path = path

    def forward(self, x):
        return self.get_submodule(self.path)(x)


@dataclass
class _Traced:
    """A module traced with its opaque submodules as leaves (by mode: training first)."""

    name: str
    graphs: tuple[torch.fx.Graph, torch.fx.Graph]


@dataclass
class _Opaque:
    """A module whose own forward fx cannot trace (``error``: what fx raised); its
    children are pieces of their own."""

    name: str
    error: str


_Piece = Union[_Traced, _Opaque, None]  # None: not linked


def _describe(model: nn.Module, path: str, pieces: dict[str, _Piece],
              concrete_args: Optional[dict[str, Any]] = None) -> _Piece:
    """Traces ``model.<path>`` (the model itself for ``""``) in both modes, every
    module fx cannot trace through as a leaf; each module described goes into
    ``pieces``. None when it cannot be traced as one call on one tensor, though no
    module's own forward failed (another signature). ``concrete_args``: the
    model's, for its own forward."""
    root = model if path == "" else _Call(model, path)
    was_training, leaves = model.training, set()
    try:
        while True:
            tracer = _CutTracer(leaves)
            try:
                graphs = []
                for mode in (True, False):
                    model.train(mode)
                    graphs.append(tracer.trace(root, concrete_args=concrete_args))
                break
            except Exception as e:  # fx raises many kinds (TraceError, TypeError, ...)
                culprit = tracer.culprit
                if culprit in (None, path) or culprit in leaves:
                    if culprit is None and path != "":
                        return None  # the call itself did not trace (more arguments?)
                    node = _Opaque(path, f"{type(e).__name__}: {e}".splitlines()[0][:200])
                    pieces[path] = node
                    for child, _ in model.get_submodule(path).named_children():
                        name = f"{path}.{child}" if path else child
                        pieces[name] = _describe(model, name, pieces)
                    return node
                leaves.add(culprit)
    finally:
        model.train(was_training)
    for leaf in sorted(leaves):
        if leaf not in pieces:
            pieces[leaf] = _describe(model, leaf, pieces)
    traced = _Traced(path, (graphs[0], graphs[1]))
    pieces[path] = traced
    return traced


# -- the evidence: one observed forward per mode -----------------------------------------

@dataclass
class _Step:
    """One call of a child inside one call of an opaque module."""

    child: str
    single: bool  # called with one tensor and nothing else
    source: Optional[str]  # of that tensor: "input", "step <k>"; None: made by untraced code
    others: list[str] = field(default_factory=list)  # sources of the tensors of other calls
    output: Optional[torch.Tensor] = None


@dataclass
class _Record:
    """One call of an opaque module: what its children were given and what its own
    code read and returned."""

    name: str
    input: Optional[torch.Tensor]
    steps: list[_Step] = field(default_factory=list)
    sources: dict[int, tuple[str, torch.Tensor]] = field(default_factory=dict)  # id -> source
    own_reads: dict[str, str] = field(default_factory=dict)  # source -> the op that read it
    # channel-wise ops of its own code on one tensor of ours: (op, source of that tensor)
    ops: list[tuple[str, str]] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # steps and ops, "step <k>", "op <j>"
    output: Optional[str] = None  # the source of the tensor it returned
    escaped: list[str] = field(default_factory=list)  # sources returned inside a structure

    def source(self, t: Any) -> Optional[str]:
        hit = self.sources.get(id(t)) if torch.is_tensor(t) else None
        return hit[0] if hit is not None and hit[1] is t else None


class _Observer(TorchFunctionMode):
    """Hooks on every module and a torch function mode: fills one :class:`_Record`
    per call of an opaque module, and ``outside``, the modules that ran outside the
    pieces (called by an opaque module's own code, or inside a child not linked)."""

    def __init__(self, model: nn.Module, pieces: dict[str, _Piece]) -> None:
        super().__init__()
        self.pieces = pieces
        self.records: dict[str, list[_Record]] = {}
        self.outside: set[str] = set()
        self.stack: list[tuple[str, Optional[_Record]]] = []  # module calls, innermost last
        self.handles = []
        for name, m in model.named_modules():
            self.handles.append(m.register_forward_pre_hook(self._enter(name), with_kwargs=True))
            self.handles.append(m.register_forward_hook(self._leave(name), with_kwargs=True,
                                                        always_call=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def _opaque_frame(self) -> Optional[tuple[int, _Record]]:
        """The innermost call of an opaque module on the stack, and where."""
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][1] is not None:
                return i, self.stack[i][1]
        return None

    def _linked_child(self, i: int, record: _Record) -> bool:
        """Whether the call above ``record``'s on the stack is a step it links: a
        child traced on its own, called with one tensor."""
        child = self.stack[i + 1][0]
        step = record.steps[-1] if record.steps else None
        return (_is_child(child, record.name) and isinstance(self.pieces.get(child), _Traced)
                and step is not None and step.child == child and step.single)

    def _enter(self, name):
        def hook(module, args, kwargs):
            frame = self._opaque_frame()
            tensors = [t for t in tree_flatten((args, kwargs))[0] if torch.is_tensor(t)]
            if frame is not None and len(self.stack) == frame[0] + 1:
                parent = frame[1]
                if _is_child(name, parent.name):  # a step of the opaque module
                    single = len(args) == 1 and torch.is_tensor(args[0]) and not kwargs
                    sources = [parent.source(t) for t in tensors]
                    step = _Step(name, single, sources[0] if single else None,
                                 [] if single else [s for s in sources if s])
                    parent.steps.append(step)
                    parent.order.append(f"step {len(parent.steps) - 1}")
                else:  # a deeper module called by the opaque module's own code
                    self.outside.add(name)
                    for t in tensors:
                        self._read(parent, t, f"{name} (called by its own code)")
            elif frame is not None and not self._linked_child(*frame):
                self.outside.add(name)
            record = None
            if isinstance(self.pieces.get(name), _Opaque):
                record = _Record(name, args[0] if len(args) == 1 and torch.is_tensor(args[0])
                                 and not kwargs else None)
                if record.input is not None:
                    record.sources[id(record.input)] = ("input", record.input)
                self.records.setdefault(name, []).append(record)
            self.stack.append((name, record))
        return hook

    def _leave(self, name):
        def hook(module, args, kwargs, output):
            _, record = self.stack.pop()
            if record is not None:
                outputs = [t for t in tree_flatten(output)[0] if torch.is_tensor(t)]
                if torch.is_tensor(output):
                    record.output = record.source(output)
                else:
                    record.escaped = [s for s in map(record.source, outputs) if s]
            frame = self._opaque_frame()
            if frame is not None and len(self.stack) == frame[0] + 1:
                parent = frame[1]
                if _is_child(name, parent.name) and parent.steps and \
                        parent.steps[-1].child == name:
                    k = len(parent.steps) - 1
                    if torch.is_tensor(output):
                        parent.steps[k].output = output
                        parent.sources[id(output)] = (f"step {k}", output)
                    else:  # its tensors reach untraced code
                        for t in tree_flatten(output)[0]:
                            if torch.is_tensor(t):
                                parent.sources[id(t)] = (f"step {k} (in a structure)", t)
        return hook

    def _read(self, record: _Record, t: Any, what: str) -> None:
        source = record.source(t)
        if source is not None:
            record.own_reads.setdefault(source, what)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        frame = self._opaque_frame()
        if frame is None or len(self.stack) != frame[0] + 1:
            return func(*args, **kwargs)
        # The opaque module's own code.
        record = frame[1]
        name = resolve_name(func) or getattr(func, "__name__", str(func))
        if name in _METADATA:
            return func(*args, **kwargs)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if torch.is_tensor(t)]
        result = func(*args, **kwargs)
        source = record.source(tensors[0]) if len(tensors) == 1 else None
        if (source is not None and name.startswith("torch.")
                and name.rpartition(".")[2] in _CHANNELWISE and torch.is_tensor(result)
                and result is not tensors[0] and result.dim() == tensors[0].dim() == 4
                and result.shape[:2] == tensors[0].shape[:2]):
            # Each channel of the result is that channel of its input's: ours still.
            record.ops.append((name.removeprefix("torch."), source))
            record.sources[id(result)] = (f"op {len(record.ops) - 1}", result)
            record.order.append(f"op {len(record.ops) - 1}")
        else:
            for t in tensors:
                self._read(record, t, name.removeprefix("torch."))
        return result


def _is_child(name: str, parent: str) -> bool:
    return (name.rpartition(".")[0] == parent) if parent else ("." not in name and name != "")


def _observe(model: nn.Module, pieces, example_inputs: tuple, training: bool) -> _Observer:
    """One forward in the given mode, leaving parameters, buffers, RNG and mode as they were."""
    was_training = model.training
    saved = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()
             if torch.is_tensor(v)}
    observer = _Observer(model, pieces)
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), observer:
            model.train(training)
            model(*example_inputs)
    except Exception as e:
        mode = "training" if training else "eval"
        raise ValueError(f"dce_kernels.convert: the forward of {type(model).__name__} on "
                         f"example_inputs raised in {mode} mode ({type(e).__name__}: {e})"
                         ) from e
    finally:
        observer.remove()
        model.train(was_training)
        with torch.no_grad():
            for k, v in model.state_dict(keep_vars=True).items():
                if k in saved:
                    v.copy_(saved[k])
    return observer


# -- the analysis over the pieces --------------------------------------------------------

class _PieceAnalyzer(_Analyzer):
    """The graph analysis over the pieces, walked in the order they ran."""

    def __init__(self, model: nn.Module, exclude: tuple[str, ...], pieces, observers) -> None:
        super().__init__(dict(model.named_modules()), exclude)
        self.pieces = pieces
        self.observers = observers  # by mode
        self.crossing: set[int] = set()  # spaces passed between pieces
        self.notes: dict[str, list[str]] = {}
        self._bound: list = []
        self._nested = False
        self._result = None
        # The conv (or Linear) whose very output the walk's input is, and the one its
        # result is: an in-place op at the start of a piece modifies that output.
        self._raw: Optional[str] = None
        self._result_raw: Optional[str] = None
        self._training = True
        self._calls: dict[str, int] = {}

    def analyze(self, root: Union[_Traced, _Opaque]) -> None:
        for training in (True, False):
            self._training, self._calls = training, {}
            if isinstance(root, _Traced):
                self._walk(root.graphs[0 if training else 1], [], nested=False)
            else:
                out, _ = self._opaque_call(root, None)
                self._keep_full([out], OUTPUT_REASON)
        for name in self.observers[0].outside | self.observers[1].outside:
            m = self.modules[name]
            if name in self.a.space_of:
                self.a.spaces.keep_full(self.a.space_of[name], f"{name}: also runs in code "
                                        "torch.fx did not trace")
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.LayerNorm)):
                self.a.opaque_calls.add(name)

    def _cross(self, value) -> None:
        for s in self.a.spaces.leaves(_layout(value)):
            self.crossing.add(s)

    def _walk(self, graph: torch.fx.Graph, bound: list, nested: bool,
              raw: Optional[str] = None):
        """The value (and the conv whose output it is) the graph returns, its
        placeholders bound to ``bound``."""
        saved = (self.value, self._chains, self._bound, self._nested, self._result, self._raw,
                 self._result_raw)
        self._bound, self._nested, self._result = list(bound), nested, None
        self._raw, self._result_raw = raw, None
        try:
            self.run(graph)
            return self._result, self._result_raw
        finally:
            (self.value, self._chains, self._bound, self._nested, _, self._raw,
             self._result_raw) = saved

    def _on_placeholder(self, node):
        self.value[node] = self._bound.pop(0) if self._bound else None
        if self._raw is not None:
            start = len(self.inplace_after)
            self._find_inplace(node)  # records the placeholder: it is the conv's output
            self.inplace_after[start:] = [(self._raw, user)
                                          for _, user in self.inplace_after[start:]]
            self._raw = None

    def _raw_conv(self, arg) -> Optional[str]:
        """The conv or Linear whose output ``arg`` is, directly."""
        if isinstance(arg, torch.fx.Node) and arg.op == "call_module":
            m = self.modules[arg.target]
            if is_convertible_conv(m) or is_convertible_linear(m):
                return arg.target
        return None

    def _on_output(self, node):
        if not self._nested:
            return super()._on_output(node)
        arg = node.args[0]
        if isinstance(arg, torch.fx.Node):
            self._result, self._result_raw = self._val(arg), self._raw_conv(arg)
            self.value[node] = None
        else:
            self._opaque(node, f"{node.name}: a piece returns several tensors to untraced code")

    def _on_call_module(self, node):
        piece = self.pieces.get(node.target)
        if not isinstance(piece, _Opaque):
            return super()._on_call_module(node)
        x = self._val(node.args[0]) if node.args else None
        if len(node.args) != 1 or node.kwargs:
            self._opaque(node, f"{node.target}: called with several arguments")
            x = None
        self.value[node] = self._opaque_call(piece, x, self._raw_conv(node.args[0])
                                             if node.args else None)[0]

    def _opaque_call(self, piece: _Opaque, x, raw: Optional[str] = None):
        """The channels of what one call of ``piece`` returns, given its input's (and
        the conv whose output it is, if ``raw``: that input, or None)."""
        observer = self.observers[0 if self._training else 1]
        records = observer.records.get(piece.name, [])
        k = self._calls.get(piece.name, 0)
        self._calls[piece.name] = k + 1
        note = self.notes.setdefault(piece.name, [])
        if len(records) != 1 or k > 0:
            runs = max(len(records), k + 1)
            self._keep_full([x], f"{piece.name}: runs {runs} times in one forward, "
                                 "its children are not linked")
            self._note(note, f"ran {runs} times in one forward: not linked")
            self._unlink(piece.name)
            return None, None
        record = records[0]
        self._cross(x)
        values: dict[str, Any] = {"input": x}
        raws: dict[str, Optional[str]] = {"input": raw}
        links = []
        for event in record.order:
            kind, _, index = event.partition(" ")
            if kind == "op":
                op, source = record.ops[int(index)]
                v = values.get(source)
                if isinstance(v, tuple):  # the channels of a (N, C, H, W) map: carried through
                    values[event] = v
                else:
                    self._keep_full([v], f"{piece.name}: its forward, which torch.fx cannot "
                                         f"trace, applies {op} to "
                                         f"{_source_name(record, source, source)}")
                continue
            i = int(index)
            step = record.steps[i]
            child = self.pieces.get(step.child)
            given = values.get(step.source) if step.source else None
            if child is None or not step.single:
                why = ("is called with other than one tensor" if not step.single
                       else "cannot be traced as one call on one tensor")
                self._keep_full([values.get(s.split(" (")[0]) for s in step.others] + [given],
                                f"{step.child}: {why}, so what it reads stays full")
                self._unlink(step.child)
                out = None
                links.append(f"{step.child} (not linked: it {why})")
            elif isinstance(child, _Opaque):
                out, raws[event] = self._opaque_call(child, given, raws.get(step.source))
            else:
                out, raws[event] = self._walk(child.graphs[0 if self._training else 1],
                                              [given], True, raws.get(step.source))
            self._cross(out)
            values[event] = out
            if child is not None and step.single:
                links.append(f"{step.child} <- "
                             f"{_source_name(record, step.source, 'its own code')}")
        for source, what in record.own_reads.items():
            self._keep_full([values.get(source.split(" (")[0])],
                            f"{piece.name}: its forward, which torch.fx cannot trace, reads "
                            f"{_source_name(record, source, source)} ({what})")
        for source in record.escaped:
            self._keep_full([values.get(source.split(" (")[0])],
                            f"{piece.name}: returns {_source_name(record, source, source)} "
                            "inside a structure")
        out = values.get(record.output) if record.output else None
        links.append(f"output <- {_source_name(record, record.output, 'its own code')}")
        mode = "training" if self._training else "eval"
        self._note(note, f"{mode}: " + ", ".join(links))
        return out, raws.get(record.output)

    def _unlink(self, name: str) -> None:
        """Every layer inside ``name`` runs on channels nobody follows."""
        prefix = name + "."
        for layer in self.modules:
            if layer == name or layer.startswith(prefix):
                m = self.modules[layer]
                if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.LayerNorm)):
                    self.a.opaque_calls.add(layer)
                if layer in self.a.space_of:
                    self.a.spaces.keep_full(self.a.space_of[layer],
                                            f"{layer}: runs in {name}, which is not linked")

    @staticmethod
    def _note(note: list[str], text: str) -> None:
        if text not in note:
            note.append(text)


def _source_name(record: _Record, source: Optional[str], default: str) -> str:
    if not source:
        return default
    if source == "input":
        return "its input"
    k = int(source.split()[1])
    if source.startswith("op "):
        op, of = record.ops[k]
        return f"{op.rpartition('.')[2]}({_source_name(record, of, of)})"
    return record.steps[k].child + ("'s output" if " (" not in source else "'s outputs")


def link_pieces(model: nn.Module, example_inputs: tuple, exclude: tuple[str, ...],
                concrete_args: Optional[dict[str, Any]] = None
                ) -> tuple[Linked, tuple[tuple[str, str], ...]]:
    """The channel groups of a model fx cannot trace as a whole (see the module
    docstring), and per opaque module how its children were linked (its name,
    the model's class name for the model itself)."""
    pieces: dict[str, _Piece] = {}
    root = _describe(model, "", pieces, concrete_args)
    observers = [_observe(model, pieces, example_inputs, training) for training in (True, False)]
    analyzer = _PieceAnalyzer(model, exclude, pieces, observers)
    analyzer.analyze(root)
    spec = spec_from_analysis(analyzer.a)
    sp = analyzer.a.spaces
    crossing = {sp.find(s) for s in analyzer.crossing}
    groups = tuple(dataclasses.replace(g, sole_readers=False)
                   if sp.find(analyzer.a.space_of[g.producer]) in crossing else g
                   for g in spec.groups)
    spec = dataclasses.replace(spec, groups=groups)
    links = []
    for name, texts in analyzer.notes.items():
        bodies = [t.partition(": ")[2] for t in texts]
        if len(texts) == 2 and bodies[0] == bodies[1] and texts[0].startswith("training: "):
            texts = [f"training and eval: {bodies[0]}"]
        links.append((name or type(model).__name__,
                      f"torch.fx cannot trace its forward ({pieces[name].error}); linked from "
                      "one observed forward per mode: " + "; ".join(texts)))
    linked = Linked(spec, analyzer.inplace_after, analyzer.norm_after, analyzer.layer_norms)
    return linked, tuple(links)
