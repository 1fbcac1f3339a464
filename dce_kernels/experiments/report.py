"""The report of one run (``report.json``): a typed record the trainer writes and the
CLI summary, the sweep and the results table read.

The JSON layout is the dataclasses' own (``dataclasses.asdict``), so the file on
disk reads the same as before the types existed: ``report["compact"]["test_acc"]``
in JSON is ``report.compact.test_acc`` here.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Optional

from ..atomic import write_atomic

__all__ = ["EpochRecord", "PhaseTotals", "Selection", "DenseSummary", "CompactSummary",
           "Reduction", "ExportInfo", "RunReport"]


@dataclass
class EpochRecord:
    """One training epoch, with the test accuracy at its end."""

    phase: str
    epoch: int
    train_loss: float
    train_acc: float
    test_acc: float
    train_seconds: float
    lr_end: float
    train_flops: int = 0  # forward + backward of every step (0 in reports made before)


@dataclass
class PhaseTotals:
    """What a phase has cost so far, and its last test accuracy."""

    epochs: int = 0
    seconds: float = 0.0
    seconds_per_epoch: Optional[float] = None
    test_acc: Optional[float] = None
    train_flops: int = 0

    def add(self, record: EpochRecord) -> None:
        self.epochs += 1
        self.seconds += record.train_seconds
        self.train_flops += record.train_flops
        self.seconds_per_epoch = self.seconds / self.epochs
        self.test_acc = record.test_acc


@dataclass
class Selection:
    """The channels kept at the end of exploration, per selectable layer."""

    channels_kept: list[int]
    channels_total: list[int]
    indices: list[list[int]]

    @classmethod
    def of(cls, indices, channels_total) -> "Selection":
        """From one index list per layer (tensors or sequences) and the layers' sizes."""
        kept = [[int(i) for i in idx] for idx in indices]
        return cls(channels_kept=[len(k) for k in kept], channels_total=list(channels_total),
                   indices=kept)


@dataclass
class DenseSummary:
    """The architecture at full width; accuracy and time only if the dense phase ran."""

    params: int
    flops: int
    test_acc: Optional[float]
    seconds_per_epoch: Optional[float]


@dataclass
class CompactSummary:
    """The exported compact model, and the sparse model it came from."""

    params: int
    flops: int
    test_acc: float
    sparse_test_acc: float
    sparse_flops: int
    seconds_per_epoch: Optional[float]
    explore_seconds_per_epoch: Optional[float]


@dataclass
class Reduction:
    """Dense / compact ratios (> 1 is smaller) and the accuracy change in [0, 1] units."""

    params: float
    flops: float
    accuracy_change: Optional[float]


@dataclass
class ExportInfo:
    state_dict: str
    program: str
    accuracy_matches_sparse: bool


@dataclass
class RunReport:
    """Everything a run reports; the fields after ``selection`` exist once it finished."""

    config: dict
    data: dict
    phases: dict[str, PhaseTotals] = field(default_factory=dict)
    history: list[EpochRecord] = field(default_factory=list)
    selection: Optional[Selection] = None
    dense: Optional[DenseSummary] = None
    compact: Optional[CompactSummary] = None
    reduction: Optional[Reduction] = None
    export: Optional[ExportInfo] = None
    wall_clock_seconds: dict[str, float] = field(default_factory=dict)
    # The processes that trained it (torchrun): how many, and each one's batch.
    world_size: int = 1
    per_rank_batch: Optional[int] = None

    @property
    def train_seconds(self) -> float:
        """Wall-clock of all training epochs (evaluation and export not included)."""
        return sum(p.seconds for p in self.phases.values())

    @property
    def train_flops(self) -> int:
        return sum(p.train_flops for p in self.phases.values())

    def record_epoch(self, record: EpochRecord) -> None:
        self.history.append(record)
        self.phases.setdefault(record.phase, PhaseTotals()).add(record)

    @property
    def finished(self) -> bool:
        return self.compact is not None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunReport":
        def opt(kind, value):
            return None if value is None else kind(**value)

        return cls(
            config=dict(d["config"]), data=dict(d["data"]),
            phases={k: PhaseTotals(**v) for k, v in d.get("phases", {}).items()},
            history=[EpochRecord(**h) for h in d.get("history", [])],
            selection=opt(Selection, d.get("selection")),
            dense=opt(DenseSummary, d.get("dense")),
            compact=opt(CompactSummary, d.get("compact")),
            reduction=opt(Reduction, d.get("reduction")),
            export=opt(ExportInfo, d.get("export")),
            wall_clock_seconds=dict(d.get("wall_clock_seconds", {})),
            world_size=int(d.get("world_size", 1)), per_rank_batch=d.get("per_rank_batch"))

    def save(self, path: str) -> None:
        data = self.to_dict()
        write_atomic(path, lambda f: json.dump(data, f, indent=2))

    @classmethod
    def load(cls, path: str) -> "RunReport":
        with open(path) as f:
            return cls.from_dict(json.load(f))
