"""Deterministic placement of point labels in a matplotlib axes, so that labels overlap neither each other
nor the points.

    boxes = place_labels(ax, [(x, y, "0.25", color), ...])   # after the axes limits and layout are final

Each label goes to the first free candidate position around its point: 8 directions (north-east
first) at growing distances; a label moved away from its point gets a thin leader line. A candidate is
free when its box (display pixels) overlaps no label placed before, no point marker of the set, stays
inside the axes and crosses none of the given ``lines``. Labels, markers and the frame are hard
obstacles, lines soft ones: when no candidate is free, the one with the least overlap of labels and
markers (then the fewest lines crossed) is taken, and a label that still overlaps a label or marker is
counted in :attr:`Placement.overlaps`. Labels are placed in a fixed order (by point position, then text), so the
result depends only on the input.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise

__all__ = ["Placement", "overlap_area", "place_labels"]

# direction unit vectors, north-east first, then the other diagonals and the axes
_DIRECTIONS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (0, 1), (-1, 0), (0, -1))
_RADII_PT = (4.0, 9.0, 15.0, 22.0, 30.0, 40.0, 52.0)


@dataclass
class Placement:
    """``boxes``: per label ``(x0, y0, x1, y1)`` in display pixels, in input order; ``texts``: the
    matplotlib ``Annotation`` of each label; ``overlaps``: labels that could not be placed free."""

    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    texts: list = field(default_factory=list)
    overlaps: int = 0


def overlap_area(a: Sequence[float], b: Sequence[float]) -> float:
    """Area shared by two ``(x0, y0, x1, y1)`` boxes (0 when they only touch)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def _crosses(p, q, box) -> bool:
    """Whether the segment ``p``-``q`` passes through the inside of ``box`` (Liang-Barsky clipping)."""
    (x0, y0), (x1, y1) = p, q
    dx, dy = x1 - x0, y1 - y0
    lo, hi = 0.0, 1.0
    for d, a in ((-dx, x0 - box[0]), (dx, box[2] - x0), (-dy, y0 - box[1]), (dy, box[3] - y0)):
        if d == 0:
            if a < 0:
                return False
            continue
        t = a / d
        if d < 0:
            lo = max(lo, t)
        else:
            hi = min(hi, t)
        if lo > hi:
            return False
    return True


def place_labels(ax, items: Sequence[tuple[float, float, str, object]], *, lines: Sequence[Sequence] = (),
                 fontsize: float = 7.0, marker_pt: float = 7.0, pad_pt: float = 1.0) -> Placement:
    """Place ``items`` = ``(x, y, text, color)`` (data coordinates) as annotations of ``ax``.

    Call it last, once limits and layout are final (it draws the figure to measure text). ``lines``:
    polylines (sequences of ``(x, y)`` in data coordinates) that labels should not cross; ``marker_pt``:
    the size of the point markers to keep clear of; ``pad_pt``: extra margin around each box.
    """
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    px = fig.dpi / 72.0
    pad = pad_pt * px
    half = marker_pt * px / 2 + pad
    frame = ax.get_window_extent(renderer)
    anchors = [tuple(ax.transData.transform((x, y))) for x, y, _, _ in items]
    segments = []
    for line in lines:
        pts = [tuple(ax.transData.transform(p)) for p in line]
        segments += list(pairwise(pts))
    markers = [(ax_ - half, ay - half, ax_ + half, ay + half) for ax_, ay in anchors]
    sizes = []
    for _, _, text, _ in items:
        probe = ax.text(0, 0, text, fontsize=fontsize)
        ext = probe.get_window_extent(renderer)
        probe.remove()
        sizes.append((ext.width + 2 * pad, ext.height + 2 * pad))
    out = Placement(boxes=[None] * len(items), texts=[None] * len(items))
    placed: list[tuple[float, float, float, float]] = []
    order = sorted(range(len(items)), key=lambda i: (anchors[i][0], anchors[i][1], items[i][2]))
    for i in order:
        (ax_, ay), (w, h) = anchors[i], sizes[i]
        best = None
        for r in _RADII_PT:
            for dx, dy in _DIRECTIONS:
                # the box touches the marker's edge (plus r) on the side of (dx, dy)
                cx = ax_ + dx * (half + r * px + w / 2) if dx else ax_
                cy = ay + dy * (half + r * px + h / 2) if dy else ay
                box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
                inside = (box[0] >= frame.x0 and box[2] <= frame.x1 and box[1] >= frame.y0 and box[3] <= frame.y1)
                hard = sum(overlap_area(box, b) for b in placed) + sum(
                    overlap_area(box, m) for j, m in enumerate(markers) if j != i)
                if not inside:
                    hard += w * h
                cost = (hard, sum(_crosses(p, q, box) for p, q in segments))
                if best is None or cost < best[0]:
                    best = (cost, box, r)
                if cost == (0, 0):
                    break
            if best[0] == (0, 0):
                break
        (hard, _), box, r = best
        out.overlaps += hard > 0
        placed.append(box)
        out.boxes[i] = box
        x, y, text, color = items[i]
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        arrow = ({"arrowstyle": "-", "color": color, "linewidth": 0.5, "alpha": 0.7, "shrinkA": 0, "shrinkB": 3}
                 if r > _RADII_PT[0] else None)
        out.texts[i] = ax.annotate(text, (x, y), xytext=((cx - ax_) / px, (cy - ay) / px), textcoords="offset points",
                                   ha="center", va="center", fontsize=fontsize, color=color, arrowprops=arrow,
                                   annotation_clip=False, zorder=6)
    return out
