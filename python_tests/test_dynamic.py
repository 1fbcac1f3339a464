"""DynamicChannels in one process: the same training as the hand-wired pieces, an
optimizer that lr_scheduler accepts, exact resume from state dicts, compact export,
the sync BatchNorm's single-process identity, and clear errors."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F

from dce_kernels import (ChannelSparseBatchNorm2d, ChannelSparseSyncBatchNorm2d, DynamicChannels,
                         MaskedOptimizer, ShrinkSelector, convert_sync_batchnorm, plan_for)
from dce_kernels.compact import load_exported
from toolkit import randomize_norms, small_sparse_net

EXPLORE, FINETUNE = 4, 2


def _net(seed):
    torch.manual_seed(seed)
    net = small_sparse_net()
    randomize_norms(net)
    return net


def _batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g))
            for _ in range(n)]


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)


def _train_step(model, opt, x, y):
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _with_object(net, batches, seed):
    dce = DynamicChannels(net, fraction=0.4, selector="shrink", steps=EXPLORE, seed=seed)
    opt = dce.optimizer(_sgd(net.parameters()))
    selections = []
    for i, (x, y) in enumerate(batches):
        if i == EXPLORE:
            dce.keep()
        with dce.step():
            _train_step(net, opt, x, y)
        selections.append([s.clone() for s in dce.selection])
    return dce, selections


def test_the_object_trains_exactly_as_the_hand_wired_pieces():
    seed = int(torch.randint(0, 1000, ()))
    batches = _batches(EXPLORE + FINETUNE, seed)
    net, ref = _net(seed), _net(seed)
    dce, selections = _with_object(net, batches, seed)

    plan = plan_for(ref)
    selector = ShrinkSelector(plan.num_channels, fraction=0.4, horizon=EXPLORE,
                              budget="global", seed=seed)
    opt = MaskedOptimizer(_sgd(ref.parameters()), plan.active_blocks)
    for i, (x, y) in enumerate(batches):
        if i == EXPLORE:
            plan.apply(selector.best())
        if i < EXPLORE:
            plan.apply(selector.select())
        _train_step(ref, opt, x, y)
        if i < EXPLORE:
            selector.update(plan.saliency())
        for got, want in zip(selections[i], plan.selection):
            assert torch.equal(got, want), f"step {i}"
    assert sum(s.numel() for s in selections[-1]) < sum(plan.num_channels)
    for (name, a), b in zip(net.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name


def test_optimizer_is_an_optimizer_that_lr_scheduler_drives():
    net = _net(0)
    dce = DynamicChannels(net, fraction=0.5, selector="random", seed=1)
    opt = dce.optimizer(torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9))
    assert isinstance(opt, torch.optim.Optimizer)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    conv = net[0]
    for step, (x, y) in enumerate(_batches(3, 2)):
        with dce.step():
            inactive = [c for c in range(conv.out_channels) if c not in conv.out_idx.tolist()]
            before = conv.weight.detach()[inactive].clone()
            _train_step(net, opt, x, y)
            assert torch.equal(conv.weight.detach()[inactive], before)
        sched.step()
        # The wrapped optimizer itself runs at the scheduler's rate.
        assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.2 * 0.5 ** (step + 1))
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        MaskedOptimizer(object(), lambda: [])


def test_resume_from_the_state_dicts_equals_the_uninterrupted_loop():
    seed = int(torch.randint(0, 1000, ()))
    batches = _batches(EXPLORE + FINETUNE, seed)
    full, _ = _with_object(_net(seed), batches, seed)

    def build():
        net = _net(seed)
        dce = DynamicChannels(net, fraction=0.4, selector="shrink", steps=EXPLORE, seed=seed)
        return net, dce, dce.optimizer(_sgd(net.parameters()))

    for stop in (2, EXPLORE + 1):  # mid-exploration and mid-fine-tuning
        net, dce, opt = build()
        for i, (x, y) in enumerate(batches[:stop]):
            if i == EXPLORE:
                dce.keep()
            with dce.step():
                _train_step(net, opt, x, y)
        buf = io.BytesIO()
        torch.save({"model": net.state_dict(), "opt": opt.state_dict(),
                    "dce": dce.state_dict()}, buf)
        buf.seek(0)
        saved = torch.load(buf, weights_only=False)
        net, dce, opt = build()
        net.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        dce.load_state_dict(saved["dce"])
        for i, (x, y) in enumerate(batches[stop:], start=stop):
            if i == EXPLORE:
                dce.keep()
            with dce.step():
                _train_step(net, opt, x, y)
        for (name, a), b in zip(net.state_dict().items(), full.model.state_dict().values()):
            assert torch.equal(a, b), (stop, name)
        assert all(torch.equal(a, b) for a, b in zip(dce.selection, full.selection))


def test_compact_and_export_compute_what_the_sparse_model_computes(tmp_path):
    net = _net(3)
    dce, _ = _with_object(net, _batches(EXPLORE + 1, 4), seed=5)
    x = torch.randn(5, 3, 8, 8)
    net.eval()
    small = dce.compact()
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in net.parameters())
    assert torch.allclose(small(x), net(x), atol=1e-5)
    paths = dce.export(x, str(tmp_path))
    assert torch.allclose(load_exported(paths["program"])(x), net(x), atol=1e-5)


def test_sync_batchnorm_in_one_process_is_the_sparse_batchnorm():
    net = _net(6)
    ref = copy.deepcopy(net)
    params = {id(p) for p in net.parameters()}
    convert_sync_batchnorm(net)
    assert {id(p) for p in net.parameters()} == params  # shared, not copied
    assert sum(isinstance(m, ChannelSparseSyncBatchNorm2d) for m in net.modules()) == 3
    assert isinstance(convert_sync_batchnorm(torch.nn.BatchNorm2d(4)), ChannelSparseBatchNorm2d)
    for model in (net, ref):
        plan = plan_for(model)
        plan.apply([torch.tensor([0, 3]), torch.tensor([1, 2, 7]), torch.arange(5)])
    x = torch.randn(6, 3, 8, 8)
    for train in (True, False):
        net.train(train), ref.train(train)
        assert torch.equal(net(x), ref(x))
    for a, b in zip(net.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)


def test_bad_arguments_are_named():
    net = _net(7)
    with pytest.raises(ValueError, match="unknown selector 'greedy'"):
        DynamicChannels(net, selector="greedy")
    with pytest.raises(ValueError, match="needs steps="):
        DynamicChannels(net, selector="shrink")
    with pytest.raises(ValueError, match="steps must be"):
        DynamicChannels(net, selector="shrink", steps=0)
    with pytest.raises(ValueError, match="check_every"):
        DynamicChannels(net, selector="random", check_every=0)
    with pytest.raises(ValueError, match="fractions must lie"):
        DynamicChannels(net, fraction=1.5, selector="random")
    with pytest.raises(ValueError, match="channel counts"):
        DynamicChannels(net, selector=ShrinkSelector([3, 4], horizon=2))
    with pytest.raises(ValueError, match="apply only to a selector given by name"):
        DynamicChannels(net, selector=lambda n: ShrinkSelector(n, horizon=2), tau=3)
    with pytest.raises(ValueError, match="lacks"):
        DynamicChannels(net, selector="random").load_state_dict({"selector": {}})


def test_a_non_finite_saliency_raises_at_the_next_check_naming_its_step(monkeypatch):
    from dce_kernels.channels import ChannelPlan
    from dce_kernels.selectors import NonFiniteSaliencyError

    net = _net(3)
    dce = DynamicChannels(net, fraction=0.5, selector="random", seed=3, check_every=3)
    assert dce.selector.device == net[0].weight.device  # the model's device
    opt = dce.optimizer(_sgd(net.parameters()))
    real = ChannelPlan.saliency
    spoil_at = 2  # the second step's saliency; checks run after steps 1 and 3

    def saliency(plan):
        values = [s.clone() for s in real(plan)]
        if dce.steps + 1 == spoil_at:
            values[1][0] = float("inf")
        return values

    monkeypatch.setattr(ChannelPlan, "saliency", saliency)
    batches = _batches(3, 4)
    for x, y in batches[:2]:
        with dce.step():
            _train_step(net, opt, x, y)
    with pytest.raises(NonFiniteSaliencyError, match=r"at step 2 is not finite in layer 1 "
                                                     r"\(1 of \d+ channels\)"):
        with dce.step():
            _train_step(net, opt, *batches[2])
