"""A grid of training runs: accuracy vs fraction of channels kept, every method, several seeds.

Layout of an output directory (``out``)::

    <out>/<dataset>-<model>/sweep.json                the options every run shares
    <out>/<dataset>-<model>/<method>-p<frac>-s<seed>/  one train() run each
    <out>/<dataset>-<model>/results.json, results.csv  the table (see .results)

The dense baseline is the run at fraction 1.0, once per seed, named
``dense-p1.0-s<seed>``: the narrow network at p = 1 is the full architecture, trained
from scratch for the total epochs (exploration + fine-tuning), which is what a user
does without any channel selection. Fraction 1.0 in the list of fractions means this
run. The train() phase ``dense`` is therefore switched off in sweep runs
(``dense_epochs=0``).

A narrow network under a global or flops budget takes its channel counts from the ``cucb``
(else ``shrink``) run of the same fraction and seed, so it runs after that run has
finished; a sweep process waits for it while another process holds it.

Bookkeeping, so that a sweep can be killed and restarted, and so that several
``dce sweep`` processes (on one machine, or several sharing a file system with
working ``flock``) can split one directory's work:

- a run whose ``report.json`` exists is finished and never redone;
- a run with a checkpoint but no report is continued with ``train(resume=True)``;
- a run is claimed by creating ``<run>/lock`` with O_CREAT|O_EXCL holding
  ``pid@host``; a lock whose process is dead (same host) is stale and reclaimed;
  a lock from another host is left alone (remove it by hand if that host died);
- claims, and writing the results table, happen under an ``flock`` on
  ``<out>/<dataset>-<model>/.sweep.lock``, so the check-then-claim of a stale lock
  is not a race and the last process to finish writes the complete table.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

from ..atomic import create_atomic, write_atomic
from .choices import DCE_METHODS, METHODS, NARROW_METHODS, check_choice
from .files import CHECKPOINT, ERROR, LOCK, MUTEX, REPORT, SWEEP_OPTIONS
from .train import TrainConfig, options_diff, train

__all__ = ["RunSpec", "SweepOutcome", "DEFAULT_FRACTIONS", "BASELINE",
           "plan_runs", "sweep_dir", "run_sweep", "write_table", "try_claim", "release"]

DEFAULT_FRACTIONS = tuple(round(0.1 * i, 1) for i in range(1, 11))
# DCE's default variant, its random-order control and what a user would do instead.
DEFAULT_METHODS = ("shrink", "shrink-random", "prune", "narrow", "narrow-uniform")
WAIT_SECONDS = 30  # between looks at a run another process is finishing
BASELINE = "dense"  # the "method" label of the fraction-1.0 run
# TrainConfig fields that vary within a sweep or do not change the computation.
_PER_RUN = ("fraction", "method", "seed", "run_dir", "progress", "data_dir", "device",
            "dense_epochs", "widths_from")


@dataclass(frozen=True)
class RunSpec:
    """One cell of the grid."""

    method: str  # one of METHODS, or BASELINE
    fraction: float
    seed: int

    @property
    def name(self) -> str:
        # repr() of a float is exact and unique: 0.1 -> "0.1", 1.0 -> "1.0".
        return f"{self.method}-p{float(self.fraction)!r}-s{self.seed}"


def plan_runs(fractions: Sequence[float] = DEFAULT_FRACTIONS,
              methods: Sequence[str] = DEFAULT_METHODS,
              seeds: Sequence[int] = (0, 1, 2), baseline: bool = True) -> list[RunSpec]:
    """The grid, seed by seed (an interrupted sweep has whole curves first):
    per seed the dense baseline (unless ``baseline=False``: an ablation that shares
    another sweep's), then every fraction below 1 with every method (narrow last, as
    it may need another run's channel counts)."""
    fractions, methods, seeds = list(fractions), list(methods), list(seeds)
    if not fractions:
        raise ValueError("fractions: the list is empty")
    if not methods:
        raise ValueError("methods: the list is empty")
    if not seeds:
        raise ValueError("seeds: the list is empty")
    for p in fractions:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
            raise ValueError(f"fraction {p!r} is outside (0, 1]")
    for m in methods:
        check_choice("method", m, METHODS)
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"seed {s!r} is not a non-negative integer")
    for name, values in (("fractions", [float(p) for p in fractions]),
                         ("methods", methods), ("seeds", seeds)):
        if len(set(values)) != len(values):
            raise ValueError(f"{name}: duplicate entries in {values}")
    runs = []
    for seed in seeds:
        if baseline:
            runs.append(RunSpec(BASELINE, 1.0, seed))
        ordered = sorted(methods, key=lambda m: m in NARROW_METHODS)
        runs += [RunSpec(m, float(p), seed) for p in fractions if p < 1.0 for m in ordered]
    return runs


def sweep_dir(out: str, base: TrainConfig) -> str:
    return os.path.join(out, f"{base.dataset}-{base.model}")


def run_config(base: TrainConfig, spec: RunSpec, root: str,
               width_method: str = DCE_METHODS[0]) -> TrainConfig:
    """The TrainConfig of one run: the shared options plus the cell's own. A narrow
    network under a global or flops budget takes the channel counts of the ``width_method`` run
    of the same fraction and seed."""
    method = "narrow" if spec.method == BASELINE else spec.method
    widths_from = None
    if method == "narrow" and base.budget != "layer" and spec.method != BASELINE:
        widths_from = os.path.join(root, RunSpec(width_method, spec.fraction, spec.seed).name)
    return dataclasses.replace(base, fraction=spec.fraction, method=method, seed=spec.seed,
                               dense_epochs=0, run_dir=os.path.join(root, spec.name),
                               widths_from=widths_from)


def width_method(runs: Sequence[RunSpec]) -> str:
    """The DCE method whose channel counts the narrow runs of a global or flops budget take: the
    first of DCE_METHODS in the grid."""
    planned = {r.method for r in runs}
    for method in DCE_METHODS:
        if method in planned:
            return method
    return DCE_METHODS[0]


def shared_options(base: TrainConfig) -> dict:
    """The options that define a sweep (a directory holds one sweep)."""
    options = dataclasses.asdict(base)
    for key in _PER_RUN:
        options.pop(key)
    return options


# -- locks -----------------------------------------------------------------------

@contextlib.contextmanager
def _mutex(root: str) -> Iterator[None]:
    """Serializes claims and table writes among processes sharing ``root``."""
    with open(os.path.join(root, MUTEX), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _owner() -> str:
    return f"{os.getpid()}@{socket.gethostname()}"


def _is_stale(owner: str) -> bool:
    """A lock is stale if its writer died: its pid is gone on this host, or the lock is
    empty or garbled (left by a version that created the file before writing it)."""
    pid, _, host = owner.strip().partition("@")
    if not pid.isdigit():
        return True
    if host != socket.gethostname():
        return False  # cannot see that host's processes: assume alive
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # exists, owned by someone else
    return False


def try_claim(run_dir: str) -> bool:
    """Creates ``run_dir/lock`` for this process; reclaims a stale one. Call under the mutex."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK)
    for _ in range(2):
        if create_atomic(path, _owner()):
            return True
        try:
            with open(path) as f:
                owner = f.read()
        except FileNotFoundError:
            continue  # released meanwhile: try again
        if not _is_stale(owner):
            return False
        os.unlink(path)
    return False


def release(run_dir: str) -> None:
    """Removes this process's lock (never another's)."""
    path = os.path.join(run_dir, LOCK)
    try:
        with open(path) as f:
            mine = f.read().strip() == _owner()
    except FileNotFoundError:
        return
    if mine:
        os.unlink(path)


def _check_or_record_options(root: str, base: TrainConfig) -> None:
    path = os.path.join(root, SWEEP_OPTIONS)
    options = shared_options(base)
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        diff = options_diff(saved, options)
        if diff:
            raise ValueError(f"{root} holds a sweep made with other options (saved, now): "
                             f"{diff}; choose another output directory")
        return
    write_atomic(path, lambda f: json.dump(options, f, indent=2))


# -- the sweep -------------------------------------------------------------------

@dataclass
class SweepOutcome:
    """What one ``run_sweep`` call did, by run name."""

    root: str
    ran: list[str] = dataclasses.field(default_factory=list)       # finished here
    resumed: list[str] = dataclasses.field(default_factory=list)   # of those, continued
    skipped: list[str] = dataclasses.field(default_factory=list)   # already finished
    busy: list[str] = dataclasses.field(default_factory=list)      # held by another process
    failed: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> error
    stopped: list[str] = dataclasses.field(default_factory=list)   # left unfinished (max_runs)


def _finished(run_dir: str) -> bool:
    return os.path.exists(os.path.join(run_dir, REPORT))


def run_sweep(base: TrainConfig, out: str, runs: Sequence[RunSpec],
              datasets: Optional[tuple] = None, max_runs: Optional[int] = None,
              log: Callable[[str], None] = lambda message: None) -> SweepOutcome:
    """Runs every unfinished, unclaimed run of ``runs``, then writes the results table.

    ``datasets``: ``(train, test)`` passed to every :func:`train` call (tests).
    ``max_runs``: start at most this many runs in this call (the rest stay for later).
    A run that raises is recorded in ``failed`` and the sweep moves on.
    """
    if max_runs is not None and max_runs < 0:
        raise ValueError(f"max_runs must be >= 0, got {max_runs}")
    base.validate()
    root = sweep_dir(out, base)
    os.makedirs(root, exist_ok=True)
    with _mutex(root):
        _check_or_record_options(root, base)
    outcome = SweepOutcome(root)
    started = 0
    source = width_method(runs)
    for i, spec in enumerate(runs):
        config = run_config(base, spec, root, source)
        if _finished(config.run_dir):
            outcome.skipped.append(spec.name)
            continue
        if max_runs is not None and started >= max_runs:
            outcome.stopped.append(spec.name)
            continue
        with _mutex(root):
            # Re-checked under the mutex: another process may have just finished it.
            if _finished(config.run_dir):
                outcome.skipped.append(spec.name)
                continue
            claimed = try_claim(config.run_dir)
        if not claimed:
            outcome.busy.append(spec.name)
            continue
        started += 1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(config.run_dir, ERROR))  # from an earlier attempt
        try:
            if config.widths_from is not None and not _wait_for(config.widths_from, log):
                raise RuntimeError(f"{spec.name} needs the channel counts of "
                                   f"{os.path.basename(config.widths_from)}, which has not "
                                   "finished (add its method to the sweep, or rerun)")
            resume = os.path.exists(os.path.join(config.run_dir, CHECKPOINT))
            log(f"[{i + 1}/{len(runs)}] {'resuming' if resume else 'starting'} {spec.name}")
            t0 = time.perf_counter()
            report = train(config, resume=resume, datasets=datasets)
            outcome.ran.append(spec.name)
            if resume:
                outcome.resumed.append(spec.name)
            log(f"[{i + 1}/{len(runs)}] {spec.name}: test accuracy "
                f"{100 * report.compact.test_acc:.2f}% "
                f"({time.perf_counter() - t0:.0f}s)")
        except Exception as e:  # one broken run must not stop the others
            outcome.failed[spec.name] = f"{type(e).__name__}: {e}"
            trace = traceback.format_exc()
            write_atomic(os.path.join(config.run_dir, ERROR), lambda f: f.write(trace))
            log(f"[{i + 1}/{len(runs)}] {spec.name} FAILED: {type(e).__name__}: {e}")
        finally:
            release(config.run_dir)
    write_table(root, runs)
    return outcome


def _wait_for(run_dir: str, log: Callable[[str], None]) -> bool:
    """Waits while another live process works on ``run_dir``; True once it finished."""
    while not _finished(run_dir):
        try:
            with open(os.path.join(run_dir, LOCK)) as f:
                owner = f.read()
        except FileNotFoundError:
            return False  # nobody works on it
        if _is_stale(owner):
            return False
        log(f"waiting for {os.path.basename(run_dir)} ({owner.strip()})")
        time.sleep(WAIT_SECONDS)
    return True


def write_table(root: str, runs: Sequence[RunSpec]) -> tuple[list[dict], list[str]]:
    """(Re)writes ``results.json``/``.csv`` of ``root`` from its finished runs, under the
    mutex so that the last process to finish writes the complete table."""
    from .results import write_results  # another module's job; imported on use

    if not os.path.isdir(root):
        raise FileNotFoundError(f"no sweep at {root}")
    with _mutex(root):
        return write_results(root, runs)
