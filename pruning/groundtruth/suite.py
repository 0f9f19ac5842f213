"""Prune registered programs and score each circuit against its ground truth (`sparse-lm groundtruth`).

    for result in run_suite(["hist", "reverse"], methods=["learned", "attribution"], variants=["plain", "rotated"]):
        print(result.row())

Each program is compiled once; the rotated variant (`rotate`) reuses its model and truth. Nothing is
printed or written here: the app layer does that (``sparse_lm_app/commands/groundtruth.py``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pruning.circuit import Circuit
from pruning.groundtruth import (
    Compiled,
    compile_registered,
    prune_compiled,
    rotate,
    score,
)
from pruning.groundtruth.programs import PROGRAMS

VARIANTS = ("plain", "rotated")
METHODS = ("learned", "attribution")

__all__ = ["METHODS", "VARIANTS", "Result", "resolve_programs", "run_suite"]


@dataclass
class Result:
    """One program, one variant, one method: its circuit and its scores against the ground truth."""

    program: str
    variant: str  # "plain" | "rotated"
    method: str
    scores: dict[str, Any]
    circuit: Circuit
    compiled: Compiled
    compile_seconds: float
    prune_seconds: float

    @property
    def label(self) -> str:
        return f"{self.program}{'-rotated' if self.variant == 'rotated' else ''}/{self.method}"

    def to_json(self) -> dict[str, Any]:
        c = self.circuit
        return {"program": self.program, "variant": self.variant, "method": self.method,
                "description": PROGRAMS[self.program].description if self.program in PROGRAMS else "",
                "scores": self.scores, "failed": c.failed, "reason": c.reason, "target_loss": c.target_loss,
                "metrics": c.metrics, "verification": c.verification,
                "node_sites": c.node_sites, "inputs": len(self.compiled.task),
                "splits": c.search.get("splits"),
                # where the bisection and refine step chose: when it is every input, "test" metrics are not held out
                "selection": c.search.get("selection"), "seconds": {"compile": round(self.compile_seconds, 3),
                                                              "prune": round(self.prune_seconds, 3)},
                "ground_truth": self.compiled.ground_truth.to_json()}


def resolve_programs(names: Sequence[str]) -> list[str]:
    """``["all"]`` -> every registered program; otherwise the names, checked."""
    if list(names) == ["all"]:
        return list(PROGRAMS)
    unknown = [n for n in names if n not in PROGRAMS]
    if unknown:
        raise KeyError(f"no registered program {', '.join(map(repr, unknown))}; registered: {', '.join(PROGRAMS)} "
                       "(or all)")
    return list(names)


def run_suite(programs: Sequence[str], methods: Sequence[str] = METHODS, variants: Sequence[str] = ("plain",), *,
              overrides: dict[str, Any] | None = None, seed: int = 0) -> Iterator[Result]:
    """Compile, prune and score every (program, variant, method); results as they come."""
    bad = [m for m in methods if m not in METHODS] + [v for v in variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"unknown methods or variants {bad}; methods: {METHODS}, variants: {VARIANTS}")
    for name in resolve_programs(programs):
        t0 = time.perf_counter()
        base = compile_registered(name)
        compile_seconds = time.perf_counter() - t0
        for variant in variants:
            compiled = rotate(base, seed=seed) if variant == "rotated" else base
            for method in methods:
                t1 = time.perf_counter()
                circuit = prune_compiled(compiled, method, **(overrides or {}))
                prune_seconds = time.perf_counter() - t1
                scores = {} if circuit.failed else score(circuit, compiled.ground_truth)
                yield Result(name, variant, method, scores, circuit, compiled, compile_seconds, prune_seconds)
