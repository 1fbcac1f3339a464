"""The block copies the masked optimizer uses (dce_kernels.ops.gather_block and
scatter_block_, csrc/cpu/parameter_blocks.cpp) against ATen indexing."""
import pytest
import torch

from dce_kernels.ops import gather_block, scatter_block_


BLOCK_CASES = [(shape, sides) for shape in [(9, 7, 3, 3), (5, 11), (6,), (4, 3, 2, 5, 2)]
               for sides in ["rows", "cols", "both"] if len(shape) >= 2 or sides == "rows"]


@pytest.mark.parametrize("shape, sides", BLOCK_CASES)
def test_gather_and_scatter_block_match_aten_indexing(shape, sides):
    g = torch.Generator().manual_seed(1)
    src = torch.randn(shape, generator=g, dtype=torch.float64)
    rows = torch.randperm(shape[0], generator=g)[:max(1, shape[0] // 2)] if sides != "cols" else None
    cols = torch.randperm(shape[1], generator=g)[:max(1, shape[1] // 2)] if sides != "rows" else None
    expected = src if rows is None else src[rows]
    expected = expected if cols is None else expected[:, cols]
    torch.testing.assert_close(gather_block(src, rows, cols), expected, rtol=0, atol=0)

    dst = torch.randn(shape, generator=g, dtype=torch.float64)
    block = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    want = dst.clone()
    r = torch.arange(shape[0]) if rows is None else rows
    if cols is None:
        want[r] = block
    else:
        want[r.unsqueeze(1), cols] = block
    scatter_block_(dst, rows, cols, block)
    torch.testing.assert_close(dst, want, rtol=0, atol=0)


@pytest.mark.parametrize("call, message", [
    (lambda t: torch.ops.dce.gather_block(t, torch.tensor([0, 9]), None), "out of range"),
    (lambda t: torch.ops.dce.gather_block(t, torch.tensor([1, 1]), None), "more than once"),
    (lambda t: torch.ops.dce.gather_block(t, torch.tensor([[0]]), None), "1-D"),
    (lambda t: torch.ops.dce.gather_block(t, torch.tensor([0.0]), None), "integer"),
    (lambda t: torch.ops.dce.scatter_block_(t, torch.tensor([0]), None, torch.zeros(2, 4)),
     "block shape"),
    (lambda t: torch.ops.dce.scatter_block_(t, torch.tensor([0]), None,
                                            torch.zeros(1, 4, dtype=torch.float64)), "dtype"),
])
def test_block_ops_bad_input(call, message):
    with pytest.raises(RuntimeError, match=message):
        call(torch.randn(3, 4))


def test_opcheck_block_ops(backend):
    if not backend.implements("gather_block"):
        pytest.skip(f"{backend} has no block-copy kernels (blocks.py indexes with ATen there)")
    dev = backend.device
    t = torch.randn(6, 5, 3, device=dev)
    rows, cols = torch.tensor([4, 0, 2], device=dev), torch.tensor([1, 3], device=dev)
    torch.library.opcheck(backend.ops.gather_block.default, (t, rows, cols))
    torch.library.opcheck(backend.ops.scatter_block_.default,
                          (t.clone(), rows, cols, torch.randn(3, 2, 3, device=dev)))
