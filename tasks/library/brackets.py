"""Bracket tasks: how deep a list is nested, and which kind of bracket is open."""

from __future__ import annotations

import random

from tasks.codegen import NOUNS, enclosing, open_block, pick, quoted, statements, var_name
from tasks.registry import register_task
from tasks.task import Sample


def _atom(rng: random.Random, names: list[str], last: bool = False) -> str:
    """A list element. The last one before the decision ends in a letter or digit, never a quote or
    bracket, which byte-level BPE would merge with the closing bracket (`']`, `)]`)."""
    roll = rng.random()
    if roll < 0.4:
        return str(rng.randint(0, 300))
    if roll < 0.7 or last:
        return pick(rng, names) if names and rng.random() < 0.5 else pick(rng, NOUNS)
    if roll < 0.85:
        return quoted(rng, pick(rng, NOUNS))
    return f"{pick(rng, NOUNS)}.{pick(rng, NOUNS)}"


def _flat(rng: random.Random, names: list[str], low: int = 1, high: int = 4) -> list[str]:
    return [_atom(rng, names) for _ in range(rng.randint(low, high))]


def _start(rng: random.Random, indent: int, avoid: set[str], names: list[str]) -> str:
    """The part of the line before the literal; the literal then ends the line."""
    lhs = var_name(rng, avoid)
    options = [f"{lhs} = ", f"{lhs} = ", f"{lhs} += ", f"{lhs}[{quoted(rng, pick(rng, NOUNS))}] = "]
    if indent:
        options += ["return ", "yield "]
    if "self" in names:
        options.append(f"self.{lhs} = ")
    return pick(rng, options)


@register_task(
    description="close a list nested once with ] versus twice with ]]",
    completions=("]", "]]"),
)
def bracket_counting(rng: random.Random, family: int) -> Sample:
    avoid: set[str] = set()
    head, indent, names = enclosing(rng, avoid, module_level=0.2)
    if indent and rng.random() < 0.25:
        head += open_block(rng, indent, avoid, names)
        indent += 4
    pad = " " * indent
    if family == 0:
        # One bracket open. Half of these hold inner lists that are already closed, so that
        # "a [[ appeared" is not enough: the model has to count what is still open.
        inner = [f"[{', '.join(_flat(rng, names))}]" for _ in range(rng.randint(1, 3))] if rng.random() < 0.5 else []
        items = inner + _flat(rng, names, 0, 3)
        rng.shuffle(items)
        body = "[" + ", ".join([*items, _atom(rng, names, last=True)])
    else:
        closed = [f"[{', '.join(_flat(rng, names))}]" for _ in range(rng.randint(0, 3))]
        last = [*_flat(rng, names, 0, 3), _atom(rng, names, last=True)]
        body = "[" + "".join(c + ", " for c in closed) + "[" + ", ".join(last)
    prompt = head + pad + _start(rng, indent, avoid, names) + body
    continuation = ("]", "]]")[family] + "\n" + statements(rng, indent, avoid, 0, 1, names)
    return prompt, continuation


@register_task(
    description="close a list with ] versus a set or dict with }",
    completions=("]", "}"),
)
def bracket_brace(rng: random.Random, family: int) -> Sample:
    avoid: set[str] = set()
    head, indent, names = enclosing(rng, avoid, module_level=0.2)
    pad = " " * indent
    # Closed containers of the other kind inside, so that the last opening bracket seen is not always the cue.
    nested = []
    for _ in range(rng.randint(0, 2)):
        elems = ", ".join(_flat(rng, names, 1, 3))
        nested.append(f"{{{elems}}}" if family == 0 else f"[{elems}]")
    if family == 0:
        items = nested + _flat(rng, names, 0, 3)
        rng.shuffle(items)
        body = "[" + ", ".join([*items, _atom(rng, names, last=True)])
    elif rng.random() < 0.5:  # a set
        items = [e for e in nested if rng.random() < 0.3] + _flat(rng, names, 0, 3)  # lists are unhashable; keep few
        body = "{" + ", ".join([*items, _atom(rng, names, last=True)])
    else:  # a dict
        keys = rng.sample(NOUNS, rng.randint(1, 4))
        values = [*(nested + _flat(rng, names, len(keys), len(keys)))][: len(keys) - 1] + [_atom(rng, names, last=True)]
        body = "{" + ", ".join(f"{quoted(rng, k)}: {v}" for k, v in zip(keys, values))
    prompt = head + pad + _start(rng, indent, avoid, names) + body
    continuation = ("]", "}")[family] + "\n" + statements(rng, indent, avoid, 0, 1, names)
    return prompt, continuation
