"""A grid of training runs: accuracy vs active fraction, CUCB vs random, several seeds.

Layout of an output directory (``out``)::

    <out>/<dataset>-<model>/sweep.json                the options every run shares
    <out>/<dataset>-<model>/<selector>-p<frac>-s<seed>/  one train() run each
    <out>/<dataset>-<model>/results.json, results.csv  the table (see dce_kernels.experiments.results)

The dense baseline is the run at fraction 1.0, once per seed, named
``dense-p1.0-s<seed>``: at p = 1 both selectors activate every channel at every
step and keep all of them, so CUCB and random would train the identical network
(the test suite checks this). It gets exactly the compact runs' schedule
(explore + fine-tune epochs, same learning rates), which makes it the fair
reference; fraction 1.0 in the list of fractions means this run. The train()
phase ``dense`` is therefore switched off in sweep runs (``dense_epochs=0``).

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

from .choices import SELECTORS, check_choice
from .files import CHECKPOINT, ERROR, LOCK, MUTEX, REPORT, SWEEP_OPTIONS
from .train import TrainConfig, train

__all__ = ["RunSpec", "SweepOutcome", "DEFAULT_FRACTIONS", "BASELINE",
           "plan_runs", "sweep_dir", "run_sweep", "write_table", "try_claim", "release"]

DEFAULT_FRACTIONS = tuple(round(0.1 * i, 1) for i in range(1, 11))
BASELINE = "dense"  # the "selector" label of the fraction-1.0 run
# TrainConfig fields that vary within a sweep or do not change the computation.
_PER_RUN = ("fraction", "selector", "seed", "run_dir", "progress", "data_dir", "device",
            "dense_epochs")


@dataclass(frozen=True)
class RunSpec:
    """One cell of the grid."""

    selector: str  # "cucb", "random" or BASELINE
    fraction: float
    seed: int

    @property
    def name(self) -> str:
        # repr() of a float is exact and unique: 0.1 -> "0.1", 1.0 -> "1.0".
        return f"{self.selector}-p{float(self.fraction)!r}-s{self.seed}"


def plan_runs(fractions: Sequence[float] = DEFAULT_FRACTIONS,
              selectors: Sequence[str] = tuple(SELECTORS),
              seeds: Sequence[int] = (0, 1, 2)) -> list[RunSpec]:
    """The grid, seed by seed (an interrupted sweep has whole curves first):
    per seed the dense baseline, then every fraction below 1 with every selector."""
    fractions, selectors, seeds = list(fractions), list(selectors), list(seeds)
    if not fractions:
        raise ValueError("fractions: the list is empty")
    if not selectors:
        raise ValueError("selectors: the list is empty")
    if not seeds:
        raise ValueError("seeds: the list is empty")
    for p in fractions:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
            raise ValueError(f"fraction {p!r} is outside (0, 1]")
    for s in selectors:
        check_choice("selector", s, SELECTORS)
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"seed {s!r} is not a non-negative integer")
    for name, values in (("fractions", [float(p) for p in fractions]),
                         ("selectors", selectors), ("seeds", seeds)):
        if len(set(values)) != len(values):
            raise ValueError(f"{name}: duplicate entries in {values}")
    runs = []
    for seed in seeds:
        runs.append(RunSpec(BASELINE, 1.0, seed))
        runs += [RunSpec(sel, float(p), seed) for p in fractions if p < 1.0 for sel in selectors]
    return runs


def sweep_dir(out: str, base: TrainConfig) -> str:
    return os.path.join(out, f"{base.dataset}-{base.model}")


def run_config(base: TrainConfig, spec: RunSpec, root: str) -> TrainConfig:
    """The TrainConfig of one run: the shared options plus the cell's own."""
    selector = "cucb" if spec.selector == BASELINE else spec.selector
    return dataclasses.replace(base, fraction=spec.fraction, selector=selector, seed=spec.seed,
                               dense_epochs=0, run_dir=os.path.join(root, spec.name))


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
    """A lock is stale if its writer died: empty/garbled (it died between create
    and write, which happen under the mutex), or its pid is gone on this host."""
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
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    owner = f.read()
            except FileNotFoundError:
                continue  # released meanwhile: try again
            if not _is_stale(owner):
                return False
            os.unlink(path)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(_owner())
        return True
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
        if saved != options:
            diff = {k: (saved.get(k), options.get(k)) for k in sorted(set(saved) | set(options))
                    if saved.get(k) != options.get(k)}
            raise ValueError(f"{root} holds a sweep made with other options (saved, now): "
                             f"{diff}; choose another output directory")
        return
    with open(path + ".tmp", "w") as f:
        json.dump(options, f, indent=2)
    os.replace(path + ".tmp", path)


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
    for i, spec in enumerate(runs):
        config = run_config(base, spec, root)
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
            with open(os.path.join(config.run_dir, ERROR), "w") as f:
                f.write(traceback.format_exc())
            log(f"[{i + 1}/{len(runs)}] {spec.name} FAILED: {type(e).__name__}: {e}")
        finally:
            release(config.run_dir)
    write_table(root, runs)
    return outcome


def write_table(root: str, runs: Sequence[RunSpec]) -> tuple[list[dict], list[str]]:
    """(Re)writes ``results.json``/``.csv`` of ``root`` from its finished runs, under the
    mutex so that the last process to finish writes the complete table."""
    from .results import write_results  # another module's job; imported on use

    if not os.path.isdir(root):
        raise FileNotFoundError(f"no sweep at {root}")
    with _mutex(root):
        return write_results(root, runs)
