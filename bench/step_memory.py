"""Peak memory of one candidate of step_cases, in a fresh process: prints
{"peak_mib": ...}, how far the resident set's high-water mark rises during three
training steps above the resident set before them (model and data built). The
mark is reset first (Linux: /proc/self/clear_refs), so that transient memory
of setting up does not hide the steps' own peak.

    python bench/step_memory.py ours 0.5
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from step_cases import make_step_cases  # noqa: E402


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    candidate, fraction = sys.argv[1], float(sys.argv[2])
    torch.set_num_threads(1)
    step = make_step_cases(fraction, only=candidate)[candidate]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = _status_kib("VmRSS")
    for _ in range(3):
        step()
    print(json.dumps({"peak_mib": (_status_kib("VmHWM") - before) / 1024}))


if __name__ == "__main__":
    main()
