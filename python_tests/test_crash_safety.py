"""Killed runs lose nothing: a short run is killed with SIGKILL at every point where it
trains or writes a file, resumed, and must end exactly where the uninterrupted run ends,
with no file ever half-written.

The points are the events of the uninterrupted run, each identified by what happens
there: every training step (before it), and every file write in three places (halfway
through the temporary file, once it is complete but not yet moved over the file, right
after the move). For each point a forked child starts the run, SIGKILLs itself on
reaching that point, and the parent checks every file the run directory holds; another
child resumes (``resume=True`` once a checkpoint exists, as ``dce train --resume`` and
the sweep do) and finishes. Its report, final checkpoint and exported model must equal
the uninterrupted run's, and no temporary file may be left. Then a few kills at random
moments from outside, where the instrumented points cannot be the only ones tried.
"""
from __future__ import annotations

import json
import os
import random
import signal
import time
import warnings

import pytest
import torch

from dce_kernels import atomic
from dce_kernels.experiments import train as train_module
from dce_kernels.experiments.files import CHECKPOINT, CONFIG, EXPORT_STEM, REPORT
from toolkit import tiny_config, tiny_datasets

RANDOM_KILLS = 3

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)"),
    # Forking a process that has (idle) torch threads is safe here: each child uses one
    # thread and never returns into pytest.
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning"),
]


def _config(run_dir):
    return tiny_config(run_dir=str(run_dir), explore_epochs=1, finetune_epochs=1)


def _datasets():
    return tiny_datasets(train=32, test=16)


def _instrument(patch, on_event):
    """Calls ``on_event(event, spoil)`` at every instrumented point; ``patch(obj, name,
    value)`` installs the wrappers. ``spoil``, where given, makes the moment what its
    name says before a kill (the part of a file the kill would leave behind)."""
    step = train_module._Run._step

    def traced_step(self, x, y, lr, i):
        on_event(("step", self.phase, self.epoch, i), None)
        return step(self, x, y, lr, i)

    writes = {}
    write_temp, replace = atomic._write_temp, os.replace

    def traced_write_temp(path, write, binary):
        name = os.path.basename(path)
        writes[name] = writes.get(name, 0) + 1
        event = ("write", name, writes[name])
        tmp = write_temp(path, write, binary)
        # Killed while writing: the temporary file holds its first half only.
        on_event(event + ("partial",),
                 lambda: os.truncate(tmp, os.path.getsize(tmp) // 2))
        on_event(event + ("complete",), None)
        return tmp

    def traced_replace(src, dst):
        replace(src, dst)
        name = os.path.basename(dst)
        if str(src).endswith(atomic.TEMP_SUFFIX):
            on_event(("write", name, writes.get(name), "replaced"), None)

    patch(train_module._Run, "_step", traced_step)
    patch(atomic, "_write_temp", traced_write_temp)
    patch(os, "replace", traced_replace)


def _in_child(body) -> int:
    """Runs ``body()`` in a forked child; returns its wait status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            body()
            code = 0
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def _train(run_dir):
    resume = os.path.exists(os.path.join(run_dir, CHECKPOINT))
    train_module.train(_config(run_dir), resume=resume, datasets=_datasets())


def _killed_at(run_dir, kill_at):
    def body():
        def on_event(event, spoil):
            if event == kill_at:
                if spoil is not None:
                    spoil()
                os.kill(os.getpid(), signal.SIGKILL)
        _instrument(setattr, on_event)
        _train(run_dir)
    return body


def _events(run_dir):
    """The events of an uninterrupted run, in this process: what it leaves warm (the
    imports and caches of torch.export) every forked child inherits."""
    recorded, undo = [], []

    def patch(obj, name, value):
        undo.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    _instrument(patch, lambda event, spoil: recorded.append(event))
    try:
        _train(run_dir)
    finally:
        for obj, name, value in reversed(undo):
            setattr(obj, name, value)
    return recorded


def _check_files(run_dir):
    """Every file under its own name is whole: it parses completely."""
    for name in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, name)
        if name.endswith(atomic.TEMP_SUFFIX):
            continue  # a temporary file: never read, overwritten by the next write
        if name.endswith(".json"):
            with open(path) as f:
                json.load(f)
        elif name.endswith(".pt2"):
            torch.export.load(path)
        elif name.endswith(".pt"):
            torch.load(path, weights_only=False)
        else:
            raise AssertionError(f"unexpected file {name}")


def _timeless(value):
    """A report without what a clock or the run directory decides."""
    if isinstance(value, dict):
        return {k: _timeless(v) for k, v in value.items()
                if "seconds" not in k and k not in ("run_dir", "program", "state_dict")}
    if isinstance(value, list):
        return [_timeless(v) for v in value]
    return value


def _result(run_dir):
    with open(os.path.join(run_dir, REPORT)) as f:
        report = _timeless(json.load(f))
    model = torch.load(os.path.join(run_dir, CHECKPOINT), weights_only=False)["model"]
    compact = torch.load(os.path.join(run_dir, f"{EXPORT_STEM}_state_dict.pt"))
    return report, model, compact


def _assert_same(got, want, what):
    report, model, compact = got
    assert report == want[0], f"{what}: the report differs"
    for name, tensors in (("model", (model, want[1])), ("compact model", (compact, want[2]))):
        a, b = tensors
        assert a.keys() == b.keys(), f"{what}: {name} has other parameters"
        for key in a:
            assert torch.equal(a[key], b[key]), f"{what}: {name} {key} differs"


def test_sigkill_anywhere_then_resume_reaches_the_uninterrupted_result(tmp_path):
    # In a fresh interpreter: a process whose autograd engine has started threads (any
    # earlier test may have) cannot run autograd in a forked child.
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.abspath(__file__)), *sys.path])}
    done = subprocess.run([sys.executable, os.path.abspath(__file__), str(tmp_path)], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    print(done.stdout.strip().splitlines()[-1])


def _protocol(tmp_path):
    torch.set_num_threads(1)
    events = _events(tmp_path / "reference")
    want = _result(tmp_path / "reference")
    steps = [e for e in events if e[0] == "step"]
    writes = {e[1] for e in events if e[0] == "write"}
    # The run's shape: 2 epochs of 2 steps, and every file a run writes.
    assert len(steps) == 2 * 2
    assert writes == {CONFIG, CHECKPOINT, REPORT, f"{EXPORT_STEM}.pt2",
                      f"{EXPORT_STEM}_state_dict.pt"}

    killed = resumed = 0
    for n, event in enumerate(events):
        run_dir = tmp_path / f"kill{n}"
        status = _in_child(_killed_at(run_dir, event))
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
            f"the run was not killed at {event}"
        killed += 1
        _check_files(run_dir)
        assert os.waitstatus_to_exitcode(_in_child(lambda: _train(run_dir))) == 0, \
            f"resuming after a kill at {event} failed"
        resumed += 1
        _check_files(run_dir)
        assert not [f for f in os.listdir(run_dir) if f.endswith(atomic.TEMP_SUFFIX)]
        _assert_same(_result(run_dir), want, f"killed at {event}")

    # Kills at random moments, from outside: wherever the run happens to be.
    rng = random.Random(torch.initial_seed())
    start = time.perf_counter()
    assert os.waitstatus_to_exitcode(_in_child(lambda: _train(tmp_path / "timed"))) == 0
    duration = time.perf_counter() - start
    for k in range(RANDOM_KILLS):
        run_dir = tmp_path / f"random{k}"
        pid = os.fork()
        if pid == 0:
            _train(run_dir)
            os._exit(0)
        time.sleep(rng.uniform(0.05, 0.95) * duration)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        killed += 1
        if os.path.isdir(run_dir):
            _check_files(run_dir)
        assert os.waitstatus_to_exitcode(_in_child(lambda: _train(run_dir))) == 0
        resumed += 1
        _assert_same(_result(run_dir), want, f"killed at random (run {k})")
    print(f"{killed} kills ({len(events)} instrumented points, {RANDOM_KILLS} at random), "
          f"{resumed} resumes, {resumed} results identical to the uninterrupted run")


if __name__ == "__main__":
    import sys
    from pathlib import Path

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    _protocol(Path(sys.argv[1]))
