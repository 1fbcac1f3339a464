"""bench/gpu_check.py (`make gpu-check`) on a machine without a GPU: it must stop at
once with a clear message and a non-zero status, and its summary writer and result
readers must turn step results into the files a person reads."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"

_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check  # its dataclasses look their module up there
_spec.loader.exec_module(gpu_check)


def _run(args, **env):
    full_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=full_env, timeout=120, cwd=ROOT)


def test_without_a_gpu_it_stops_at_once_with_a_clear_message(tmp_path):
    out = _run(["--out", str(tmp_path)], DCE_GPU_CHECK_ASSUME_NO_GPU="1")
    assert out.returncode == gpu_check.EXIT_NO_GPU
    assert "no CUDA device" in out.stderr and "needs a GPU" in out.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert [s["name"] for s in summary["steps"]] == ["preflight"]
    assert "no CUDA device" in (tmp_path / "summary.md").read_text()
    assert not (tmp_path / "build.log").exists()  # nothing was built


def test_make_gpu_check_runs_the_script(tmp_path):
    out = subprocess.run(["make", "-s", "gpu-check", f"GPU_CHECK_DIR={tmp_path}",
                          f"GPU_CHECK_PYTHON={sys.executable}"], capture_output=True, text=True,
                         env=dict(os.environ, DCE_GPU_CHECK_ASSUME_NO_GPU="1"), timeout=120,
                         cwd=ROOT)
    assert out.returncode != 0
    assert "no CUDA device" in out.stderr
    assert (tmp_path / "summary.json").exists()


def test_missing_tools_are_named(monkeypatch):
    monkeypatch.setattr(gpu_check, "find_nvcc", lambda: None)
    real = importlib.util.find_spec
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec",
                        lambda name: None if name == "pytest_benchmark" else real(name))
    missing = gpu_check.missing_tools(need_nvcc=True)
    assert len(missing) == 2
    assert missing[0].startswith("nvcc") and "pytest-benchmark" in missing[1]
    assert gpu_check.missing_tools(need_nvcc=False) == [missing[1]]


def test_a_step_that_runs_too_long_is_stopped_not_waited_for(tmp_path):
    budget = gpu_check.Budget(60)
    result = gpu_check.run_step("sleepy", [sys.executable, "-c", "import time; time.sleep(30)"],
                                tmp_path, budget, dict(os.environ), timeout_s=1)
    assert result.status == "timeout" and result.seconds < 10
    failed = gpu_check.run_step("broken", [sys.executable, "-c", "raise SystemExit('boom')"],
                                tmp_path, budget, dict(os.environ), timeout_s=30)
    assert failed.status == "failed" and "boom" in failed.detail
    ok = gpu_check.run_step("fine", [sys.executable, "-c", "print('hello')"], tmp_path, budget,
                            dict(os.environ), timeout_s=30)
    assert ok.status == "passed" and (tmp_path / "fine.log").read_text().strip() == "hello"
    spent = gpu_check.Budget(0)
    assert gpu_check.run_step("late", ["true"], tmp_path, spent, {}, 30).status == "skipped"


def _fake_results():
    S = gpu_check.StepResult
    return [S("preflight", "passed", 0.1, "NVIDIA H200"),
            S("build", "passed", 95.0),
            S("cuda-tests", "failed", 40.2, "3 passed, 1 failed", data={"passed": 3}),
            S("train", "timeout", 120.0, "stopped after 120 s | see train.log")]


def test_summary_writer_on_fake_results(tmp_path):
    env = {"gpu": "NVIDIA H200", "torch": "2.11.0"}
    summary = gpu_check.write_summary(tmp_path, _fake_results(), env)
    assert summary["status"] == "failed"
    stored = json.loads((tmp_path / "summary.json").read_text())
    assert stored == json.loads(json.dumps(summary))
    assert [s["status"] for s in stored["steps"]] == ["passed", "passed", "failed", "timeout"]
    md = (tmp_path / "summary.md").read_text()
    assert md.startswith("# GPU check: failed")
    assert "| cuda-tests | failed | 40.2 | 3 passed, 1 failed |" in md
    assert "stopped after 120 s / see train.log" in md  # a | in a detail cannot break the table
    assert "- gpu: NVIDIA H200" in md


@pytest.mark.parametrize("statuses, expected", [(["passed", "passed"], "passed"),
                                                (["passed", "skipped"], "incomplete"),
                                                (["skipped", "timeout"], "failed"),
                                                ([], "incomplete")])
def test_overall_status(statuses, expected):
    results = [gpu_check.StepResult(f"s{i}", s) for i, s in enumerate(statuses)]
    assert gpu_check.overall_status(results) == expected


def test_junit_counts(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="7" '
                   'failures="2" errors="1" skipped="1"></testsuite></testsuites>')
    assert gpu_check.junit_counts(xml) == {"tests": 7, "failures": 2, "errors": 1, "skipped": 1,
                                           "passed": 3}


def test_bench_tables_compute_the_ratios(tmp_path):
    def bench(median_s, **info):
        return {"stats": {"median": median_s}, "extra_info": info}

    layer = dict(kind="layer", layer="64x64@32", dtype="float32")
    data = {"benchmarks": [
        bench(0.004, impl="dense", frac=1.0, **layer),
        bench(0.002, impl="cudnn", frac=0.5, **layer),
        bench(0.008, impl="igemm", frac=0.5, **layer),
        bench(0.001, impl="narrow", frac=0.5, **layer),
        bench(0.010, kind="step", impl="cudnn", frac=0.5, dtype="float32", host_syncs_per_step=4),
        bench(0.005, kind="step", impl="narrow", frac=0.5, dtype="float32", host_syncs_per_step=0),
    ]}
    path = tmp_path / "b.json"
    path.write_text(json.dumps(data))
    tables = gpu_check.bench_tables(path)
    rows = {r.split(" | ")[2]: r for r in tables["tables_md"].splitlines()
            if r.startswith("| 64x64@32")}
    # p=0.5: cudnn 2 ms over narrow 1 ms, igemm 8 over 1, cudnn 2 over dense(p=1) 4.
    assert rows["0.5"].endswith("| 2.00 | 8.00 | 0.50 |")
    assert "| float32 | 0.5 | 10.000 | - | 5.000 | 2.00 | 4 / - / 0 |" in tables["tables_md"]
    by_frac = {row["frac"]: row["ms"] for row in tables["layers"]}
    assert by_frac[1.0] == {"dense": pytest.approx(4.0)}
    assert by_frac[0.5] == {"cudnn": pytest.approx(2.0), "igemm": pytest.approx(8.0),
                            "narrow": pytest.approx(1.0)}
