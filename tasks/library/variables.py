"""Tasks about what a variable holds: a set or a string, a flag or a count, one name or two."""

from __future__ import annotations

import random

from tasks.codegen import (
    ADJECTIVES,
    NEWLINE_BODY,
    NOUNS,
    enclosing,
    function_head,
    open_block,
    pick,
    preamble,
    quoted,
    simple_statement,
    statements,
    var_name,
)
from tasks.registry import register_task
from tasks.task import Sample



def _set_or_string(rng: random.Random, family: int, name: str | None) -> Sample:
    avoid: set[str] = set()
    items = var_name(rng, avoid)
    var = name or var_name(rng, avoid)
    avoid.add(var)
    head, indent, names = enclosing(rng, avoid, params=[items], body=(0, 2))
    pad = " " * indent
    init = pick(rng, ("set()", "set()", "set()")) if family == 0 else pick(rng, ("''", '""', "''", "str()"))
    text = head + f"{pad}{var} = {init}\n" + statements(rng, indent, avoid, 0, 2, names)
    each = pick(rng, ("ch", "c", "x", "item", "part", "piece", "word", "token", "name", "s"))
    text += f"{pad}for {each} in {items}:\n"
    inner = indent + 4
    text += statements(rng, inner, avoid, 0, 2, [each, *names])
    if rng.random() < 0.6:
        prefix = quoted(rng, pick(rng, NOUNS))
        condition = pick(rng, (each, f"not {each}.startswith({prefix})", f"{each} not in {var}"))
        text += f"{' ' * inner}if {condition}:\n"
        inner += 4
    prompt = text + " " * inner + var
    action = f".add({each})" if family == 0 else f" += {each}"
    return prompt, f"{action}\n{pad}return {var}\n"


# Where `+=` is not one token, the first token of ` += x` is ` +`.
_PLUS_EQUALS_FALLBACK = ((".", " +"),)


@register_task(
    description="after a name bound to set() or to a string: .add versus +=",
    completions=(".", " +="),
    alternatives=_PLUS_EQUALS_FALLBACK,
)
def set_or_string(rng: random.Random, family: int) -> Sample:
    return _set_or_string(rng, family, name=None)


@register_task(
    description="set_or_string with the variable always called current",
    completions=(".", " +="),
    alternatives=_PLUS_EQUALS_FALLBACK,
)
def set_or_string_fixedvarname(rng: random.Random, family: int) -> Sample:
    return _set_or_string(rng, family, name="current")


def _pair(rng: random.Random, avoid: set[str]) -> tuple[str, str]:
    pairs = [("a", "b"), ("x", "y"), ("lo", "hi"), ("left", "right"), ("first", "second"), ("i", "j"),
             ("old", "new"), ("src", "dst"), ("start", "end"), ("low", "high"), ("prev", "cur"), ("p", "q")]
    if rng.random() < 0.5:
        return pairs[rng.randrange(len(pairs))]
    return var_name(rng, avoid), var_name(rng, avoid)


@register_task(
    description="after `a, b = b` a comma follows (swap) versus a newline after `a = b`",
    completions=(",", NEWLINE_BODY),
    alternatives=((",", "\n"),),
)
def var_swap(rng: random.Random, family: int) -> Sample:
    avoid: set[str] = set()
    a, b = _pair(rng, avoid)
    avoid |= {a, b}
    text = preamble(rng, avoid)
    head, names = function_head(rng, avoid, params=[a, b])
    text += head + statements(rng, 4, avoid, 0, 2, names)
    indent = 4
    if rng.random() < 0.75:
        # The usual place of a swap: under a comparison of the two.
        text += f"    if {a} {pick(rng, ('>', '<', '>=', '<='))} {b}:\n"
        indent = 8
        if rng.random() < 0.3:
            text += statements(rng, indent, avoid, 1, 1, names)
    pad = " " * indent
    prompt = text + (f"{pad}{a}, {b} = {b}" if family == 0 else f"{pad}{a} = {b}")
    rest = f"    return {pick(rng, (a, f'{a}, {b}', f'{b} - {a}', f'({a}, {b})'))}\n"
    return prompt, (f", {a}\n" if family == 0 else "\n") + rest


_FLAGS = ("found", "changed", "done", "ok", "dirty", "matched", "seen_any", "failed", "stop", "modified")
_COUNTS = ("count", "total", "misses", "retries", "errors", "n", "hits", "skipped", "num_items", "depth")


@register_task(
    description="`if` on a variable bound to a bool (colon) versus one counting things (>)",
    completions=(":", " >"),
)
def var_if(rng: random.Random, family: int) -> Sample:
    avoid: set[str] = set()
    items = var_name(rng, avoid)
    if rng.random() < 0.5:
        var = pick(rng, _FLAGS if family == 0 else _COUNTS)
    else:  # a neutral name: the binding is the only cue
        var = f"{pick(rng, ADJECTIVES)}_{pick(rng, NOUNS)}"
    avoid.add(var)
    head, indent, names = enclosing(rng, avoid, params=[items], body=(0, 2))
    pad = " " * indent
    start, update = ("False", "True") if family == 0 else ("0", None)
    text = head + f"{pad}{var} = {start}\n" + statements(rng, indent, avoid, 0, 1, names)
    each = var_name(rng, avoid)
    text += f"{pad}for {each} in {items}:\n"
    inner = " " * (indent + 4)
    text += statements(rng, indent + 4, avoid, 0, 1, [each, *names])
    if family == 0:
        text += f"{inner}if {each}.{pick(rng, NOUNS)}:\n{inner}    {var} = {update}\n"
        if rng.random() < 0.5:
            text += f"{inner}    break\n"
    else:
        step = pick(rng, (" += 1", " += 1", f" += len({each})", f" += {each}.{pick(rng, NOUNS)}"))
        text += f"{inner}{var}{step}\n"
    text += statements(rng, indent, avoid, 0, 1, names)
    prompt = text + f"{pad}if {var}"
    continuation = ":\n" if family == 0 else f" > {pick(rng, ('0', '1', str(rng.randint(2, 100)), 'limit'))}:\n"
    return prompt, continuation + f"{pad}    return {pick(rng, (var, 'True', 'None', each))}\n"


@register_task(
    description="`==` after a name in an if condition versus `=` after a name starting a statement",
    completions=(" ==", " ="),
)
def if_equals(rng: random.Random, family: int) -> Sample:
    avoid: set[str] = set()
    var = var_name(rng, avoid)
    head, indent, names = enclosing(rng, avoid, params=[var], module_level=0.1)
    if indent and rng.random() < 0.3:
        head += open_block(rng, indent, avoid, names)
        indent += 4
    pad = " " * indent
    value = pick(rng, ("None", "0", "1", "''", "[]", quoted(rng, pick(rng, NOUNS)), pick(rng, names) if names else "0"))
    if family == 0:
        keyword = pick(rng, ("if", "if", "if", "while", "assert"))
        prompt = f"{head}{pad}{keyword} {var}"
        end = "\n" if keyword == "assert" else ":\n" + simple_statement(rng, indent + 4, avoid)
        return prompt, f" == {value}{end}"
    prompt = f"{head}{pad}{var}"
    return prompt, f" = {value}\n" + statements(rng, indent, avoid, 0, 1, names)
