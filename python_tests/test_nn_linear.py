"""ChannelSparseLinear and Linear channel groups: the layer against the masked
dense F.linear in float64 (forward, input/weight/bias gradients, saliency), and
a classifier's hidden units selected like conv channels through convert, the
plan, the masked optimizer, compact_model and the FLOPs cost."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dce_kernels import (ChannelSparseLinear, FlopsCost, compact_model, convert, count_flops,
                         count_params)
from dce_kernels.channels import conversion_notes, plan_for
from dce_kernels.sparse_linear import channel_sparse_linear
from toolkit import (active_parameter_count, capture_original, check_against_reference,
                     cucb_steps_touch_only_active_blocks, random_index, random_selection,
                     randomize_norms)

pytestmark = pytest.mark.usefixtures("one_thread")


def _mask(idx, n):
    m = torch.zeros(n, dtype=torch.float64)
    m[idx] = 1
    return m


def _masked_reference(x, weight, bias, in_idx, out_idx):
    """F.linear on the masked input, output masked: what the sparse layer must equal."""
    y = F.linear(x * _mask(in_idx, weight.shape[1]), weight, bias)
    return y * _mask(out_idx, weight.shape[0])


def _saliency_reference(g, y):
    """The conv op's saliency, mean_n |mean_space(g * y)|, with the dims between batch
    and features as the space (an unbatched input is one sample)."""
    gy = (g * y).reshape(1 if y.dim() == 1 else y.shape[0], -1, y.shape[-1])
    return gy.mean(1).abs().mean(0)


# (input shape without features, in_features, out_features, fraction in, fraction out, bias)
CASES = [((5,), 7, 9, 0.5, 0.5, True),
         ((3,), 13, 4, 1.0, 0.5, True),      # all inputs active
         ((6,), 11, 10, 0.3, 1.0, False),    # all outputs active, no bias
         ((1,), 1, 3, 1.0, 0.34, True),      # one input feature
         ((4, 3), 8, 5, 0.6, 0.6, True),     # (N, L, F): the space is L
         ((), 9, 6, 0.5, 0.5, True),         # unbatched
         ((2,), 6, 7, 1.0, 1.0, True)]       # everything active


@pytest.mark.parametrize("lead,fin,fout,pin,pout,bias", CASES)
def test_sparse_linear_equals_masked_dense_reference(lead, fin, fout, pin, pout, bias):
    g = torch.Generator().manual_seed(fin * 31 + fout)
    layer = ChannelSparseLinear(fin, fout, bias=bias, dtype=torch.float64).train()
    with torch.no_grad():
        layer.weight.normal_(generator=g)
        if bias:
            layer.bias.normal_(generator=g)
    in_idx, out_idx = random_index(fin, pin, g), random_index(fout, pout, g)
    layer.set_active(out_idx, in_idx)
    x = torch.randn(*lead, fin, dtype=torch.float64, generator=g, requires_grad=True)
    grad = torch.randn(*lead, fout, dtype=torch.float64, generator=g)

    y = layer(x)
    y.backward(grad)

    w = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True) if bias else None
    xr = x.detach().clone().requires_grad_(True)
    yr = _masked_reference(xr, w, b, in_idx, out_idx)
    yr.backward(grad)

    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.weight.grad, w.grad, rtol=1e-12, atol=1e-12)
    if bias:
        torch.testing.assert_close(layer.bias.grad, b.grad, rtol=1e-12, atol=1e-12)
    sal = _saliency_reference(grad, yr.detach())
    torch.testing.assert_close(layer.saliency, sal, rtol=1e-12, atol=1e-12)
    inactive = _mask(out_idx, fout) == 0
    assert layer.saliency[inactive].eq(0).all()
    if not inactive.all():
        assert layer.saliency[~inactive].gt(0).any()


def test_packed_input_equals_the_full_width_input():
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(6, 10, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    in_idx = torch.tensor([1, 4, 5, 8])
    out_idx = torch.tensor([0, 2, 3])
    x = torch.randn(5, 10, dtype=torch.float64, generator=g)
    packed = x[:, in_idx].clone().requires_grad_(True)
    y = channel_sparse_linear(packed, weight, bias, in_idx, out_idx, packed_input=True)
    grad = torch.randn_like(y)
    (gx, gw, gb) = torch.autograd.grad(y, (packed, weight, bias), grad)
    full = x.clone().requires_grad_(True)
    yr = _masked_reference(full, weight, bias, in_idx, out_idx)
    (rx, rw, rb) = torch.autograd.grad(yr, (full, weight, bias), grad)
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, rx[:, in_idx], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb, rb, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="the packed input's 4 input features"):
        channel_sparse_linear(x, weight, bias, in_idx, out_idx, packed_input=True)


@pytest.mark.parametrize("out_all", [False, True])
def test_runs_of_columns_equal_single_columns(out_all):
    # A Linear after flattening a (5, 3) map: channels 1, 2 and 4 are 3-column runs.
    g = torch.Generator().manual_seed(9)
    weight = torch.randn(7, 15, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    in_idx = torch.tensor([3, 4, 5, 6, 7, 8, 12, 13, 14])
    out_idx = torch.arange(7) if out_all else torch.tensor([1, 2, 6])
    x = torch.randn(4, 15, dtype=torch.float64, generator=g, requires_grad=True)
    grad = torch.randn(4, 7, dtype=torch.float64, generator=g)
    results = []
    for run in (1, 3):
        y = channel_sparse_linear(x, weight, bias, in_idx, out_idx, in_run=run)
        results.append((y, *torch.autograd.grad(y, (x, weight, bias), grad)))
    yr = _masked_reference(x, weight, bias, in_idx, out_idx)
    reference = (yr, *torch.autograd.grad(yr, (x, weight, bias), grad))
    for got in results:
        for a, b in zip(got, reference):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="whole runs of in_run=3"):
        channel_sparse_linear(x, weight, bias, torch.tensor([3, 4, 5, 7, 8, 9]), out_idx,
                              in_run=3)


def test_all_active_equals_nn_linear_and_shares_its_parameters():
    torch.manual_seed(0)
    dense = nn.Linear(10, 7).double()
    sparse = ChannelSparseLinear.from_dense(dense)
    assert sparse.weight is dense.weight and sparse.bias is dense.bias
    assert set(sparse.state_dict()) == set(dense.state_dict())
    x = torch.randn(4, 10, dtype=torch.float64)
    torch.testing.assert_close(sparse(x), dense(x), rtol=0, atol=0)


def test_deep_copy_delivers_its_own_saliency():
    torch.manual_seed(1)
    layer = ChannelSparseLinear(6, 5).double().train()
    layer.set_active([0, 2, 4], [1, 2, 3, 5])
    twin = copy.deepcopy(layer)
    x = torch.randn(3, 6, dtype=torch.float64)
    twin(x).pow(2).sum().backward()
    assert twin.saliency.gt(0).any() and layer.saliency.eq(0).all()


def test_bad_input_names_the_problem():
    layer = ChannelSparseLinear(4, 3)
    with pytest.raises(ValueError, match=r"out_idx has channel 3, outside \[0, 3\)"):
        layer.set_active([0, 3])
    with pytest.raises(ValueError, match="in_idx contains a channel more than once"):
        layer.set_active(None, [1, 1])
    with pytest.raises(ValueError, match="does not end in the weight's 4 input features"):
        layer(torch.randn(2, 5))
    with pytest.raises(ValueError, match="in_idx must be a 1-D int64 tensor"):
        channel_sparse_linear(torch.randn(2, 4), layer.weight, None,
                              torch.tensor([0.0, 1.0]), torch.arange(3))


class VGGLike(nn.Module):
    """Conv features, then torchvision VGG's classifier (Linear -> ReLU(inplace) ->
    Dropout -> Linear -> ReLU(inplace) -> Dropout -> Linear), odd widths."""

    def __init__(self, classes=5):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 7, 3, padding=1), nn.BatchNorm2d(7),
                                      nn.ReLU(inplace=True))
        self.avgpool = nn.AdaptiveAvgPool2d((3, 3))
        self.classifier = nn.Sequential(nn.Linear(7 * 9, 11), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(11, 13), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(13, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _converted_vgg_like():
    torch.manual_seed(0)
    model = VGGLike().double()
    randomize_norms(model)
    reference = capture_original(model)
    convert(model)
    return model, reference


def test_convert_makes_the_hidden_linears_producers_and_keeps_the_logits():
    model, _ = _converted_vgg_like()
    plan = plan_for(model)
    cls = model.classifier
    assert all(isinstance(cls[i], ChannelSparseLinear) for i in (0, 3, 6))
    producers = [g.producer for g in plan.groups]
    assert cls[0] in producers and cls[3] in producers and cls[6] not in producers
    by_producer = {g.producer: g for g in plan.groups}
    assert by_producer[cls[0]].linears == [cls[3]]
    assert by_producer[cls[3]].linears == [cls[6]]
    assert by_producer[model.features[4]].linears == [cls[0]]
    assert plan.num_channels == [6, 7, 11, 13]
    # The in-place ReLUs right after the Linears became out-of-place (saliency needs
    # the Linear's output); the logits' staying full is not a note.
    assert not cls[1].inplace and not cls[4].inplace
    # The last conv's group reaches the classifier packed (flattened narrow maps).
    assert model.features[4].packed_output and cls[0].packed_input
    assert not cls[3].packed_input  # Linear outputs keep their width
    plan.apply(random_selection(plan.num_channels, generator=torch.Generator().manual_seed(1)))
    assert cls[0].in_run == 9 and cls[3].in_run == 1  # 3x3 maps: runs of 9 columns
    assert conversion_notes(model) == {}


def test_random_selections_equal_the_masked_original():
    model, reference = _converted_vgg_like()
    plan = plan_for(model)
    model.train()
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        plan.apply(random_selection(plan.num_channels, generator=gen))
        assert model.classifier[3].in_idx.numel() < 11
        assert model.classifier[3].out_idx.numel() < 13
        x = torch.randn(3, 3, 12, 12, dtype=torch.float64, generator=gen)
        # Dropout draws: the same seed for the sparse and the reference forward.
        assert check_against_reference(model, reference, plan, x) == []


def test_training_touches_only_active_rows_and_columns_then_compacts():
    model, _ = _converted_vgg_like()
    plan = plan_for(model)
    model.train()

    def saliency_only_where_active(saliency, selection):
        for s, active in zip(saliency, selection):
            inactive = torch.ones(s.numel(), dtype=torch.bool)
            inactive[active] = False
            assert s[inactive].eq(0).all()

    gen = torch.Generator().manual_seed(4)
    selector = cucb_steps_touch_only_active_blocks(
        model, plan, 3, lambda g: (torch.randn(6, 3, 12, 12, dtype=torch.float64, generator=g),
                                   torch.randint(0, 5, (6,), generator=g)),
        saliency_only_where_active)
    # The Linear groups' blocks: rows of the producer and its bias, columns of the reader.
    blocks = {(id(b.param), b.rows is not None, b.cols is not None) for b in plan.active_blocks()}
    cls = model.classifier
    assert (id(cls[3].weight), True, True) in blocks and (id(cls[3].bias), True, False) in blocks
    assert (id(cls[6].weight), False, True) in blocks

    plan.apply(selector.best())
    model.eval()
    compact = compact_model(model, plan).eval()
    assert not any(isinstance(m, ChannelSparseLinear) for m in compact.modules())
    kept = [g.producer.out_idx.numel() for g in plan.groups]
    assert compact.classifier[3].weight.shape == (kept[3], kept[2])
    assert compact.classifier[6].weight.shape == (5, kept[3])
    assert count_params(compact) == active_parameter_count(model, plan)
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), model(x), rtol=1e-10, atol=1e-10)


def test_flops_cost_counts_the_linear_groups():
    model, _ = _converted_vgg_like()
    plan = plan_for(model)
    x = torch.randn(1, 3, 12, 12, dtype=torch.float64)
    cost = FlopsCost.fit(model, plan, x)
    gen = torch.Generator().manual_seed(6)
    for _ in range(3):
        selection = random_selection(plan.num_channels, generator=gen)
        plan.apply(selection)
        want = count_flops(compact_model(model, plan), x)
        assert cost([s.numel() for s in selection]) == pytest.approx(want, rel=1e-12)
    # The hidden layer's FLOPs move with both of its groups' counts.
    assert float(cost.symmetric[2, 3]) > 0


def test_vgg11_bn_classifier_shrinks_at_half():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    original = torchvision.models.vgg11_bn(weights=None, num_classes=10)
    model = convert(original, copy=True)
    plan = plan_for(model)
    plan.apply([torch.arange(c // 2) for c in plan.num_channels])
    compact = compact_model(model, plan)
    cls = compact.classifier
    assert [cls[i].weight.shape for i in (0, 3, 6)] == [(2048, 256 * 49), (2048, 2048),
                                                       (10, 2048)]
    # Every weight matrix reads and writes half its channels: about a quarter remains.
    assert count_params(original) / count_params(compact) > 3.9
