"""Control-flow tasks: loop headers, conditionals and where a block begins."""

from __future__ import annotations

import random

from tasks.codegen import (
    NEWLINE_BODY,
    NOUNS,
    enclosing,
    func_name,
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


@register_task(
    description="a colon after `while True` versus a newline after `return True`",
    completions=(":", NEWLINE_BODY),
    alternatives=((":", "\n"),),
)
def while_return_true(rng: random.Random, family: int) -> Sample:
    # A module-level function, so that the line after a nested `return True` is back at indent 4
    # (see NEWLINE_BODY); `while True` appears at the same depths.
    avoid: set[str] = set()
    text = preamble(rng, avoid)
    head, names = function_head(rng, avoid, params=[var_name(rng, avoid)])
    text += head + statements(rng, 4, avoid, 0, 2, names)
    depth = rng.choice((1, 2)) if family == 1 else rng.choice((0, 1, 1, 2))
    indent = 4
    for _ in range(depth):
        text += open_block(rng, indent, avoid, names)
        indent += 4
        text += statements(rng, indent, avoid, 0, 1, names)
    pad = " " * indent
    if family == 0:
        body = simple_statement(rng, indent + 4, avoid) + f"{pad}    break\n"
        return text + f"{pad}while True", f":\n{body}    return False\n"
    return text + f"{pad}return True", f"\n    return {pick(rng, ('False', 'None', 'True', names[0]))}\n"


@register_task(
    description="after `else` a colon versus after `elif` a condition (isinstance chains)",
    completions=(":", " isinstance"),
    alternatives=((":", " is"),),  # where ` isinstance` is split, it starts with ` is`
)
def else_elif(rng: random.Random, family: int) -> Sample:
    avoid: set[str] = set()
    subject = var_name(rng, avoid)
    head, indent, names = enclosing(rng, avoid, params=[subject], module_level=0.1)
    pad = " " * indent
    types = rng.sample(("str", "bytes", "int", "float", "list", "tuple", "dict", "set", "type", "bool"), 4)
    text = head
    # The same kind of chain in both families: only the keyword that ends the prompt decides.
    for i in range(rng.randint(1, 3)):
        keyword = "if" if i == 0 else "elif"
        text += f"{pad}{keyword} isinstance({subject}, {types[i]}):\n"
        text += statements(rng, indent + 4, avoid, 0, 1, names) + simple_statement(rng, indent + 4, avoid)
    if family == 0:
        return text + f"{pad}else", ":\n" + simple_statement(rng, indent + 4, avoid)
    return text + f"{pad}elif", f" isinstance({subject}, {types[3]}):\n" + simple_statement(rng, indent + 4, avoid)


_INDEX_NAMES = ("i", "j", "k", "n", "idx", "index", "pos", "lineno", "count", "num", "row", "col")


@register_task(
    description="` in` after `for i` versus ` <` after `while i`",
    completions=(" in", " <"),
)
def for_while(rng: random.Random, family: int) -> Sample:
    avoid: set[str] = set()
    bound = var_name(rng, avoid)
    head, indent, names = enclosing(rng, avoid, params=[bound], module_level=0.1)
    pad = " " * indent
    loop = pick(rng, _INDEX_NAMES)
    avoid.add(loop)
    # A counter initialised to 0 appears in both families, so that it does not give the answer away.
    text = head
    if family == 1 or rng.random() < 0.5:
        text += f"{pad}{loop if family == 1 else var_name(rng, avoid)} = {pick(rng, ('0', '0', '1'))}\n"
    text += statements(rng, indent, avoid, 0, 1, names)
    body = statements(rng, indent + 4, avoid, 0, 1, [loop, *names]) + simple_statement(rng, indent + 4, avoid)
    if family == 0:
        limit = pick(rng, (f"range({bound})", f"range(len({bound}))", bound, f"range(1, {bound})"))
        return text + f"{pad}for {loop}", f" in {limit}:\n{body}"
    limit = pick(rng, (bound, f"len({bound})", str(rng.randint(2, 64))))
    return text + f"{pad}while {loop}", f" < {limit}:\n{body}{pad}    {loop} += 1\n"


def _condition(rng: random.Random, names: list[str], avoid: set[str]) -> str:
    """A condition ending in a name or number: `):` and `]:` are single tokens, so a call or subscript
    at the end would change which token follows."""
    x = pick(rng, names) if names and rng.random() < 0.6 else var_name(rng, avoid)
    return pick(
        rng,
        (
            x,
            f"not {x}",
            f"{x} is None",
            f"{x} is not None",
            f"{x} > {rng.randint(0, 9)}",
            f"{x} == {rng.randint(0, 99)}",
            f"{x} in {var_name(rng, avoid)}",
            f"{x}.{pick(rng, NOUNS)}",
            f"len({x}) > {rng.randint(0, 9)}",
        ),
    )


@register_task(
    description="after the condition of an `if` statement a colon versus ` else` in a conditional expression",
    completions=(":", " else"),
)
def if_ternary(rng: random.Random, family: int) -> Sample:
    avoid: set[str] = set()
    head, indent, names = enclosing(rng, avoid, params=[var_name(rng, avoid)], module_level=0.15)
    if indent and rng.random() < 0.3:
        head += open_block(rng, indent, avoid, names)
        indent += 4
    pad = " " * indent
    cond = _condition(rng, names, avoid)
    value = pick(rng, (pick(rng, names) if names else "None", quoted(rng), "None", str(rng.randint(0, 9)), "[]"))
    other = pick(rng, ("None", "0", quoted(rng), "()", pick(rng, names) if names else "1"))
    if family == 0:
        return head + f"{pad}if {cond}", ":\n" + simple_statement(rng, indent + 4, avoid)
    start = pick(rng, (f"{var_name(rng, avoid)} = ", "return " if indent else "value = "))
    return head + f"{pad}{start}{value} if {cond}", f" else {other}\n"


@register_task(
    description="after a `for` header the next line is indented deeper (newline + 8 spaces) versus kept (newline + 4)",
    completions=("\n       ", NEWLINE_BODY),
    boundary_shifts=(1,),  # the paper's tokenizer ends the header line with `:\n`; the indentation follows
)
def indent_for(rng: random.Random, family: int) -> Sample:
    # Module-level functions only: the answer is the next line's indentation, which must be the same
    # token in every example of a family (4 spaces in the body, 8 in the loop).
    avoid: set[str] = set()
    items = var_name(rng, avoid)
    text = preamble(rng, avoid)
    head, names = function_head(rng, avoid, params=[items])
    text += head + statements(rng, 4, avoid, 0, 3, names)
    each = var_name(rng, avoid)
    view = f"{items}.{pick(rng, ('items', 'values', 'keys'))}()"
    src = pick(rng, (items, view, f"sorted({items})", f"range({items})"))
    if family == 0:
        body = statements(rng, 8, avoid, 0, 1, [each, *names]) + simple_statement(rng, 8, avoid)
        return text + f"    for {each} in {src}:", "\n" + body
    # Lines that mention `for` without opening a block: comprehensions and generator expressions.
    target = var_name(rng, avoid)
    line = pick(
        rng,
        (
            f"    {target} = [{each} for {each} in {src}]",
            f"    {target} = sum({each}.{pick(rng, NOUNS)} for {each} in {src})",
            f"    {target} = {{{each} for {each} in {src}}}",
            f"    {target} = {func_name(rng, avoid)}({items})",
            f"    {target} = {quoted(rng)}",
        ),
    )
    return text + line, "\n" + statements(rng, 4, avoid, 0, 1, names) + f"    return {target}\n"


@register_task(
    description="` enumerate` after `for i, x in` versus ` range` after `for i in`",
    completions=(" enumerate", " range"),
    alternatives=((" en", " range"),),
)
def enumerate_range(rng: random.Random, family: int) -> Sample:
    avoid: set[str] = set()
    items = var_name(rng, avoid)
    head, indent, names = enclosing(rng, avoid, params=[items], module_level=0.1)
    pad = " " * indent
    index = pick(rng, _INDEX_NAMES)
    avoid.add(index)
    body = statements(rng, indent + 4, avoid, 0, 1, [index, *names]) + simple_statement(rng, indent + 4, avoid)
    if family == 0:
        each = var_name(rng, avoid)
        start = pick(rng, ("", "", ", 1", ", start=1"))
        return head + f"{pad}for {index}, {each} in", f" enumerate({items}{start}):\n{body}"
    limit = pick(rng, (f"len({items})", items, f"1, len({items})", str(rng.randint(2, 64))))
    return head + f"{pad}for {index} in", f" range({limit}):\n{body}"
