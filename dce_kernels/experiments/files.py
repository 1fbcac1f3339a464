"""The names of every file a run or a sweep writes (one definition each).

A run directory holds ``CONFIG``, ``CHECKPOINT`` (after every epoch), then
``REPORT`` and the exported model; a sweep directory holds ``SWEEP_OPTIONS``, one run
directory per cell (each with a ``LOCK`` while a process works on it and
``ERROR`` if it failed), the results tables and the ``MUTEX`` file for ``flock``.
"""
from __future__ import annotations

# A run directory.
CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
REPORT = "report.json"
EXPORT_STEM = "compact"  # compact.pt2, compact_state_dict.pt
# A sweep directory.
SWEEP_OPTIONS = "sweep.json"
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
MUTEX = ".sweep.lock"
# A run directory inside a sweep.
LOCK = "lock"
ERROR = "error.txt"

