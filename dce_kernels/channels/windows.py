"""Ops that pick channels by position: ``x[:, a:b]``, ``narrow``, ``split``, ``chunk``
along the channels. Which channels each result reads, and which channels must
stay active so that the compact model picks the same ones.

The compact model runs the model's own code, with the same constants, on
tensors that hold only the active channels. ``x[:, 3:]`` there starts at the
fourth *active* channel: it reads what the sparse model's ``x[:, 3:]`` reads
only if the three channels before position 3 are all active. So every position
an op cuts at, counted from the start, needs the channels before it active (a
*prefix* that stays), and every position counted from the end (a negative
bound) the channels after it (a *suffix*). Two cuts need none:

* a stop at or past the end (``x[:, :c]`` with ``c >= C``, GhostNet's
  ``out[:, :self.out_chs]``): slicing clamps, in the compact model too;
* the end of the last part of ``split(size)``: that part ends where the tensor
  ends, and it keeps at least one channel (no group is ever empty), so the
  compact model returns as many parts.

``split`` into a list of sizes must add up to the channels, and ``chunk``'s part
size follows the channel count: the compact model can cut like the sparse one
only if every channel stays. Channels of a group outside a part are simply not
read by the layers reading that part; the compact model still produces them
(the group is narrower there too) and the op drops them alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["Cut", "slice_cut", "narrow_cut", "split_cut", "chunk_cut"]


@dataclass(frozen=True)
class Cut:
    """What an op that picks channels by position reads from ``channels`` channels.

    ``parts``: ``(lo, hi)`` of each result, channels ``lo`` to ``hi - 1`` of the
    input (one for a slice or ``narrow``, one per part for ``split``/``chunk``).
    ``prefix`` / ``suffix``: the channels ``[0, prefix)`` and ``[channels -
    suffix, channels)`` must all stay active for the compact model to cut alike.
    ``what``: the op as written, for notes."""

    channels: int
    parts: tuple[tuple[int, int], ...]
    prefix: int
    suffix: int
    what: str

    def pinned(self, lo: int, hi: int) -> bool:
        """Whether channels ``[lo, hi)`` overlap the channels that must stay."""
        return lo < self.prefix or hi > self.channels - self.suffix

    def pinned_text(self) -> str:
        spans = []
        if self.prefix:
            spans.append(f"0-{self.prefix - 1}")
        if self.suffix:
            spans.append(f"{self.channels - self.suffix}-{self.channels - 1}")
        return " and ".join(spans)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _bound(value: Optional[int]) -> str:
    return "" if value is None else str(value)


def slice_cut(channels: int, start: Any, stop: Any, step: Any) -> Optional[Cut]:
    """``x[:, start:stop:step]``; None unless the bounds are constant ints (or
    None) and the step is 1."""
    if step not in (None, 1) or not all(v is None or _is_int(v) for v in (start, stop)):
        return None
    what = f"x[:, {_bound(start)}:{_bound(stop)}]"
    prefix = suffix = 0
    if start is None:
        lo = 0
    elif start >= 0:
        lo = min(start, channels)
        prefix = lo
    else:
        lo = max(channels + start, 0)
        suffix = channels - lo
    if stop is None or stop >= channels:
        hi = channels  # clamps in the compact model too
    elif stop >= 0:
        hi = stop
        prefix = max(prefix, hi)
    else:
        hi = max(channels + stop, 0)
        if hi > 0:
            suffix = max(suffix, channels - hi)
    return Cut(channels, ((lo, max(lo, hi)),), prefix, suffix, what)


def narrow_cut(channels: int, start: Any, length: Any) -> Optional[Cut]:
    """``x.narrow(1, start, length)``: no clamping (the compact model raises if the
    window passes its end), so the channels up to the window's end stay, or from
    its start for a negative start."""
    if not (_is_int(start) and _is_int(length)) or length < 0:
        return None
    lo = start if start >= 0 else channels + start
    if lo < 0 or lo + length > channels:
        return None
    what = f"narrow(1, {start}, {length})"
    if start >= 0:
        return Cut(channels, ((lo, lo + length),), lo + length, 0, what)
    return Cut(channels, ((lo, lo + length),), 0, channels - lo, what)


def split_cut(channels: int, sizes: Any) -> Optional[Cut]:
    """``split(size, dim=1)`` (parts of ``size``, the last one shorter) or
    ``split([s1, s2, ...], dim=1)`` (sizes that add up to the channels)."""
    if _is_int(sizes):
        if sizes <= 0:
            return None
        starts = list(range(0, channels, sizes))
        parts = tuple((lo, min(lo + sizes, channels)) for lo in starts)
        # Every part but the last is cut at fixed positions; the last ends at the end.
        return Cut(channels, parts, starts[-1] if starts else 0, 0, f"split({sizes}, dim=1)")
    if (not isinstance(sizes, (list, tuple)) or not all(_is_int(s) and s >= 0 for s in sizes)
            or sum(sizes) != channels):
        return None
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    # The sizes must add up to the compact model's channels too: all of them stay.
    return Cut(channels, tuple(zip(bounds, bounds[1:])), channels, 0,
               f"split({list(sizes)}, dim=1)")


def chunk_cut(channels: int, chunks: Any) -> Optional[Cut]:
    """``chunk(chunks, dim=1)``: parts of ``ceil(channels / chunks)`` channels."""
    if not _is_int(chunks) or chunks <= 0 or channels == 0:
        return None
    size = -(-channels // chunks)
    parts = tuple((lo, min(lo + size, channels)) for lo in range(0, channels, size))
    return Cut(channels, parts, channels if len(parts) > 1 else 0, 0,
               f"chunk({chunks}, dim=1)")
