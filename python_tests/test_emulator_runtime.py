"""The CUDA emulator itself (csrc/emu), through the self-test kernels of
csrc/emu/selftest.cpp: it must run correct CUDA code correctly and make the
classic GPU bugs visible (missing barrier, unwritten shared memory, deadlock,
barrier divergence) as results or Python exceptions, not hangs or crashes."""
import itertools
import math

import pytest
import torch

import dce_kernels.emulated  # noqa: F401  (loads the emulated library)

T = torch.ops.dce_emu_test


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (16, 16, 16), (17, 33, 15), (64, 64, 64),
                                   (65, 31, 47), (128, 128, 128)])
def test_tiled_sgemm_is_correct_on_any_shape(m, k, n):
    a, b = torch.randn(m, k), torch.randn(k, n)
    want = a.double() @ b.double()
    got = T.sgemm(a, b, True)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4 * math.sqrt(k))


def test_missing_syncthreads_is_caught():
    a, b = torch.randn(40, 35), torch.randn(35, 50)
    racy = T.sgemm(a, b, False)
    want = a.double() @ b.double()
    # Thread 0 reads the tile before the other 255 threads have staged it: the
    # never-written words are NaN-poisoned, so the race cannot pass silently.
    assert not torch.allclose(racy.double(), want, rtol=1e-3, atol=1e-3)
    assert torch.isnan(racy).any()


def test_unwritten_dynamic_shared_memory_reads_nan():
    out = T.read_unwritten_smem(96)
    assert torch.isnan(out).all()


def test_threads_exiting_before_syncthreads_is_a_deadlock_error():
    with pytest.raises(RuntimeError, match=r"deadlock in block \(0, 0, 0\) of 64 threads: 32 exited, "
                                           r"32 wait at __syncthreads \(.*selftest.cpp:\d+"):
        T.hang(0)


def test_barrier_divergence_is_an_error():
    with pytest.raises(RuntimeError, match=r"barrier divergence: thread \(32, 0, 0\) reached "
                                           r"__syncthreads at .*selftest.cpp:\d+ while 32"):
        T.hang(1)


def test_lane_missing_from_warp_shuffle_is_a_deadlock_error():
    with pytest.raises(RuntimeError, match=r"deadlock .* wait in __shfl_sync"):
        T.hang(2)


def test_correct_barriers_run_and_the_emulator_recovers_after_errors():
    for mode in (0, 1, 2):
        with pytest.raises(RuntimeError):
            T.hang(mode)
    assert T.hang(3) == 64  # every thread passed three barriers and wrote its 1


def _expected_warp_ops(v, threshold):
    rows = []
    for t in range(len(v)):
        base, lane = t - t % 32, t % 32
        w = v[base:base + 32]
        row = [w[3], w[lane ^ 1], w[lane - 2] if lane >= 2 else w[lane],
               w[lane + 3] if lane + 3 < 32 else w[lane]]
        ballot = sum(1 << l for l in range(32) if w[l] & 1)
        row.append(ballot - (1 << 32) if ballot >= 1 << 31 else ballot)  # int32 view
        row.append(int(any(x > threshold for x in w)))
        row.append(int(all(x > threshold for x in w)))
        row.append(w[lane - lane % 8 + 1])
        row.append(w[lane + 1] if lane % 16 + 1 < 16 else w[lane])
        row.append(sum(w))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int32)


@pytest.mark.parametrize("warps", [1, 3])
def test_warp_collectives(warps):
    v = torch.randint(-50, 50, (32 * warps,), dtype=torch.int32)
    threshold = int(v.median())
    got = T.warp_ops(v, threshold)
    assert torch.equal(got, _expected_warp_ops(v.tolist(), threshold))
    # all() true and any() false cases
    assert (T.warp_ops(v, -100)[:, 6] == 1).all()
    assert (T.warp_ops(v, 100)[:, 5] == 0).all()


def test_atomics_across_blocks():
    blocks, threads = 37, 96
    n = blocks * threads
    counter, maxv, cas, fsum, dsum = T.atomics(blocks, threads).tolist()
    assert counter == n
    assert maxv == n - 1
    assert cas == 2 * n
    assert fsum == 0.5 * n
    assert dsum == n * (n - 1) / 2


def test_builtin_index_variables():
    grid, block = (3, 2, 2), (4, 3, 2)
    got = T.builtins(list(grid), list(block))
    want = []
    for bz, by, bx in itertools.product(range(grid[2]), range(grid[1]), range(grid[0])):
        for tz, ty, tx in itertools.product(range(block[2]), range(block[1]), range(block[0])):
            want.append([bx, by, bz, tx, ty, tz, *block, *grid])
    assert torch.equal(got, torch.tensor(want, dtype=torch.int32))


def test_half_and_bfloat16_conversions_round_like_the_hardware():
    special = [0.0, -0.0, 1.0, -2.5, 65504.0, 65519.0, 65520.0, 1e9, -1e9, 6.1e-5, 5.96e-8,
               2.98e-8, 2.99e-8, 1e-10, float("inf"), float("-inf"), 1 + 2 ** -11, 1 + 3 * 2 ** -11,
               3.0e38, 1 + 2 ** -8, 1 + 3 * 2 ** -8]
    x = torch.cat([torch.tensor(special), torch.randn(2000) * 100, torch.randn(500) * 1e-5,
                   torch.rand(500) * 1e-7])
    h, b, h_back, b_back = T.convert(x)
    assert torch.equal(h, x.half().view(torch.int16))
    assert torch.equal(b, x.bfloat16().view(torch.int16))
    assert torch.equal(h_back, x.half().float())
    assert torch.equal(b_back, x.bfloat16().float())
    hn, bn, hbn, bbn = T.convert(torch.tensor([float("nan")]))
    assert torch.isnan(hbn).all() and torch.isnan(bbn).all()


def test_invalid_launch_configuration_is_an_error():
    with pytest.raises(RuntimeError, match="not a valid CUDA block"):
        T.read_unwritten_smem(2048)


def test_static_shared_memory_is_private_to_each_block():
    x = torch.randn(53, 200)
    assert torch.allclose(T.static_smem_sum(x).double(), x.double().sum(1), rtol=1e-5, atol=1e-4)
