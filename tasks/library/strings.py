"""String tasks: which quote closes a literal, and which bracket closes a placeholder."""

from __future__ import annotations

import random

from tasks.codegen import enclosing, open_block, phrase, pick, quoted, statements, var_name, words
from tasks.registry import register_task
from tasks.task import Sample


@register_task(
    description="close a string literal with the quote that opened it: ' or \"",
    completions=("'", '"'),
)
def single_double_quote(rng: random.Random, family: int) -> Sample:
    # The literal ends its line: a closing quote followed by `)`, `,` or `:` would merge into
    # one token with it (`')`), while before a newline it is a token of its own.
    quote = ("'", '"')[family]
    avoid: set[str] = set()
    head, indent, names = enclosing(rng, avoid, module_level=0.15)
    if indent and rng.random() < 0.3:
        head += open_block(rng, indent, avoid, names)
        indent += 4
    pad = " " * indent
    assignable = [n for n in names if n != "self"]
    lhs = pick(rng, assignable) if assignable and rng.random() < 0.3 else var_name(rng, avoid)
    other = pick(rng, names) if names else "None"
    starts = [f"{lhs} = ", f"{lhs} += ", f"{lhs} = {other} or ", f"{lhs} = {quoted(rng)} if {other} else "]
    if indent:  # statements that only make sense inside a def
        starts += ["return ", "return ", "yield "]
    if "self" in names:
        starts.append(f"self.{var_name(rng, avoid)} = ")
    text = phrase(rng, 1, 6)
    prompt = head + pad + pick(rng, starts) + quote + text
    return prompt, quote + "\n" + statements(rng, indent, avoid, 0, 1, names)


@register_task(
    description="close an f-string placeholder with } versus a .format( call with )",
    completions=("}", ")"),
)
def fstring_brace(rng: random.Random, family: int) -> Sample:
    avoid: set[str] = set()
    head, indent, names = enclosing(rng, avoid, params=[var_name(rng, avoid)], module_level=0.1)
    pad = " " * indent
    q = pick(rng, ("'", '"'))
    exprs = [
        pick(rng, names) if names and rng.random() < 0.6 else var_name(rng, avoid) for _ in range(rng.randint(1, 3))
    ]
    exprs = [f"self.{e}" if "self" in names and rng.random() < 0.3 else e for e in exprs]
    start = pick(rng, (f"{var_name(rng, avoid)} = ", "return " if indent else "msg = ", "message = "))
    # Each placeholder is followed by text starting with a space: `}` before a quote or `:` would merge (`}"`).
    before = "".join(f"{words(rng, 1, 2)} {{{e}}} " for e in exprs[:-1])
    lead = phrase(rng, 1, 3) + " "
    tail = " " + words(rng, 1, 3)
    if family == 0:
        prompt = f"{head}{pad}{start}f{q}{lead}{before}{{{exprs[-1]}"
        continuation = f"}}{tail}{q}\n"
    else:
        template = lead + "".join(f"{words(rng, 1, 2)} {{}} " for _ in exprs[:-1]) + "{}" + tail
        args = ", ".join(exprs)
        prompt = f"{head}{pad}{start}{q}{template}{q}.format({args}"
        continuation = ")\n"
    return prompt, continuation + statements(rng, indent, avoid, 0, 1, names)
