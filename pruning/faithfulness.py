"""Faithfulness curves: how much of the model's task behaviour the first n nodes of a node order keep.

For a node order (the learned masks' or attribution's) and a budget of n
nodes, the circuit keeps the first n nodes and mean-ablates the rest. Its
faithfulness is MIB's normalised metric

    f(n) = (m(C_n) - m(empty)) / (m(full) - m(empty))

with m the logit difference (target minus distractor at the last prompt
position, averaged within each prompt family and then over the families, as
the task loss is): 0 with every node ablated, 1 for the whole model. The
curve runs over a dozen log-spaced budgets (plus 0, the circuit's own size
and every node), and its areas over the kept share x = n / total are MIB's

    CPR = integral of f(x) dx         (higher is better: the order finds what matters early)
    CMD = integral of |1 - f(x)| dx   (lower is better: the circuits stay close to the model)

by the trapezoid rule on the measured budgets.
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["budgets", "faithfulness_value", "curve_areas", "faithfulness_curve"]


def budgets(total: int, points: int, also: tuple[int, ...] = ()) -> list[int]:
    """0, about `points` log-spaced node counts in [1, total], `total`, and the counts in `also`, ascending."""
    counts = {0, total, *(c for c in also if 0 <= c <= total)}
    if total > 0 and points > 0:
        for i in range(points):
            counts.add(int(round(total ** (i / max(points - 1, 1)))))
    return sorted(counts)


def faithfulness_value(m: float, m_empty: float, m_full: float) -> float:
    """(m - m_empty) / (m_full - m_empty); NaN when the full and empty models have the same logit difference."""
    span = m_full - m_empty
    if not math.isfinite(span) or abs(span) < 1e-9:
        return math.nan
    return (m - m_empty) / span


def curve_areas(curve: list[list[float]], total: int) -> tuple[float, float]:
    """(CPR, CMD) of a [[nodes, loss, faithfulness], ...] curve sorted by nodes (trapezoids over nodes / total)."""
    pts = [(n / total, f) for n, _, f in curve if total > 0 and math.isfinite(f)]
    if len(pts) < 2:
        return math.nan, math.nan
    cpr = cmd = 0.0
    for (x0, f0), (x1, f1) in zip(pts, pts[1:]):
        cpr += (x1 - x0) * (f0 + f1) / 2
        cmd += (x1 - x0) * (abs(1 - f0) + abs(1 - f1)) / 2
    return cpr, cmd


def faithfulness_curve(measure: Callable[[int], tuple[float, float]], counts: list[int], total: int,
                       known: dict[int, tuple[float, float]] | None = None) -> dict:
    """The curve of one node order: `measure(n)` gives (task loss, logit difference) with its first n nodes kept.

    `known` holds measurements already made (0: every node ablated, `total`: the model), which must
    include 0 and `total`. Returns ``{"curve": [[nodes, loss, faithfulness], ...], "cpr", "cmd"}``.
    """
    done = dict(known or {})
    for n in counts:
        if n not in done:
            done[n] = measure(n)
    m_empty, m_full = done[0][1], done[total][1]
    curve = [[n, done[n][0], faithfulness_value(done[n][1], m_empty, m_full)] for n in sorted(set(counts) | {0, total})]
    cpr, cmd = curve_areas(curve, total)
    return {"curve": curve, "cpr": cpr, "cmd": cmd}
