"""DistributedDataParallel on the CPU with gloo, 2 processes: the same channels on every
rank at every step and the weights of one process on the global batch (float64, sync
BatchNorm), an interrupted 2-rank `train()` that resumes exactly, and a rank with another
seed detected at the first step."""
import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from dce_kernels import DynamicChannels
from toolkit import randomize_norms, small_sparse_net, synthetic_dataset

pytestmark = pytest.mark.skipif(not dist.is_gloo_available(), reason="needs the gloo backend")

WORLD, GLOBAL_BATCH, EXPLORE, FINETUNE = 2, 64, 4, 2
TIMEOUT_S = 120


def _spawn(fn, *args):
    """Runs ``fn(rank, *args)`` in WORLD processes of one gloo group; returns what each
    returned, or the text of the exception it raised."""
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "init")
        ctx = mp.start_processes(_entry, args=(fn, init, tmp, *args), nprocs=WORLD,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + TIMEOUT_S
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"the {WORLD} ranks did not finish within {TIMEOUT_S} s")
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False)
                for r in range(WORLD)]


def _entry(rank, fn, init, tmp, *args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD)
    try:
        result = fn(rank, *args)
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(tmp, f"rank{rank}.pt"))


def _reported(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # reported to the test, which decides
        return {"error": f"{type(e).__name__}: {e}"}


def _all_scenarios(rank, seed, root):
    # One group for every test: starting processes costs more than the scenarios.
    return {"ddp": _reported(_ddp_rank, rank, seed),
            "other_seed": _reported(_other_seed_rank, rank, seed),
            "train": _reported(_train_rank, rank, root)}


@pytest.fixture(scope="module")
def scenario_root(tmp_path_factory):
    return tmp_path_factory.mktemp("ddp")


@pytest.fixture(scope="module")
def seed():
    return int(torch.randint(0, 10_000, ()))


@pytest.fixture(scope="module")
def ranks(seed, scenario_root):
    return _spawn(_all_scenarios, seed, str(scenario_root))


def _net(seed):
    torch.manual_seed(seed)
    net = small_sparse_net().double()
    randomize_norms(net)
    return net


def _global_batches(seed):
    g = torch.Generator().manual_seed(seed + 1)
    return [(torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=g, dtype=torch.float64),
             torch.randint(0, 4, (GLOBAL_BATCH,), generator=g))
            for _ in range(EXPLORE + FINETUNE)]


def _loop(net, model, dce, batches):
    """The user's loop; returns the selection of every step and the final state."""
    opt = dce.optimizer(torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9,
                                        weight_decay=1e-3))
    selections = []
    for i, (x, y) in enumerate(batches):
        if i == EXPLORE:
            dce.keep()
        with dce.step(batch_size=len(y)):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        selections.append([s.clone() for s in dce.selection])
    return {"selections": selections, "state": net.state_dict()}


def _ddp_rank(rank, seed):
    net = _net(seed)
    dce = DynamicChannels(net, fraction=0.4, selector="shrink", steps=EXPLORE, seed=seed,
                          sync_bn=True, check_every=1)
    # gradient_as_bucket_view: the parameters' grads are views into DDP's buckets, the
    # case in which MaskedOptimizer's swap of grads matters most.
    ddp = DDP(net, broadcast_buffers=False, gradient_as_bucket_view=True)
    # Rank r takes every WORLD-th sample, as DistributedSampler splits a permutation.
    mine = [(x[rank::WORLD], y[rank::WORLD]) for x, y in _global_batches(seed)]
    return _loop(net, ddp, dce, mine)


def test_two_ranks_select_and_train_as_one_process_on_the_global_batch(ranks, seed):
    ranks = [r["ddp"] for r in ranks]
    for r in ranks:
        assert "error" not in r, r.get("error")
    net = _net(seed)  # the reference: one process, plain sparse BatchNorm, batch 64
    ref = _loop(net, net, DynamicChannels(net, fraction=0.4, selector="shrink",
                                          steps=EXPLORE, seed=seed), _global_batches(seed))
    for step, want in enumerate(ref["selections"]):
        for r in ranks:
            for a, b in zip(r["selections"][step], want):
                assert torch.equal(a, b), f"step {step}"
    assert sum(s.numel() for s in ref["selections"][-1]) < sum(
        s.numel() for s in ref["selections"][0])  # the channels did shrink
    start = _net(seed).state_dict()
    assert not torch.equal(ref["state"]["0.weight"], start["0.weight"])  # it did train
    for name, want in ref["state"].items():
        for r in ranks:
            got = r["state"][name]
            if want.is_floating_point():  # weights, BatchNorm running statistics
                assert torch.allclose(got, want, rtol=0, atol=1e-10), name
            else:
                assert torch.equal(got, want), name


def _other_seed_rank(rank, seed):
    net = _net(seed)
    # Rank 1's selector has another seed: its tie-breaking draws, and so its state, differ.
    dce = DynamicChannels(net, fraction=0.4, selector="shrink", steps=EXPLORE,
                          seed=seed + rank, sync_bn=True)
    ddp = DDP(net, broadcast_buffers=False)
    mine = [(x[rank::WORLD], y[rank::WORLD]) for x, y in _global_batches(seed)]
    _loop(net, ddp, dce, mine[:2])
    return {"error": None}


def test_a_rank_with_another_seed_is_detected_on_every_rank(ranks):
    for r in (r["other_seed"] for r in ranks):
        assert r["error"] is not None, "the divergence went unnoticed"
        assert "differs across ranks" in r["error"] and "rank(s) [1]" in r["error"], r["error"]


def _train_rank(rank, root):
    from dce_kernels.experiments.train import TrainConfig, train

    data = (synthetic_dataset(48, 11), synthetic_dataset(16, 12))
    base = dict(model="vgg11", width=0.125, dense_epochs=0, explore_epochs=2, finetune_epochs=1,
                batch_size=16, fraction=0.5, method="shrink", sync_bn=True, progress=False,
                lr=0.05)
    full = train(TrainConfig(run_dir=os.path.join(root, "full"), **base), datasets=data)
    split = TrainConfig(run_dir=os.path.join(root, "split"), **base)
    assert train(split, datasets=data, stop_after_epochs=1) is None
    resumed = train(split, datasets=data, resume=True)
    return {"full": full.to_dict(), "resumed": resumed.to_dict()}


def test_an_interrupted_two_rank_train_resumes_exactly(ranks, scenario_root):
    tmp_path = scenario_root
    ranks = [r["train"] for r in ranks]
    for r in ranks:
        assert "error" not in r, r.get("error")
    full, resumed = ranks[0]["full"], ranks[0]["resumed"]
    assert ranks[1]["full"] == full  # every rank returns rank 0's report
    assert full["world_size"] == WORLD and full["per_rank_batch"] == 16 // WORLD
    strip = lambda h: [{k: v for k, v in e.items() if k != "train_seconds"} for e in h]
    assert strip(resumed["history"]) == strip(full["history"])
    assert resumed["selection"] == full["selection"]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert a["world_size"] == WORLD
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert full["export"]["accuracy_matches_sparse"]
    # The same run in one process would split every batch otherwise: refused.
    from dce_kernels.experiments.train import TrainConfig, train

    cfg = TrainConfig(**{**a["config"], "run_dir": str(tmp_path / "split")})
    with pytest.raises(ValueError, match="made by 2 process"):
        train(cfg, datasets=(synthetic_dataset(48, 11), synthetic_dataset(16, 12)), resume=True)


def test_nproc_runs_the_same_command_under_torchrun():
    import sys

    from dce_kernels.experiments.cli import _without_nproc
    from dce_kernels.experiments.launch import torchrun_command

    argv = ["train", "--nproc", "3", "--sync-bn", "--nproc=3", "--run-dir", "r"]
    command = torchrun_command(3, _without_nproc(argv))
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=3" in command
    assert command[-5:] == ["dce_kernels.experiments.cli", "train", "--sync-bn", "--run-dir", "r"]
    with pytest.raises(ValueError, match="--nproc must be a positive"):
        torchrun_command(0, argv)
