"""``sparse-lm circuit-html``: render a circuit JSON as a self-contained HTML page."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_circuit_html_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("circuit", type=Path, help="circuit JSON written by the pruner")
    p.add_argument("out", type=Path, nargs="?", help="output page (default: beside the JSON, .html)")


def run_circuit_html(args) -> int:
    from pruning.html import write_circuit_html

    circuit = json.loads(args.circuit.read_text(encoding="utf-8"))
    print(write_circuit_html(circuit, args.out or args.circuit.with_suffix(".html")))
    return 0
