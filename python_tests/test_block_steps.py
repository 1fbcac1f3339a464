"""The in-place block steps (dce::sgd_block_step_ / dce::adam_block_step_ via
MaskedOptimizer) against the generic gather-step-scatter, which runs
torch.optim's own step on compact copies: bit for bit on active blocks,
inactive weights and state bit-identical, over steps whose selections change."""
import pytest
import torch

import dce_kernels.optim as optim_module
from dce_kernels.optim import ActiveBlock, MaskedOptimizer

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd-wd": lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.03),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "sgd-momentum-dampening-wd": lambda p: torch.optim.SGD(p, lr=0.07, momentum=0.8,
                                                           dampening=0.3, weight_decay=0.05),
    "sgd-nesterov-wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True,
                                                 weight_decay=0.01),
    "sgd-maximize": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, maximize=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.05),
    "adam-wd": lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.05),
    "adam-amsgrad-betas": lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.3, 0.8),
                                                     amsgrad=True),
    "adamw-wd": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
    "adamw-amsgrad-maximize": lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.02,
                                                          amsgrad=True, maximize=True),
}

# Selections per step: rows / cols of a (7, 5, 3, 3) conv weight, channels of a
# Linear reading a flattened (5, 2, 3) map, rows of a bias. Channels drop out
# and come back; step 3 has a block of single rows and one of all columns.
CONV_SHAPE, LINEAR_SHAPE, CHANNELS, SPATIAL = (7, 5, 3, 3), (4, 30), 5, 6
SELECTIONS = [
    ([0, 2, 3, 6], [1, 2, 4], [0, 3]),
    ([1, 2], [0, 4], [1, 2, 4]),
    ([0, 1, 2, 3, 6], [1, 2, 3], [0, 3, 4]),
    ([5], None, [2]),
    ([0, 2, 4, 5, 6], [0, 1, 2, 3], [0, 1, 3]),
]


def _params(dtype):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, dtype=dtype, generator=gen).requires_grad_(True)
            for shape in (CONV_SHAPE, LINEAR_SHAPE, CONV_SHAPE[:1])]


def _blocks(params, selection):
    conv, linear, bias = params
    rows, cols, channels = (None if s is None else torch.tensor(s) for s in selection)
    return [ActiveBlock(conv, rows, cols),
            ActiveBlock(linear, cols=channels, view=(LINEAR_SHAPE[0], CHANNELS, SPATIAL)),
            ActiveBlock(bias, rows)]


def _counting_gathers(monkeypatch):
    calls = []
    real = optim_module.gather_block

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(optim_module, "gather_block", counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_in_place_step_equals_gather_step_scatter_bit_for_bit(name, dtype, monkeypatch):
    make = OPTIMIZERS[name]
    fast_params, ref_params = _params(dtype), _params(dtype)
    step = [0]
    fast = MaskedOptimizer(make(fast_params), lambda: _blocks(fast_params, SELECTIONS[step[0]]))
    ref = MaskedOptimizer(make(ref_params), lambda: _blocks(ref_params, SELECTIONS[step[0]]),
                          in_place=False)
    gathers = _counting_gathers(monkeypatch)
    gen = torch.Generator().manual_seed(1)
    for step[0] in range(len(SELECTIONS)):
        # Nonzero gradients everywhere: the inactive part must not be read either.
        for f, r in zip(fast_params, ref_params):
            g = torch.randn(f.shape, dtype=dtype, generator=gen)
            f.grad, r.grad = g.clone(), g.clone()
        before = [p.detach().clone() for p in fast_params]
        state_before = [{k: v.clone() for k, v in fast.state[p].items()} for p in fast_params]
        fast.step()
        assert not gathers, "the in-place path gathered blocks"
        ref.step()
        gathers.clear()
        for p, r, b, sb, block in zip(fast_params, ref_params, before, state_before,
                                      _blocks(fast_params, SELECTIONS[step[0]])):
            assert torch.equal(p, r), f"step {step[0]}: parameters differ"
            inactive = ~_active_mask(block)
            assert torch.equal(p.detach()[inactive], b[inactive])
            assert set(fast.state[p]) == set(ref.state[r])
            for key, value in fast.state[p].items():
                assert torch.equal(value, ref.state[r][key]), f"step {step[0]}: state {key}"
                if key in sb and value.shape == p.shape:
                    assert torch.equal(value[inactive], sb[key][inactive]), key
            assert not torch.equal(p.detach()[~inactive], b[~inactive])


def _active_mask(block):
    shape = block.param.shape if block.view is None else block.view
    mask = torch.zeros(shape, dtype=torch.bool)
    rows = slice(None) if block.rows is None else block.rows
    if block.cols is None:
        mask[rows] = True
    else:
        mask[rows.unsqueeze(1) if block.rows is not None else slice(None), block.cols] = True
    return mask.view(block.param.shape)


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=True),
    lambda p: torch.optim.Adam(p, lr=0.05, foreach=True),
    lambda p: torch.optim.RMSprop(p, lr=0.01),
    lambda p: torch.optim.Adagrad(p, lr=0.1),
], ids=["sgd-foreach", "adam-foreach", "rmsprop", "adagrad"])
def test_other_optimizers_and_settings_take_the_generic_path(make, monkeypatch):
    params = _params(torch.float32)
    opt = MaskedOptimizer(make(params), lambda: _blocks(params, SELECTIONS[0]))
    gathers = _counting_gathers(monkeypatch)
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in params]
    opt.step()
    assert gathers
    for p, b, block in zip(params, before, _blocks(params, SELECTIONS[0])):
        inactive = ~_active_mask(block)
        assert torch.equal(p.detach()[inactive], b[inactive])
        assert not torch.equal(p.detach()[~inactive], b[~inactive])


def test_in_place_step_matches_float64_torch_optim_on_a_narrow_tensor():
    # Independent of the generic path: torch.optim.Adam on a physically narrow tensor.
    w = torch.randn(6, 4, 3, dtype=torch.float64, requires_grad=True)
    rows, cols = torch.tensor([0, 3, 4]), torch.tensor([1, 2])
    opt = MaskedOptimizer(torch.optim.AdamW([w], lr=0.03, weight_decay=0.1),
                          lambda: [ActiveBlock(w, rows, cols)])
    narrow = w.detach()[rows][:, cols].clone().requires_grad_(True)
    ref = torch.optim.AdamW([narrow], lr=0.03, weight_decay=0.1)
    for _ in range(3):
        g = torch.randn_like(w)
        w.grad, narrow.grad = g.clone(), g[rows][:, cols].clone()
        opt.step()
        ref.step()
    assert torch.equal(w.detach()[rows][:, cols], narrow.detach())


@pytest.mark.parametrize("call, message", [
    (lambda: torch.ops.dce.sgd_block_step_(torch.zeros(3, 2), torch.zeros(3, 3), None, None,
                                           None, 0.1, 0.0, 0.0, 0.0, False, False, False),
     "grad has shape"),
    (lambda: torch.ops.dce.sgd_block_step_(torch.zeros(3, 2), torch.zeros(3, 2), None, None,
                                           None, 0.1, 0.9, 0.0, 0.0, False, False, False),
     "needs a momentum_buffer"),
    (lambda: torch.ops.dce.sgd_block_step_(torch.zeros(3, 2, dtype=torch.int64),
                                           torch.zeros(3, 2, dtype=torch.int64), None, None,
                                           None, 0.1, 0.0, 0.0, 0.0, False, False, False),
     "float32 or float64"),
    (lambda: torch.ops.dce.adam_block_step_(torch.zeros(3, 2), torch.zeros(3, 2),
                                            torch.zeros(3, 2), torch.zeros(3, 2), None,
                                            torch.tensor([0, 3]), None, 0.1, 0.9, 0.99, 0.0,
                                            False, 1e-8, 0.1, 0.1, False),
     "out of range"),
    (lambda: torch.ops.dce.adam_block_step_(torch.zeros(3, 2), torch.zeros(3, 2),
                                            torch.zeros(3, 2).t(), torch.zeros(3, 2), None,
                                            None, None, 0.1, 0.9, 0.99, 0.0, False, 1e-8, 0.1,
                                            0.1, False),
     "exp_avg has shape"),
])
def test_block_step_bad_input(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


def test_opcheck_block_steps():
    p, g, b = torch.randn(5, 4, 3), torch.randn(5, 4, 3), torch.randn(5, 4, 3)
    rows, cols = torch.tensor([0, 2, 4]), torch.tensor([1, 3])
    torch.library.opcheck(torch.ops.dce.sgd_block_step_.default,
                          (p, g, b, rows, cols, 0.1, 0.9, 0.0, 0.01, True, False, False))
    m, v = torch.randn(5, 4, 3), torch.rand(5, 4, 3)
    torch.library.opcheck(torch.ops.dce.adam_block_step_.default,
                          (p, g, m, v, None, rows, None, 0.1, 0.9, 0.99, 0.01, True, 1e-8, 0.2,
                           0.3, False))
