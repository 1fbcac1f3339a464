"""Weight gradients written over the active block only (dce_kernels/blocks.py and the
backward op's compact_grad_weight): the raw op's block against its own full-shape
result and the masked dense reference, and ``.grad`` after backward against the
masked dense reference in every way a training loop reads it (gradients set to None
or zeroed between steps, accumulated, kept by the user, a weight used twice)."""
import pytest
import torch

import dce_kernels
from dce_kernels import blocks
from dce_kernels.sparse_linear import channel_sparse_linear

from toolkit import BACKENDS, masked_dense, random_index

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _conv_case(gen, groups=1, channels=(7, 9), size=(6, 5)):
    cin, cout = channels
    if groups > 1:
        cin = cout = groups
    x = torch.randn(3, cin, *size, generator=gen, dtype=torch.float64)
    w = torch.randn(cout, cin // groups, 3, 3, generator=gen, dtype=torch.float64)
    return x, w


def _op_case(backend, seed, depthwise):
    """Input, weight, groups and random lists (a depthwise conv's two lists are one) on
    the backend's device, and the generator for what else the test draws."""
    gen = torch.Generator().manual_seed(seed)
    groups = 6 if depthwise else 1
    x, w = (t.to(backend.device) for t in _conv_case(gen, groups))
    in_idx = random_index(w.shape[1] * groups, 0.5, gen).to(backend.device)
    out_idx = in_idx if depthwise else random_index(w.shape[0], 0.6, gen).to(backend.device)
    return gen, x, w, groups, in_idx, out_idx


def _block_of(w, in_idx, out_idx, depthwise):
    block = w[out_idx]
    return block if depthwise else block[:, in_idx]


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
@pytest.mark.parametrize("depthwise", [False, True], ids=["groups1", "depthwise"])
def test_compact_grad_weight_is_the_block_of_the_full_gradient(backend, depthwise):
    gen, x, w, groups, in_idx, out_idx = _op_case(backend, 11, depthwise)
    ops = backend.ops
    with backend.active():
        y = ops.channel_sparse_conv2d(x, w, None, in_idx, out_idx, [1, 1], [1, 1], [1, 1],
                                      groups, None)
        g = torch.randn(y.shape, generator=gen, dtype=y.dtype).to(backend.device)
        full = ops.channel_sparse_conv2d_backward(g, x, w, None, in_idx, out_idx, [1, 1],
                                                  [1, 1], [1, 1], groups, [True, True, False])
        compact = ops.channel_sparse_conv2d_backward(g, x, w, None, in_idx, out_idx, [1, 1],
                                                     [1, 1], [1, 1], groups,
                                                     [True, True, False],
                                                     compact_grad_weight=True)
    ref = masked_dense(x, w, None, in_idx, out_idx, g, 1, 1, 1, groups).grad_weight
    block = _block_of(ref, in_idx.cpu(), out_idx.cpu(), depthwise)
    assert compact[1].shape == block.shape
    torch.testing.assert_close(compact[1].cpu(), block)
    torch.testing.assert_close(full[1].cpu(), ref)
    # The other results do not change with the weight gradient's layout.
    torch.testing.assert_close(compact[0], full[0])


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
def test_compact_grad_weight_of_a_grouped_conv_is_refused(backend):
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64, device=backend.device)
    w = torch.randn(8, 2, 3, 3, dtype=torch.float64, device=backend.device)
    idx = torch.arange(8, device=backend.device)
    with backend.active():
        y = backend.ops.channel_sparse_conv2d(x, w, None, idx, idx, [1, 1], [1, 1], [1, 1], 4,
                                              None)
        with pytest.raises(RuntimeError, match="compact_grad_weight needs groups == 1"):
            backend.ops.channel_sparse_conv2d_backward(
                torch.randn_like(y), x, w, None, idx, idx, [1, 1], [1, 1], [1, 1], 4,
                [False, True, False], compact_grad_weight=True)


def test_the_fake_kernel_gives_the_compact_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(2, 7, 6, 6)
        w = torch.empty(9, 7, 3, 3)
        g = torch.empty(2, 9, 4, 4)
        in_idx, out_idx = torch.empty(3, dtype=torch.long), torch.empty(5, dtype=torch.long)
        _, gw, _, _ = torch.ops.dce.channel_sparse_conv2d_backward(
            g, x, w, None, in_idx, out_idx, [1, 1], [0, 0], [1, 1], 1, [False, True, False],
            compact_grad_weight=True)
    assert tuple(gw.shape) == (5, 3, 3, 3)


class _Conv:
    """One conv weight (a Parameter) and the masked dense reference of its gradient."""

    def __init__(self, seed, groups=1):
        self.gen = torch.Generator().manual_seed(seed)
        self.groups = groups
        self.x, w = _conv_case(self.gen, groups)
        self.weight = torch.nn.Parameter(w)

    def lists(self, fraction=0.5):
        cin = self.weight.shape[1] * self.groups
        in_idx = random_index(cin, fraction, self.gen)
        if self.groups > 1:
            return in_idx, in_idx
        return in_idx, random_index(self.weight.shape[0], fraction, self.gen)

    def backward(self, in_idx, out_idx):
        """Runs forward and backward; returns the masked dense weight gradient."""
        y = dce_kernels.channel_sparse_conv2d(self.x, self.weight, None, in_idx, out_idx,
                                              padding=1, groups=self.groups)
        g = torch.randn(y.shape, generator=self.gen, dtype=y.dtype)
        y.backward(g)
        return masked_dense(self.x, self.weight, None, in_idx, out_idx, g, 1, 1, 1,
                            self.groups).grad_weight


@pytest.mark.parametrize("groups", [1, 6], ids=["groups1", "depthwise"])
def test_grad_over_changing_selections_equals_the_masked_dense_reference(groups):
    conv = _Conv(3, groups)
    storages = set()
    for step in range(5):
        want = conv.backward(*conv.lists(0.3 + 0.1 * step))
        torch.testing.assert_close(conv.weight.grad, want)
        # Exactly zero wherever the reference is (inactive rows and columns).
        assert torch.equal(conv.weight.grad[want == 0], want[want == 0])
        storages.add(conv.weight.grad.untyped_storage().data_ptr())
        conv.weight.grad = None
    # Every step after the first wrote into the same buffer.
    assert len(storages) == 1


def test_the_same_selection_twice_overwrites_the_block():
    conv = _Conv(4)
    lists = conv.lists()
    for _ in range(3):
        want = conv.backward(*lists)
        torch.testing.assert_close(conv.weight.grad, want)
        conv.weight.grad = None


def test_grad_zeroed_in_place_between_steps():
    conv = _Conv(5)
    for _ in range(3):
        want = conv.backward(*conv.lists())
        torch.testing.assert_close(conv.weight.grad, want)
        conv.weight.grad.zero_()  # zero_grad(set_to_none=False)


def test_accumulated_grads_are_the_sum_of_each_steps_reference():
    conv = _Conv(6)
    total = conv.backward(*conv.lists(0.4))
    total = total + conv.backward(*conv.lists(0.6))
    total = total + conv.backward(*conv.lists(0.5))
    torch.testing.assert_close(conv.weight.grad, total)
    # After the accumulation the buffer starts afresh: no stale entries.
    conv.weight.grad = None
    for _ in range(2):
        want = conv.backward(*conv.lists(0.3))
        torch.testing.assert_close(conv.weight.grad, want)
        conv.weight.grad = None


def test_a_kept_reference_to_an_old_grad_is_never_written():
    conv = _Conv(7)
    conv.backward(*conv.lists())
    kept = conv.weight.grad
    snapshot = kept.clone()
    conv.weight.grad = None
    want = conv.backward(*conv.lists())
    assert torch.equal(kept, snapshot)
    torch.testing.assert_close(conv.weight.grad, want)


def test_a_weight_used_twice_in_one_graph_gets_both_gradients():
    conv = _Conv(8)
    a, b = conv.lists(0.4), conv.lists(0.7)
    y1 = dce_kernels.channel_sparse_conv2d(conv.x, conv.weight, None, *a, padding=1)
    y2 = dce_kernels.channel_sparse_conv2d(conv.x, conv.weight, None, *b, padding=1)
    g1 = torch.randn(y1.shape, generator=conv.gen, dtype=y1.dtype)
    g2 = torch.randn(y2.shape, generator=conv.gen, dtype=y2.dtype)
    torch.autograd.backward([y1, y2], [g1, g2])
    want = (masked_dense(conv.x, conv.weight, None, *a, g1, 1, 1).grad_weight
            + masked_dense(conv.x, conv.weight, None, *b, g2, 1, 1).grad_weight)
    torch.testing.assert_close(conv.weight.grad, want)


def test_create_graph_takes_a_fresh_gradient():
    conv = _Conv(9)
    in_idx, out_idx = conv.lists()
    y = dce_kernels.channel_sparse_conv2d(conv.x, conv.weight, None, in_idx, out_idx, padding=1)
    g = torch.randn(y.shape, generator=conv.gen, dtype=y.dtype)
    (gw,) = torch.autograd.grad(y, conv.weight, g, create_graph=True)
    want = masked_dense(conv.x, conv.weight, None, in_idx, out_idx, g, 1, 1).grad_weight
    torch.testing.assert_close(gw, want)
    assert conv.weight not in blocks._BUFFERS


def test_a_parameter_moved_to_another_dtype_gets_a_new_buffer():
    conv = _Conv(10)
    conv.backward(*conv.lists())
    conv.weight.grad = None
    conv.weight.data = conv.weight.data.float()
    conv.x = conv.x.float()
    in_idx, out_idx = conv.lists()
    y = dce_kernels.channel_sparse_conv2d(conv.x, conv.weight, None, in_idx, out_idx, padding=1)
    g = torch.randn(y.shape, generator=conv.gen)
    y.backward(g)
    want = masked_dense(conv.x, conv.weight, None, in_idx, out_idx, g, 1, 1).grad_weight
    assert conv.weight.grad.dtype == torch.float32
    torch.testing.assert_close(conv.weight.grad.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_run", [1, 4], ids=["features", "runs"])
def test_linear_grad_over_changing_selections(in_run):
    gen = torch.Generator().manual_seed(12)
    weight = torch.nn.Parameter(torch.randn(11, 20, generator=gen, dtype=torch.float64))
    x = torch.randn(5, 20, generator=gen, dtype=torch.float64)
    storages = set()
    for step in range(4):
        runs = random_index(20 // in_run, 0.3 + 0.15 * step, gen)
        in_idx = (runs.unsqueeze(1) * in_run + torch.arange(in_run)).reshape(-1)
        out_idx = random_index(11, 0.5, gen)
        y = channel_sparse_linear(x, weight, None, in_idx, out_idx, in_run=in_run)
        g = torch.randn(y.shape, generator=gen, dtype=y.dtype)
        y.backward(g)
        m_in = torch.zeros(20, dtype=x.dtype).index_fill_(0, in_idx, 1)
        m_out = torch.zeros(11, dtype=x.dtype).index_fill_(0, out_idx, 1)
        want = (g * m_out).t() @ (x * m_in)
        torch.testing.assert_close(weight.grad, want)
        storages.add(weight.grad.untyped_storage().data_ptr())
        weight.grad = None
    assert len(storages) == 1


# -- compact_weight: the caller's copy of the active block stands in for the gathers -----

@pytest.mark.parametrize("backend", BACKENDS, ids=str)
@pytest.mark.parametrize("depthwise", [False, True], ids=["groups1", "depthwise"])
def test_compact_weight_gives_the_same_results(backend, depthwise):
    gen, x, w, groups, in_idx, out_idx = _op_case(backend, 21, depthwise)
    block = _block_of(w, in_idx, out_idx, depthwise).contiguous()
    geometry = ([1, 1], [1, 1], [1, 1], groups)
    ops = backend.ops
    with backend.active():
        y = ops.channel_sparse_conv2d(x, w, None, in_idx, out_idx, *geometry, None)
        y_c = ops.channel_sparse_conv2d(x, w, None, in_idx, out_idx, *geometry, None,
                                        compact_weight=block)
        g = torch.randn(y.shape, generator=gen, dtype=y.dtype).to(backend.device)
        want = ops.channel_sparse_conv2d_backward(g, x, w, y, in_idx, out_idx, *geometry,
                                                  [True, True, False])
        got = ops.channel_sparse_conv2d_backward(g, x, w, y, in_idx, out_idx, *geometry,
                                                 [True, True, False], compact_weight=block)
    ref = masked_dense(x, w, None, in_idx, out_idx, g, 1, 1, 1, groups)
    torch.testing.assert_close(y_c.cpu(), ref.output)
    torch.testing.assert_close(y_c, y)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


def test_the_cpu_backend_computes_with_the_given_block():
    # Not a contract (its values are trusted), but the point of passing it: the
    # block given is what the CPU kernels convolve with, not a second gather.
    gen = torch.Generator().manual_seed(22)
    x, w = _conv_case(gen)
    in_idx, out_idx = random_index(7, 0.5, gen), random_index(9, 0.5, gen)
    block = _block_of(w, in_idx, out_idx, False).contiguous()
    y = torch.ops.dce.channel_sparse_conv2d(x, w, None, in_idx, out_idx, [1, 1], [1, 1],
                                            [1, 1], 1, None, compact_weight=2 * block)
    ref = masked_dense(x, 2 * w, None, in_idx, out_idx, torch.zeros_like(y), 1, 1)
    torch.testing.assert_close(y, ref.output)


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
@pytest.mark.parametrize("case, message", [
    ("shape", "compact_weight shape"), ("dtype", "compact_weight dtype"),
    ("grouped", "compact_weight needs groups == 1"),
])
def test_a_bad_compact_weight_is_refused_naming_it(backend, case, message):
    gen = torch.Generator().manual_seed(23)
    groups = 2 if case == "grouped" else 1
    x = torch.randn(2, 8, 5, 5, generator=gen, dtype=torch.float64).to(backend.device)
    w = torch.randn(6, 8 // groups, 3, 3, generator=gen, dtype=torch.float64).to(backend.device)
    in_idx = torch.tensor([0, 1, 4, 5], device=backend.device)
    out_idx = torch.tensor([0, 3, 4], device=backend.device)
    block = w[out_idx][:, in_idx // groups if groups > 1 else in_idx].contiguous()
    if case == "shape":
        block = block[:, :3]
    elif case == "dtype":
        block = block.float()
    with backend.active(), pytest.raises(RuntimeError, match=message):
        backend.ops.channel_sparse_conv2d(x, w, None, in_idx, out_idx, [1, 1], [1, 1], [1, 1],
                                          groups, None, compact_weight=block)


def test_the_fake_kernel_checks_the_compact_weight_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x, w = torch.empty(2, 7, 6, 6), torch.empty(9, 7, 3, 3)
        in_idx, out_idx = torch.empty(3, dtype=torch.long), torch.empty(5, dtype=torch.long)
        y = torch.ops.dce.channel_sparse_conv2d(x, w, None, in_idx, out_idx, [1, 1], [0, 0],
                                                [1, 1], 1, None,
                                                compact_weight=torch.empty(5, 3, 3, 3))
        assert tuple(y.shape) == (2, 9, 4, 4)
        with pytest.raises(RuntimeError, match="compact_weight shape"):
            torch.ops.dce.channel_sparse_conv2d(x, w, None, in_idx, out_idx, [1, 1], [0, 0],
                                                [1, 1], 1, None,
                                                compact_weight=torch.empty(5, 4, 3, 3))


@pytest.mark.parametrize("depthwise", [False, True], ids=["groups1", "depthwise"])
def test_the_layer_hands_its_block_to_the_op_and_trains_as_the_reference(depthwise,
                                                                          monkeypatch):
    from dce_kernels import ChannelSparseConv2d
    torch.manual_seed(24)
    c = 6
    conv = ChannelSparseConv2d(c, c if depthwise else 5, 3, padding=1,
                               groups=c if depthwise else 1).double()
    gen = torch.Generator().manual_seed(24)
    x = torch.randn(2, c, 7, 6, generator=gen, dtype=torch.float64)
    in_idx = random_index(c, 0.5, gen).sort().values
    out_idx = in_idx if depthwise else random_index(5, 0.6, gen).sort().values
    conv.set_active(out_idx, in_idx)
    seen = {}
    original = dce_kernels.nn.channel_sparse_conv2d

    def spy(*args, **kwargs):
        seen["compact_weight"] = kwargs.get("compact_weight")
        return original(*args, **kwargs)

    monkeypatch.setattr(dce_kernels.nn, "channel_sparse_conv2d", spy)
    y = conv(x)
    torch.testing.assert_close(seen["compact_weight"],
                               _block_of(conv.weight.detach(), in_idx, out_idx, depthwise))
    g = torch.randn(y.shape, generator=gen, dtype=y.dtype)
    y.backward(g)
    ref = masked_dense(x, conv.weight, conv.bias, in_idx, out_idx, g, 1, 1, 1, conv.groups)
    torch.testing.assert_close(y, ref.output)
    torch.testing.assert_close(conv.weight.grad, ref.grad_weight)
    torch.testing.assert_close(conv.bias.grad, ref.grad_bias)
    with torch.no_grad():  # no backward to come: nothing gathered ahead
        assert conv._active_weight() is None
