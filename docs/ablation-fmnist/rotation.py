"""Why per-step channel rotation (the poster's exploration) barely trains a plain network.

VGG-11 (width 0.25), 50 SGD steps (lr 0.1, momentum 0.9, batch 128) on the first 6,400
Fashion-MNIST training images, one thread. Prints the mean training loss of each block of
10 steps for: the narrow network (all its channels), a fixed random subset of a quarter of
each layer's channels, and a new random subset at every step, at several fractions.

    .venv/bin/python docs/ablation-fmnist/rotation.py
"""
import torch
import torch.nn.functional as F

from dce_kernels import MaskedOptimizer, plan_for
from dce_kernels.experiments.data import load_dataset
from dce_kernels.experiments.models import build_model

STEPS, BATCH, LR = 50, 128, 0.1


def run(mode: str, fraction: float, images, labels) -> list[float]:
    torch.manual_seed(0)
    plan = None
    if mode == "narrow":
        model = build_model("vgg11", 1, 10, width=0.25 * fraction)
    else:
        model = build_model("vgg11", 1, 10, width=0.25)
        plan = plan_for(model)
    g = torch.Generator().manual_seed(5)

    def subset():
        return [torch.sort(torch.randperm(c, generator=g)[:max(1, round(fraction * c))]).values
                for c in plan.num_channels]

    if mode == "fixed":
        plan.apply(subset())
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    if plan is not None:
        opt = MaskedOptimizer(opt, plan.active_blocks)
    order = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(STEPS):
        idx = torch.randint(0, len(labels), (BATCH,), generator=order)
        if mode == "rotating":
            plan.apply(subset())
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return [sum(losses[i:i + 10]) / 10 for i in range(0, STEPS, 10)]


def main() -> None:
    torch.set_num_threads(1)
    ds = load_dataset("fashion-mnist", None, train=True)
    images = torch.stack([ds[i][0] for i in range(6400)])
    labels = torch.tensor([int(ds[i][1]) for i in range(6400)])
    print("| channels per step | fraction | loss, steps 1-10 ... 41-50 |")
    print("| --- | --- | --- |")
    for mode, fraction in [("narrow", 0.25), ("fixed", 0.25), ("rotating", 0.25),
                           ("rotating", 0.5), ("rotating", 0.75), ("rotating", 0.9)]:
        blocks = run(mode, fraction, images, labels)
        print(f"| {mode} | {fraction} | {' '.join(f'{b:.2f}' for b in blocks)} |", flush=True)


if __name__ == "__main__":
    main()
