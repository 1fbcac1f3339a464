"""dce_kernels.compact: the compact network of a trained sparse registry model
holds exactly its active parameters, computes what it computes, and exports to
a program that runs without dce_kernels."""
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from dce_kernels import CUCBSelector, ChannelSparseConv2d
from dce_kernels.channels import plan_for
from dce_kernels.compact import compact_model, export_compact
from dce_kernels.experiments.models import build_model
from dce_kernels.optim import MaskedOptimizer
from toolkit import active_parameter_count


def _trained_sparse(name):
    model = build_model(name, in_channels=1, num_classes=5, width=0.25)
    plan = plan_for(model)
    sel = CUCBSelector(plan.num_channels, fraction=0.5, tau=2, seed=0)
    opt = MaskedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                          plan.active_blocks)
    for _ in range(4):
        plan.apply(sel.select())
        loss = nn.functional.cross_entropy(model(torch.randn(8, 1, 20, 20)),
                                           torch.randint(0, 5, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sel.update(plan.saliency())
    plan.apply(sel.best())
    model.eval()
    return model, plan


@pytest.mark.parametrize("name", ["vgg11", "resnet20"])
def test_export_equals_sparse_model_and_runs_without_dce_kernels(name, tmp_path):
    model, plan = _trained_sparse(name)
    compact = compact_model(model, plan).eval()
    assert not any(isinstance(m, ChannelSparseConv2d) for m in compact.modules())
    n_sparse = sum(p.numel() for p in model.parameters())
    n_compact = sum(p.numel() for p in compact.parameters())
    assert n_compact == active_parameter_count(model, plan) < 0.75 * n_sparse
    x = torch.randn(16, 1, 20, 20)
    with torch.no_grad():
        ref = model(x)
        assert torch.allclose(compact(x), ref, atol=1e-5)
    if name != "vgg11":
        return  # the export path is model-independent; one subprocess run is enough
    paths = export_compact(compact, x, str(tmp_path))
    torch.save({"x": x, "ref": ref}, tmp_path / "io.pt")
    # A fresh interpreter in which importing dce_kernels fails.
    script = (
        "import sys, json, torch\n"
        "sys.modules['dce_kernels'] = None\n"
        f"m = torch.export.load({paths['program']!r}).module()\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "y = m(io['x'])\n"
        "y1 = m(io['x'][:1])\n"
        "print(json.dumps({'err': (y - io['ref']).abs().max().item(),\n"
        "                  'err1': (y1 - io['ref'][:1]).abs().max().item(),\n"
        "                  'same_argmax': bool((y.argmax(1) == io['ref'].argmax(1)).all())}))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["err"] < 1e-5 and result["err1"] < 1e-5 and result["same_argmax"]
    state = torch.load(paths["state_dict"])
    assert set(state) == set(compact.state_dict())


def test_compact_rejects_foreign_plan():
    model, plan = _trained_sparse("vgg11")
    other = build_model("vgg11", 1, 5, width=0.25)
    with pytest.raises(ValueError, match="another model"):
        compact_model(other, plan)
