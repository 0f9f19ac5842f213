"""Tasks about definitions and the statements around them: methods, lambdas, calls, `with`."""

from __future__ import annotations

import random

from tasks.codegen import (
    NOUNS,
    class_name,
    docstring,
    enclosing,
    func_name,
    maybe,
    pick,
    preamble,
    quoted,
    simple_statement,
    statements,
    var_name,
)
from tasks.registry import register_task
from tasks.task import Sample


def _method(rng: random.Random, avoid: set[str], decorator: str) -> str:
    """A complete method at class-body indentation (4), to sit before the decision."""
    name = func_name(rng, avoid)
    first = {"@classmethod": "cls", "@staticmethod": ""}.get(decorator, "self")
    params = ", ".join([p for p in [first, *(var_name(rng, avoid) for _ in range(rng.randint(0, 2)))] if p])
    text = f"    {decorator}\n" if decorator else ""
    body = statements(rng, 8, avoid, 0, 2, [first] if first else [])
    body += f"        return {pick(rng, (first or 'None', 'None', 'True'))}\n"
    return text + f"    def {name}({params}):\n" + maybe(rng, 0.3, lambda: docstring(rng, 8)) + body + "\n"


@register_task(
    description="the first parameter of a method is self (an __init__ or plain method) versus cls (@classmethod)",
    completions=("self", "cls"),
    boundary_shifts=(-1,),  # the paper's tokenizer writes `(self` as one token
)
def class_init(rng: random.Random, family: int) -> Sample:
    avoid: set[str] = set()
    text = preamble(rng, avoid)
    base = pick(rng, ("", "", "(object)", f"({class_name(rng)})"))
    text += f"class {class_name(rng)}{base}:\n" + maybe(rng, 0.4, lambda: docstring(rng, 4))
    # Earlier methods of both kinds: the decorator right above the `def` is the cue, not its presence somewhere.
    for _ in range(rng.randint(0, 2)):
        text += _method(rng, avoid, pick(rng, ("", "", "@classmethod", "@property", "@staticmethod")))
    if family == 0:
        decorator = pick(rng, ("", "", "", "@property\n    ", "@functools.lru_cache()\n    "))
        # `__init__` in under a third: the paper's tokenizer writes `__(` + `self`, not `(self`, so those prompts drop there.
        name = "__init__" if rng.random() < 0.3 else func_name(rng, avoid)
    else:
        decorator = "@classmethod\n    "
        name = pick(rng, (f"from_{pick(rng, NOUNS)}", "create", f"_{func_name(rng, avoid)}", func_name(rng, avoid)))
    prompt = text + f"    {decorator}def {name}("
    params = "".join(f", {var_name(rng, avoid)}" for _ in range(rng.randint(0, 2)))
    return prompt, f"{('self', 'cls')[family]}{params}):\n" + simple_statement(rng, 8, avoid)


@register_task(
    description="after the parameters of a lambda a colon versus `):` closing a def's parameters",
    completions=(":", "):"),
)
def lambda_func(rng: random.Random, family: int) -> Sample:
    avoid: set[str] = set()
    head, indent, names = enclosing(rng, avoid, module_level=0.3, body=(0, 2))
    pad = " " * indent
    short = pick(rng, ("x", "item", "k", "a", "s", "e", "node", "pair", "kv"))
    params = [short if rng.random() < 0.5 else var_name(rng, avoid)]
    params += [var_name(rng, avoid) for _ in range(rng.choice((0, 0, 0, 1, 2)))]
    params = list(dict.fromkeys(params))
    if rng.random() < 0.2:
        params[-1] += f"={pick(rng, ('None', '0', '1', 'False'))}"
    signature = ", ".join(params)
    if family == 0:
        src = pick(rng, names) if names else var_name(rng, avoid)
        start = pick(
            rng,
            (
                f"{var_name(rng, avoid)} = lambda",
                f"{var_name(rng, avoid)} = sorted({src}, key=lambda",
                f"{src}.sort(key=lambda",
                f"{var_name(rng, avoid)} = list(map(lambda",
                f"{var_name(rng, avoid)} = max({src}, key=lambda",
            ),
        )
        closing = ")" * start.count("(")
        first = params[0].split("=")[0]
        body = pick(rng, (first, f"{first}[1]", f"-{first}", quoted(rng)))
        tail = f", {src}" if "map(" in start else ""
        return head + f"{pad}{start} {signature}", f": {body}{tail}{closing}\n"
    name = func_name(rng, avoid)
    body = maybe(rng, 0.3, lambda: docstring(rng, indent + 4)) + simple_statement(rng, indent + 4, avoid)
    return head + f"{pad}def {name}({signature}", "):\n" + body


_KWARGS = ("kwargs", "kwargs", "kwargs", "kw", "kwds", "options", "extra")
_ARGS = ("args", "args", "args", "a", "pos", "params")


@register_task(
    description="`)` after `**kwargs`, the final argument of a call, versus `,` after `*args`",
    completions=(")", ","),
)
def final_kwarg(rng: random.Random, family: int) -> Sample:
    # Forwarding wrappers: the enclosing signature takes *args and **kwargs, and so does the call.
    args, kwargs = pick(rng, _ARGS), pick(rng, _KWARGS)
    avoid: set[str] = {args, kwargs}
    text = preamble(rng, avoid)
    before = "".join(f"{n}, " for n in [var_name(rng, avoid) for _ in range(rng.choice((0, 0, 1)))])
    if rng.random() < 0.5:
        outer = func_name(rng, avoid)
        callee = pick(rng, ("func", "func", "fn", "f", "method", "callback"))
        text += f"def {outer}({callee}):\n"
        text += maybe(rng, 0.4, lambda: f"    @functools.wraps({callee})\n")
        text += f"    def {pick(rng, ('wrapper', 'inner', '_wrapped', 'wrapped'))}({before}*{args}, **{kwargs}):\n"
        indent = 8
    else:
        text += f"class {class_name(rng)}({class_name(rng)}):\n" + maybe(rng, 0.3, lambda: docstring(rng, 4))
        method = pick(rng, ("__init__", func_name(rng, avoid)))
        text += f"    def {method}(self, {before}*{args}, **{kwargs}):\n"
        indent = 8
        callee = pick(rng, (f"super().{method}", f"self._{method.strip('_')}", f"self.{pick(rng, NOUNS)}.{method}"))
    pad = " " * indent
    text += statements(rng, indent, avoid, 0, 2, [args, kwargs])
    start = pick(rng, ("return ", "", f"{var_name(rng, avoid)} = ", "result = "))
    keyword = maybe(rng, 0.25, lambda: f"{pick(rng, NOUNS)}={pick(rng, ('None', 'True', '0'))}, ")
    call = f"{pad}{start}{callee}({before}*{args}, {keyword}"
    if family == 0:
        return text + call + f"**{kwargs}", ")\n"
    # Without the keyword argument in front, so that the prompt ends with the *args of the call.
    call = f"{pad}{start}{callee}({before}*{args}"
    return text + call, f", {keyword}**{kwargs})\n"


# Context managers that are also used as plain calls in `if`/`for`/`while` headers.
_CALLS = (
    ("open", "path"), ("os.scandir", "root"), ("self._lock_for", "key"), ("tarfile.open", "name"),
    ("zipfile.ZipFile", "filename"), ("self.connect", "address"), ("socket.create_connection", "address"),
    ("self._session", "url"), ("io.open", "path"), ("self.transaction", "conn"), ("contextlib.closing", "conn"),
)


@register_task(
    description="`)` closing the call of a `with ... as` header versus `):` closing the call of an if/for/while header",
    completions=(")", "):"),
)
def with_as(rng: random.Random, family: int) -> Sample:
    avoid: set[str] = set()
    func, arg = _CALLS[rng.randrange(len(_CALLS))]
    avoid.add(arg)
    head, indent, names = enclosing(rng, avoid, params=[arg], method=0.6 if func.startswith("self.") else 0.3)
    if func.startswith("self.") and "self" not in names:
        func = func.replace("self.", "", 1)  # a module-level helper of the same name
    pad = " " * indent
    # The last argument is always a name: `'r')` or `1)` would merge the ) with what comes before it.
    extra = maybe(rng, 0.3, lambda: f", {pick(rng, ('mode', 'timeout', 'flags', 'encoding'))}={var_name(rng, avoid)}")
    call = f"{func}({arg}{extra}"
    body = statements(rng, indent + 4, avoid, 0, 1, names) + simple_statement(rng, indent + 4, avoid)
    if family == 0:
        target = pick(rng, ("f", "fp", "fh", "conn", "sock", "tx", "archive", var_name(rng, avoid)))
        return head + f"{pad}with {call}", f") as {target}:\n{body}"
    header = pick(rng, ("if ", "if not ", f"for {var_name(rng, avoid)} in ", "while ", "elif "))
    if header == "elif ":
        head += f"{pad}if {arg} is None:\n" + simple_statement(rng, indent + 4, avoid)
    return head + f"{pad}{header}{call}", f"):\n{body}"


_READ_VERBS = ("read", "load", "parse", "get", "fetch", "import", "scan")
_WRITE_VERBS = ("write", "save", "dump", "store", "export", "emit", "persist")


@register_task(
    description="the mode of open() in a function that reads (r) versus one that writes (w)",
    completions=("r", "w"),
)
def with_open(rng: random.Random, family: int) -> Sample:
    avoid: set[str] = set()
    text = preamble(rng, avoid)
    noun = pick(rng, NOUNS)
    verb = pick(rng, _READ_VERBS if family == 0 else _WRITE_VERBS)
    path = pick(rng, ("path", "filename", "fname", "dest", "target", "outfile" if family else "infile"))
    payload = pick(rng, ("data", "text", "content", "lines", noun if noun != path else "value"))
    params = [path] if family == 0 else [path, payload]
    in_class = rng.random() < 0.3
    pad = "    " if in_class else ""
    if in_class:
        text += f"class {class_name(rng)}:\n"
        params = ["self", *params]
    text += f"{pad}def {verb}_{noun}({', '.join(params)}):\n"
    if rng.random() < 0.5:
        doc = f"{verb.capitalize()} the {noun} {'from' if family == 0 else 'to'} {path}."
        text += f'{pad}    """{doc}"""\n'
    text += statements(rng, len(pad) + 4, avoid, 0, 2, params)
    q = pick(rng, ("'", '"'))
    opener = pick(rng, (f"open({path}, {q}", f"open({path}, mode={q}", f"io.open({path}, {q}"))
    # Plain 'r' / 'w' only: larger vocabularies have tokens like `rb` and `wt`, whose first token is not `r`.
    letter = ("r", "w")[family]
    use = f"{pad}        return f.read()\n" if family == 0 else f"{pad}        f.write({params[-1]})\n"
    encoding = f", encoding={q}{pick(rng, ('utf-8', 'ascii', 'latin-1'))}{q}" if rng.random() < 0.3 else ""
    return text + f"{pad}    with {opener}", f"{letter}{q}{encoding}) as f:\n{use}"
