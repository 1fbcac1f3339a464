"""`make gpu-check`: the prepared run for the first GPU we get (bench/README.md, "CUDA").

    python bench/gpu_check.py --out build/gpu-check [--skip-build]

In order, each step with its own timeout and all of them inside one overall
budget (8 minutes by default):

1. preflight: a CUDA device, nvcc, pytest and pytest-benchmark, else a clear
   message naming what is missing and a non-zero exit at once;
2. build: the extension against the torch that is installed (no downloads:
   ``setup.py build_ext --inplace``), CUDA forced, for the present GPU's
   architecture only;
3. ``python_tests/test_cuda_backend.py``: both CUDA implementations against the
   float64 reference;
4. ``bench/test_cuda_speed.py``: the cuDNN path and the igemm kernels against
   cuDNN dense / narrow and the naive gather per VGG-16 layer, fwd+bwd, and
   whole VGG-16 steps with host synchronizations counted;
5. a short DCE training run on the GPU (synthetic data, DynamicChannels).

It writes ``summary.json`` and ``summary.md`` into the output directory (and
each step's log beside them), also when a step fails or the check stops early.
Exit status: 0 when every step passed, 1 when one failed, 2 without a GPU, 3
when a tool is missing.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parent.parent
TOTAL_BUDGET_S = 480
# Each step's own limit; a step also never runs past the overall budget.
STEP_TIMEOUT_S = {"build": 300, "cuda-tests": 150, "cuda-bench": 200, "train": 120}
TRAIN_STEPS = 300

EXIT_FAILED, EXIT_NO_GPU, EXIT_MISSING_TOOL = 1, 2, 3


@dataclasses.dataclass
class StepResult:
    """One step of the check: what ran, how it ended, and what it measured."""

    name: str
    status: str  # "passed", "failed", "timeout", "skipped"
    seconds: float = 0.0
    detail: str = ""
    command: Optional[list[str]] = None
    log: Optional[str] = None
    data: dict = dataclasses.field(default_factory=dict)


# -- summary --------------------------------------------------------------------------------

def overall_status(results: list[StepResult]) -> str:
    if any(r.status in ("failed", "timeout") for r in results):
        return "failed"
    return "passed" if results and all(r.status == "passed" for r in results) else "incomplete"


def write_summary(out_dir: Path, results: list[StepResult], environment: dict) -> dict:
    """summary.json (everything) and summary.md (the tables a person reads)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"status": overall_status(results), "environment": environment,
               "steps": [dataclasses.asdict(r) for r in results]}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out_dir / "summary.md").write_text(render_markdown(summary))
    return summary


def render_markdown(summary: dict) -> str:
    env = summary["environment"]
    lines = [f"# GPU check: {summary['status']}", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += ["", "| step | status | seconds | detail |", "| --- | --- | --- | --- |"]
    for s in summary["steps"]:
        detail = s["detail"].replace("\n", " ").replace("|", "/")
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {detail} |")
    for s in summary["steps"]:
        tables = s["data"].get("tables_md")
        if tables:
            lines += ["", f"## {s['name']}", "", tables]
    return "\n".join(lines) + "\n"


# -- preflight ------------------------------------------------------------------------------

def find_nvcc() -> Optional[str]:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def missing_tools(need_nvcc: bool) -> list[str]:
    missing = []
    if need_nvcc and find_nvcc() is None:
        missing.append("nvcc (the CUDA toolkit's compiler: set CUDA_HOME or put nvcc on PATH)")
    for module, what in (("pytest", "pytest"), ("pytest_benchmark", "pytest-benchmark")):
        if importlib.util.find_spec(module) is None:
            missing.append(f"{what} (python module {module!r})")
    return missing


def gpu_environment() -> dict:
    """The device and the torch build; ``gpu`` is None without a usable CUDA device."""
    import torch

    env = {"python": sys.version.split()[0], "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "gpu": None}
    if os.environ.get("DCE_GPU_CHECK_ASSUME_NO_GPU") == "1":  # for the CPU tests of this script
        env["gpu_error"] = "DCE_GPU_CHECK_ASSUME_NO_GPU=1"
        return env
    try:
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            env.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                       gpu_memory_gib=round(props.total_memory / 2**30, 1),
                       multiprocessors=props.multi_processor_count)
    except RuntimeError as e:  # a driver without a device, a broken install
        env["gpu_error"] = str(e)
    return env


# -- steps ----------------------------------------------------------------------------------

class Budget:
    def __init__(self, total_s: float):
        self.deadline = time.monotonic() + total_s

    def left(self) -> float:
        return self.deadline - time.monotonic()


def run_step(name: str, cmd: list[str], out_dir: Path, budget: Budget, env: dict,
             timeout_s: float) -> StepResult:
    """Runs ``cmd`` with its output in ``<out_dir>/<name>.log``; a timeout ends it (and its
    children: own process group) instead of hanging the check."""
    limit = min(timeout_s, budget.left())
    log = out_dir / f"{name}.log"
    if budget.left() < 5:
        return StepResult(name, "skipped", detail="no time left in the overall budget",
                          command=cmd)
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            return StepResult(name, "timeout", time.monotonic() - t0,
                              f"stopped after {limit:.0f} s; see {log.name}", cmd, str(log))
    took = time.monotonic() - t0
    status = "passed" if rc == 0 else "failed"
    detail = "" if rc == 0 else f"exit status {rc}; last lines: {tail(log, 5)}"
    return StepResult(name, status, took, detail, cmd, str(log))


def tail(path: Path, n: int) -> str:
    try:
        return " / ".join(path.read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return ""


def junit_counts(path: Path) -> dict:
    """passed / failed / errors / skipped of a pytest --junitxml file."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors",
                                                                "skipped")}
    total["passed"] = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return total


def bench_tables(path: Path) -> dict:
    """The layer and step tables of a pytest-benchmark JSON from bench/test_cuda_speed.py:
    median milliseconds per case and the ratios a reader wants (vs dense at p=1, vs
    narrow at the same p)."""
    benches = json.loads(path.read_text())["benchmarks"]
    layer, step = {}, {}
    for b in benches:
        info, median_ms = b.get("extra_info", {}), b["stats"]["median"] * 1e3
        if info.get("kind") == "layer":
            key = (info["layer"], info["dtype"], info["frac"])
            layer.setdefault(key, {})[info["impl"]] = median_ms
        elif info.get("kind") == "step":
            key = (info["dtype"], info["frac"])
            step.setdefault(key, {})[info["impl"]] = {
                "ms": median_ms, "syncs": info.get("host_syncs_per_step")}
    rows = []
    impls = ("cudnn", "igemm", "gather", "narrow")
    header = ["layer", "dtype", "p", *[f"{i} ms" for i in impls], "dense ms",
              "cudnn/narrow", "igemm/narrow", "cudnn/dense"]
    rows.append("| " + " | ".join(header) + " |")
    rows.append("|" + " --- |" * len(header))
    for (lay, dtype, frac), t in sorted(layer.items()):
        dense = layer.get((lay, dtype, 1.0), {}).get("dense")
        cells = [lay, dtype, f"{frac:g}", *[_ms(t.get(i)) for i in impls], _ms(dense),
                 _ratio(t.get("cudnn"), t.get("narrow")), _ratio(t.get("igemm"), t.get("narrow")),
                 _ratio(t.get("cudnn"), dense)]
        rows.append("| " + " | ".join(cells) + " |")
    step_rows = ["| dtype | p | cudnn ms | igemm ms | narrow ms | cudnn/narrow | "
                 "host syncs per step (cudnn / igemm / narrow) |",
                 "| --- | --- | --- | --- | --- | --- | --- |"]
    for (dtype, frac), t in sorted(step.items()):
        get = lambda i, k: t.get(i, {}).get(k)  # noqa: E731
        step_rows.append(
            f"| {dtype} | {frac:g} | {_ms(get('cudnn', 'ms'))} | {_ms(get('igemm', 'ms'))} | "
            f"{_ms(get('narrow', 'ms'))} | {_ratio(get('cudnn', 'ms'), get('narrow', 'ms'))} | "
            f"{_cell(get('cudnn', 'syncs'))} / {_cell(get('igemm', 'syncs'))} / "
            f"{_cell(get('narrow', 'syncs'))} |")
    tables = "\n".join(rows) + "\n\nWhole VGG-16 training step:\n\n" + "\n".join(step_rows)
    return {"tables_md": tables,
            "layers": [dict(layer=k[0], dtype=k[1], frac=k[2], ms=v) for k, v in
                       sorted(layer.items())],
            "steps": [dict(dtype=k[0], frac=k[1], result=v) for k, v in sorted(step.items())]}


def _cell(v):
    return "-" if v is None else str(v)


def _ms(v):
    return "-" if v is None else f"{v:.3f}"


def _ratio(a, b):
    return "-" if a is None or not b else f"{a / b:.2f}"


# -- the training run (a subprocess of the check: `gpu_check.py train --json PATH`) -------

def train_run(steps: int, json_path: Path, device: str = "cuda", batch: int = 128) -> None:
    """A short DCE run on the GPU: VGG-11 (width 0.5) on synthetic 32x32 data that a
    network can learn (each class a fixed random pattern plus noise), shrink
    selector at half the channels, both CUDA implementations' default (cudnn)."""
    import torch
    import torch.nn.functional as F

    import dce_kernels
    from dce_kernels import DynamicChannels
    from dce_kernels.experiments.models import build_model

    torch.manual_seed(0)
    device = torch.device(device)
    classes = 10
    patterns = torch.randn(classes, 3, 32, 32, device=device)
    model = build_model("vgg11", in_channels=3, num_classes=classes, width=0.5).to(device)
    explore = steps // 2
    dce = DynamicChannels(model, fraction=0.5, selector="shrink", steps=explore)
    opt = dce.optimizer(torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9))
    losses, accs = [], []
    t0 = time.monotonic()
    for i in range(steps):
        if i == explore:
            dce.keep()
        y = torch.randint(0, classes, (batch,), device=device)
        x = patterns[y] + 0.5 * torch.randn(batch, 3, 32, 32, device=device)
        with dce.step():
            out = model(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if i % 10 == 0 or i == steps - 1:
            losses.append(loss.item())
            accs.append((out.argmax(1) == y).float().mean().item())
    if device.type == "cuda":
        torch.cuda.synchronize()
    took = time.monotonic() - t0
    first, last = statistics.mean(losses[:3]), statistics.mean(losses[-3:])
    result = {"steps": steps, "seconds": took, "steps_per_s": steps / took,
              "loss_first": first, "loss_last": last, "acc_last": statistics.mean(accs[-3:]),
              "cuda_conv_impl": dce_kernels.get_cuda_conv_impl(),
              "device": str(device), "batch": batch}
    if device.type == "cuda":
        result["max_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    if not (all(map(math.isfinite, losses)) and last < first):
        sys.exit(f"training did not learn: loss {first:.3f} -> {last:.3f}")


# -- the check ------------------------------------------------------------------------------

def check(out_dir: Path, skip_build: bool, total_s: float) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    budget = Budget(total_s)
    environment = gpu_environment()
    results: list[StepResult] = []

    if environment["gpu"] is None:
        why = environment.get("gpu_error", "torch.cuda.is_available() is False")
        message = (f"gpu-check: no CUDA device ({why}; torch {environment['torch']}, built "
                   f"for CUDA {environment['torch_cuda']}). This check needs a GPU.")
        results.append(StepResult("preflight", "failed", detail=message))
        write_summary(out_dir, results, environment)
        print(message, file=sys.stderr)
        return EXIT_NO_GPU
    missing = missing_tools(need_nvcc=not skip_build)
    if missing:
        message = "gpu-check: missing " + "; ".join(missing)
        results.append(StepResult("preflight", "failed", detail=message))
        write_summary(out_dir, results, environment)
        print(message, file=sys.stderr)
        return EXIT_MISSING_TOOL
    results.append(StepResult("preflight", "passed", detail=f"{environment['gpu']}, nvcc "
                              f"{find_nvcc() if not skip_build else '(not needed)'}"))

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    py = sys.executable
    steps = []
    if not skip_build:
        build_env = dict(env, DCE_FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=environment["capability"],
                         MAX_JOBS=str(os.cpu_count() or 4))
        steps.append(("build", [py, "setup.py", "build_ext", "--inplace"], build_env))
    junit = out_dir / "cuda-tests.xml"
    steps.append(("cuda-tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                 "python_tests/test_cuda_backend.py", f"--junitxml={junit}"], env))
    bench_json = out_dir / "cuda-bench.json"
    steps.append(("cuda-bench", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                 "bench/test_cuda_speed.py", f"--benchmark-json={bench_json}"],
                  env))
    train_json = out_dir / "train.json"
    steps.append(("train", [py, str(Path(__file__).resolve()), "train", "--steps",
                            str(TRAIN_STEPS), "--json", str(train_json)], env))

    for name, cmd, step_env in steps:
        result = run_step(name, cmd, out_dir, budget, step_env, STEP_TIMEOUT_S[name])
        try:
            if name == "cuda-tests" and junit.exists():
                result.data = junit_counts(junit)
                result.detail = (f"{result.data['passed']} passed, {result.data['failures']} "
                                 f"failed, {result.data['errors']} errors, "
                                 f"{result.data['skipped']} skipped. {result.detail}").strip()
            elif name == "cuda-bench" and bench_json.exists():
                result.data = bench_tables(bench_json)
            elif name == "train" and train_json.exists():
                result.data = json.loads(train_json.read_text())
                result.detail = (f"loss {result.data['loss_first']:.3f} -> "
                                 f"{result.data['loss_last']:.3f}, "
                                 f"{result.data['steps_per_s']:.1f} steps/s. {result.detail}").strip()
        except (OSError, ValueError, KeyError, ElementTree.ParseError) as e:
            result.detail += f" (its results could not be read: {e!r})"
        results.append(result)
        write_summary(out_dir, results, environment)  # a summary even if the next step hangs
        if name == "build" and result.status != "passed":
            break  # nothing after it can run
    summary = write_summary(out_dir, results, environment)
    print((out_dir / "summary.md").read_text())
    return 0 if summary["status"] == "passed" else EXIT_FAILED


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    train = sub.add_parser("train", help="the training step alone (run by the check)")
    train.add_argument("--steps", type=int, default=TRAIN_STEPS)
    train.add_argument("--json", type=Path, required=True)
    train.add_argument("--device", default="cuda")
    train.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "gpu-check")
    parser.add_argument("--skip-build", action="store_true",
                        help="use the extension already built in the checkout")
    parser.add_argument("--budget-s", type=float, default=TOTAL_BUDGET_S)
    args = parser.parse_args(argv)
    if args.command == "train":
        train_run(args.steps, args.json, args.device, args.batch)
        return 0
    return check(args.out, args.skip_build, args.budget_s)


if __name__ == "__main__":
    sys.exit(main())
