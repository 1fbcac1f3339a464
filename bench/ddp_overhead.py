"""DDP overhead on the CPU: 2 gloo ranks vs 1 process at the same global batch, and the
part of a DDP step that channel selection adds (the saliency all-reduce and the amortized
selector check), as ratios. Interleaved rounds in the same two processes (rank 1 waits at
a barrier while rank 0 times the single process), median over rounds.

    python bench/ddp_overhead.py [--rounds 7] [--steps 8]
"""
import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from dce_kernels import DynamicChannels, distributed
from dce_kernels.experiments.models import build_model

BATCH = 64


def _model():
    torch.manual_seed(0)
    return build_model("vgg11", in_channels=1, num_classes=10, width=0.25, image_size=28)


def _steps(model, net, dce, opt, batches, timer):
    start = time.perf_counter()
    for x, y in batches:
        with dce.step(batch_size=len(y)):
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return (time.perf_counter() - start) / len(batches)


def _worker(rank, world, init, args, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(BATCH, 1, 28, 28, generator=g), torch.randint(0, 10, (BATCH,), generator=g))
            for _ in range(args.steps)]
    mine = [(x[rank::world], y[rank::world]) for x, y in data]
    sync_time = [0.0]
    original = distributed.global_saliency

    def timed(*a, **k):
        t = time.perf_counter()
        result = original(*a, **k)
        sync_time[0] += time.perf_counter() - t
        return result

    distributed.global_saliency = timed
    setups = {}
    for sync_bn in (False, True):
        model = _model()
        dce = DynamicChannels(model, fraction=0.5, selector="cucb", tau=0, seed=0,
                              sync_bn=sync_bn)
        net = DDP(model, broadcast_buffers=not sync_bn)
        opt = dce.optimizer(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
        setups[sync_bn] = (model, net, dce, opt)
    rows = []
    for r in range(args.rounds + 1):  # round 0 warms up
        row = {}
        dist.barrier()
        if rank == 0:
            model = _model()
            dce = DynamicChannels(model, fraction=0.5, selector="cucb", tau=0, seed=0,
                                  process_group=None)
            opt = dce.optimizer(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
            # world_size() sees the group: time the single process without it.
            saved, distributed.world_size = distributed.world_size, lambda group=None: 1
            row["single"] = _steps(model, model, dce, opt, data, None)
            distributed.world_size = saved
        dist.barrier()
        for sync_bn in (False, True):
            sync_time[0] = 0.0
            # checks every step here: the default check_every=100 amortizes it 100x
            t = _steps(*setups[sync_bn], mine, None)
            row[f"ddp{'_syncbn' if sync_bn else ''}"] = t
            row[f"sel_sync{'_syncbn' if sync_bn else ''}"] = sync_time[0] / len(mine)
        if r:
            rows.append(row)
    if rank == 0:
        start = time.perf_counter()
        for _ in range(20):
            setups[False][2].check_ranks_agree()
        check = (time.perf_counter() - start) / 20
        torch.save({"rows": rows, "check": check}, out)
    else:
        for _ in range(20):
            setups[False][2].check_ranks_agree()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.pt")
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), args, out), nprocs=2)
        res = torch.load(out, weights_only=False)
    rows = res["rows"]
    med = lambda key: statistics.median(r[key] / r["single"] for r in rows)
    frac = lambda key, of: statistics.median(r[key] / r[of] for r in rows)
    print(f"rounds {len(rows)}, {args.steps} steps each, VGG-11 width 0.25, 28x28, global batch {BATCH}")
    print(f"2x gloo step / 1-process step: {med('ddp'):.2f} (sync BN: {med('ddp_syncbn'):.2f})")
    print(f"saliency all-reduce / DDP step: {frac('sel_sync', 'ddp'):.4f} "
          f"(sync BN run: {frac('sel_sync_syncbn', 'ddp_syncbn'):.4f})")
    step = statistics.median(r["ddp"] for r in rows)
    print(f"selector check / DDP step: {res['check'] / step:.4f} per check "
          f"({res['check'] / step / 100:.6f} per step at check_every=100)")


if __name__ == "__main__":
    main()
