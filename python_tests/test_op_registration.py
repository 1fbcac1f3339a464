"""The op as PyTorch sees it: schema, fake kernels, autograd registration,
torch.compile, and the errors bad input gets."""
from __future__ import annotations

import inspect

import pytest
import torch

import dce_kernels
from dce_kernels import ops
from toolkit import BACKENDS

OP = torch.ops.dce.channel_sparse_conv2d.default

# Every library of the dce schemas present here: dce, and dce_emu where the emulator is built.
NAMESPACES = sorted({backend.namespace for backend in BACKENDS})


def _schema_arguments(op):
    return [(a.name, str(a.type), a.default_value if a.has_default_value() else "no default")
            for a in op._schema.arguments]


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_every_library_registers_the_same_schemas(namespace):
    library = getattr(torch.ops, namespace)
    for name, names in (("channel_sparse_conv2d", ops.CONV_ARGS),
                        ("channel_sparse_conv2d_backward", ops.CONV_BACKWARD_ARGS)):
        op, reference = getattr(library, name).default, getattr(torch.ops.dce, name).default
        # ops.py finds arguments by these names (read from torch.ops.dce's schemas).
        assert tuple(a.name for a in op._schema.arguments) == names
        assert _schema_arguments(op) == _schema_arguments(reference)
        assert [str(r.type) for r in op._schema.returns] == \
            [str(r.type) for r in reference._schema.returns]


def test_ops_py_reads_arguments_the_schemas_have():
    # The names setup_context saves and the backward passes on, in both schemas.
    shared = set(ops._SAVED_TENSORS + ops._KEPT_PARAMS)
    assert shared <= set(ops.CONV_ARGS) & set(ops.CONV_BACKWARD_ARGS)
    assert {"bias", "saliency_probe"} <= set(ops.CONV_ARGS)
    assert {"grad_output", "output", "output_mask"} <= set(ops.CONV_BACKWARD_ARGS)


def _mirrors():
    """Python functions whose parameters are the op's arguments in schema order:
    (function, schema arguments, leading parameters that are not the op's)."""
    conv, backward = OP, torch.ops.dce.channel_sparse_conv2d_backward.default
    found = [("channel_sparse_conv2d", dce_kernels.channel_sparse_conv2d, conv, 0),
             ("call_conv_op", ops.call_conv_op, conv, 1),
             ("forward_fake", ops._forward_fake, conv, 0),
             ("backward_fake", ops._backward_fake, backward, 0)]
    if "dce_emu" in NAMESPACES:
        from dce_kernels import emulated
        found.append(("emulated.channel_sparse_conv2d", emulated.channel_sparse_conv2d, conv, 0))
        found.append(("emulated.cudnn_channel_sparse_conv2d",
                      emulated.cudnn_channel_sparse_conv2d, conv, 0))
    return [pytest.param(*rest, id=name) for name, *rest in found]


@pytest.mark.parametrize("fn, op, skip", _mirrors())
def test_python_signatures_follow_the_schema(fn, op, skip):
    params = list(inspect.signature(fn).parameters.values())[skip:]
    assert [p.name for p in params] == [a.name for a in op._schema.arguments]
    for param, arg in zip(params, op._schema.arguments):
        # The dispatcher drops arguments equal to their schema default before it
        # calls a fake kernel, so a Python default must be that same value.
        if arg.has_default_value():
            assert param.default == arg.default_value, f"{fn.__qualname__}({param.name})"


def _args(requires_grad: bool, dtype=torch.float64, stride=(1, 1), padding=(1, 1),
          dilation=(1, 1), device="cpu"):
    leaf = dict(dtype=dtype, device=device, requires_grad=requires_grad)
    x = torch.randn(2, 6, 7, 5, **leaf)
    w = torch.randn(5, 6, 3, 3, **leaf)
    b = torch.randn(5, **leaf)
    probe = torch.zeros(5, **leaf)
    return (x, w, b, torch.tensor([0, 2, 5], device=device),
            torch.tensor([4, 1], device=device), list(stride), list(padding), list(dilation), 1,
            probe)


# opcheck: the schema, fake kernel, autograd registration and dispatch of each backend's op.
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("geometry", [dict(), dict(stride=(2, 1), padding=(0, 2), dilation=(1, 2))])
def test_opcheck(backend, requires_grad, geometry):
    args = _args(requires_grad, device=backend.device, **geometry)
    torch.library.opcheck(backend.ops.channel_sparse_conv2d.default, args)


def test_opcheck_without_bias_and_probe(backend):
    x, w, _, in_idx, out_idx, *rest = _args(True, device=backend.device)
    args = (x, w, None, in_idx, out_idx, *rest[:-1], None)
    torch.library.opcheck(backend.ops.channel_sparse_conv2d.default, args)


def test_opcheck_float32_with_an_input_that_needs_no_grad(backend):
    dev = backend.device
    x = torch.randn(2, 4, 5, 5, device=dev)
    w = torch.randn(3, 4, 3, 3, device=dev, requires_grad=True)
    b = torch.randn(3, device=dev, requires_grad=True)
    probe = torch.zeros(3, device=dev, requires_grad=True)
    torch.library.opcheck(
        backend.ops.channel_sparse_conv2d.default,
        (x, w, b, torch.tensor([0, 3], device=dev), torch.tensor([2], device=dev), [1, 1],
         [1, 1], [1, 1], 1, probe))


def test_backward_op_opcheck(backend):
    x, w, b, in_idx, out_idx, stride, padding, dilation, groups, _ = _args(
        False, device=backend.device)
    y = backend.ops.channel_sparse_conv2d(x, w, b, in_idx, out_idx, stride, padding, dilation,
                                          groups, None)
    g = torch.randn_like(y)
    for mask in ([True, True, True], [False, True, False], [True, False, True]):
        for compact in (False, True):
            torch.library.opcheck(
                backend.ops.channel_sparse_conv2d_backward.default,
                (g, x, w, y, in_idx, out_idx, stride, padding, dilation, groups, mask),
                {"compact_grad_weight": compact})


def test_opcheck_with_a_compact_weight(backend):
    x, w, b, in_idx, out_idx, stride, padding, dilation, groups, probe = _args(
        True, device=backend.device)
    block = w.detach()[out_idx][:, in_idx].contiguous()
    args = (x, w, b, in_idx, out_idx, stride, padding, dilation, groups, probe)
    torch.library.opcheck(backend.ops.channel_sparse_conv2d.default, args,
                          {"compact_weight": block})
    y = backend.ops.channel_sparse_conv2d(*args)
    torch.library.opcheck(
        backend.ops.channel_sparse_conv2d_backward.default,
        (torch.randn_like(y), x.detach(), w.detach(), y.detach(), in_idx, out_idx, stride,
         padding, dilation, groups, [True, True, True]),
        {"compact_grad_weight": True, "compact_weight": block})


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    x, w, b, in_idx, out_idx, stride, padding, dilation, groups, _ = _args(True, torch.float32)

    def step(x, w, b, probe):
        y = dce_kernels.channel_sparse_conv2d(x, w, b, in_idx, out_idx, stride, padding,
                                              dilation, groups, saliency_probe=probe)
        return (y.relu() * torch.arange(y.shape[-1], dtype=y.dtype)).sum()

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        probe = torch.zeros(5, requires_grad=True)
        loss = fn(*leaves, probe)
        loss.backward()
        results.append([loss] + [t.grad for t in leaves] + [probe.grad])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert results[1][-1].abs().sum() > 0  # saliency really came through the compiled graph


def _call(**overrides):
    base = dict(input=torch.randn(2, 4, 6, 6), weight=torch.randn(3, 4, 3, 3), bias=None,
                in_idx=torch.tensor([0, 1]), out_idx=torch.tensor([2]), padding=1)
    base.update(overrides)
    return dce_kernels.channel_sparse_conv2d(**base)


@pytest.mark.parametrize("overrides, message", [
    (dict(in_idx=torch.tensor([0.0, 1.0])), "in_idx must hold int64 or int32"),
    (dict(out_idx=torch.tensor([True, False])), "out_idx must hold int64 or int32"),
    (dict(in_idx=torch.tensor([[0, 1]])), "in_idx must be a 1-D tensor"),
    (dict(in_idx=torch.tensor([1, 1])), "in_idx contains channel 1 more than once"),
    (dict(out_idx=torch.tensor([0, 3])), "out of range"),
    (dict(in_idx=torch.tensor([-1])), "out of range"),
    (dict(in_idx=torch.tensor([], dtype=torch.long)), "in_idx is empty"),
    (dict(out_idx=torch.tensor([0, 1, 2, 0])), "out_idx has 4 entries"),
    (dict(in_idx=torch.tensor([0, 1], device="meta")), "in_idx must be on the input's device"),
    (dict(weight=torch.randn(3, 5, 3, 3)), "input has 4 channels but weight expects 5"),
    (dict(weight=torch.randn(3, 4, 3, 3, dtype=torch.float64)), "weight dtype"),
    (dict(input=torch.randn(4, 6)), "input must be 4-D"),
    (dict(bias=torch.randn(4)), "bias must have shape"),
    (dict(input=torch.randn(1, 4, 2, 2), padding=0), "smaller than the dilated kernel"),
    (dict(input=torch.randint(0, 5, (2, 4, 6, 6))), "floating point"),
])
def test_bad_input_raises_a_clear_error(overrides, message):
    with pytest.raises((RuntimeError, ValueError, TypeError), match=message):
        _call(**overrides)


def test_bad_stride_and_padding_raise():
    with pytest.raises(RuntimeError, match="stride must be >= 1"):
        _call(stride=0)
    with pytest.raises(RuntimeError, match="padding must be >= 0"):
        _call(padding=-1)
    with pytest.raises(ValueError, match="padding='same' is not supported for strided"):
        _call(padding="same", stride=2)
    with pytest.raises(ValueError, match="padding must be an int"):
        _call(padding="full")


def test_bad_saliency_probe_shape_raises():
    with pytest.raises(RuntimeError, match="saliency_probe must have shape"):
        _call(saliency_probe=torch.zeros(7, requires_grad=True))


def _backward_call(backend, packed_output=False):
    """A forward of `backend`'s op and the keyword arguments of its backward op
    for that forward, all good: each bad-input case below spoils one of them."""
    dev = backend.device
    x = torch.randn(2, 6, 7, 5, dtype=torch.float64, device=dev)
    w = torch.randn(5, 6, 3, 3, dtype=torch.float64, device=dev)
    conv = dict(in_idx=torch.tensor([0, 2, 5], device=dev), out_idx=torch.tensor([1, 4], device=dev),
                stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1,
                packed_output=packed_output)
    y = backend.ops.channel_sparse_conv2d(x, w, None, saliency_probe=None, **conv)
    return dict(grad_output=torch.randn_like(y), input=x, weight=w, output=y,
                output_mask=[True, True, False], **conv)


# Every backend checks the backward's arguments with one function (csrc/common):
# grad_output and output must be what the forward returned for these arguments.
BAD_GRAD_OUTPUT = {
    "short spatially": (dict(), lambda a: dict(grad_output=a["grad_output"][..., :-1],
                                               output=None),
                        r"grad_output shape \[2, 5, 7, 4\] does not match .*\[2, 5, 7, 5\]"),
    "too few channels": (dict(), lambda a: dict(grad_output=a["grad_output"][:, :4], output=None),
                         r"grad_output shape \[2, 4, 7, 5\] does not match"),
    "unbatched": (dict(), lambda a: dict(grad_output=a["grad_output"][0], output=None),
                  "grad_output shape"),
    "full width for a packed output": (
        dict(packed_output=True),
        lambda a: dict(grad_output=torch.zeros(2, 5, 7, 5, dtype=torch.float64,
                                               device=a["input"].device), output=None),
        r"grad_output shape \[2, 5, 7, 5\] does not match .*\[2, 2, 7, 5\]"),
    "float32": (dict(), lambda a: dict(grad_output=a["grad_output"].float()),
                "grad_output dtype Float differs from input dtype Double"),
    "output of another shape": (dict(), lambda a: dict(output=a["output"][:, :, 1:]),
                                "output shape .* differs from grad_output shape"),
    "output float32": (dict(), lambda a: dict(output=a["output"].float()),
                       "output dtype Float differs from input dtype Double"),
}


@pytest.mark.parametrize("case", BAD_GRAD_OUTPUT)
def test_backward_op_rejects_a_bad_grad_output(backend, case):
    call_args, spoil, message = BAD_GRAD_OUTPUT[case]
    args = _backward_call(backend, **call_args)
    backward = backend.ops.channel_sparse_conv2d_backward
    backward(**args)  # the unspoilt call is fine: the error below is the spoilt argument's
    with pytest.raises(RuntimeError, match=message):
        backward(**{**args, **spoil(args)})


# -- the CUDA implementation switch (csrc/common/cuda_conv_impl.h) and autocast ---------------

def test_cuda_conv_impl_defaults_to_cudnn_and_can_be_switched():
    previous = dce_kernels.get_cuda_conv_impl()
    try:
        for impl in dce_kernels.ops.CUDA_CONV_IMPLS:
            dce_kernels.set_cuda_conv_impl(impl)
            assert dce_kernels.get_cuda_conv_impl() == impl
        with pytest.raises(RuntimeError, match='must be "cudnn" or "igemm".*"cudn"'):
            dce_kernels.set_cuda_conv_impl("cudn")
        assert dce_kernels.get_cuda_conv_impl() == "igemm"  # unchanged by the bad call
    finally:
        dce_kernels.set_cuda_conv_impl(previous)


@pytest.mark.parametrize("env, expected", [(None, "cudnn"), ("", "cudnn"), ("igemm", "igemm"),
                                           ("cudnn", "cudnn")])
def test_cuda_conv_impl_starts_from_the_environment(env, expected):
    out = _python_with_env(env, "import dce_kernels; print(dce_kernels.get_cuda_conv_impl())")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected


def test_a_bad_cuda_conv_environment_variable_is_an_error_naming_it():
    out = _python_with_env("tensor-cores", "import dce_kernels; dce_kernels.get_cuda_conv_impl()")
    assert out.returncode != 0
    assert "DCE_CUDA_CONV" in out.stderr and '"tensor-cores"' in out.stderr


def _python_with_env(value, code):
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env.pop("DCE_CUDA_CONV", None)
    if value is not None:
        env["DCE_CUDA_CONV"] = value
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)


def test_autocast_runs_the_op_in_the_autocast_dtype_on_cpu():
    """Under torch.autocast the op computes in the autocast dtype, as F.conv2d does, and
    the gradients reach the fp32 leaves in fp32."""
    x = torch.randn(2, 6, 7, 5, requires_grad=True)
    w = torch.randn(5, 6, 3, 3, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    in_idx, out_idx = torch.tensor([0, 2, 5]), torch.tensor([4, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dce_kernels.channel_sparse_conv2d(x, w, b, in_idx, out_idx, 1, 1)
        assert y.dtype == torch.nn.functional.conv2d(x, w, b, 1, 1).dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert x.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32
    from toolkit import assert_close_scaled, masked_conv2d
    ref = masked_conv2d(x.detach().double(), w.detach().double(), b.detach().double(), in_idx,
                        out_idx, 1, 1, 1, 1)
    assert_close_scaled(y, ref, torch.bfloat16, "output (autocast)")
    # The bf16 computation is what produced the gradient: it matches the reference's
    # gradient of the same loss within bf16's error.
    ref_x = x.detach().double().requires_grad_()
    masked_conv2d(ref_x, w.detach().double(), b.detach().double(), in_idx, out_idx, 1, 1, 1,
                  1).square().sum().backward()
    assert_close_scaled(x.grad, ref_x.grad, torch.bfloat16, "grad_input (autocast)")
