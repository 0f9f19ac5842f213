"""Building blocks for writing varied, realistic Python in task generators.

Generators draw names, string contents, comments and whole surrounding
statements from here, so that two prompts of a task differ in more than the
cue: a model must not pass a task by memorising one template. Everything
takes a `random.Random` and is deterministic given its state. The code
written is meant to compile: `prompt + continuation` of every built-in task
is valid Python (a test checks it).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

__all__ = [
    "NEWLINE_BODY",
    "NOUNS",
    "VERBS",
    "pick",
    "maybe",
    "var_name",
    "func_name",
    "class_name",
    "words",
    "phrase",
    "quoted",
    "comment",
    "docstring",
    "statement",
    "statements",
    "preamble",
    "function_head",
    "method_head",
    "enclosing",
    "open_block",
    "simple_statement",
    "Names",
]

NOUNS = (
    "item", "value", "key", "name", "path", "line", "node", "child", "entry", "record", "token", "word",
    "total", "index", "result", "data", "buf", "text", "chunk", "block", "field", "header", "config",
    "options", "parent", "source", "target", "module", "obj", "attr", "prefix", "suffix", "pattern",
    "size", "offset", "length", "width", "height", "limit", "timeout", "port", "host", "user", "request",
    "response", "message", "event", "handler", "callback", "queue", "stack", "cache", "state", "status",
    "level", "depth", "score", "weight", "row", "column", "cell", "frame", "packet", "stream", "filename",
    "dirname", "url", "query", "payload", "context", "session", "task", "job", "worker", "lock", "timer",
    "tree", "graph", "edge", "vertex", "label", "tag", "code", "error", "reason", "mode", "flags", "kind",
    "version", "encoding", "address", "sock", "conn", "cursor", "table", "schema", "rule", "match",
    "group", "member", "owner", "price", "amount", "count", "delay", "start", "stop", "step", "base",
)
VERBS = (
    "get", "set", "load", "save", "parse", "build", "make", "read", "write", "update", "check", "find",
    "compute", "process", "handle", "render", "format", "collect", "merge", "split", "apply", "validate",
    "normalize", "convert", "encode", "decode", "fetch", "send", "emit", "register", "resolve", "create",
    "reset", "flush", "visit", "walk", "scan", "filter", "sort", "prepare", "extract", "lookup", "expand",
)
ADJECTIVES = (
    "new", "old", "raw", "last", "first", "next", "prev", "max", "min", "default", "current", "local",
    "remote", "base", "full", "short", "extra", "pending", "active", "cached", "total", "inner", "outer",
)
# Standard-library modules and a name each offers, for imports and calls that look like real code.
MODULES = (
    ("os", "path"), ("sys", "argv"), ("re", "compile"), ("json", "dumps"), ("logging", "getLogger"),
    ("collections", "OrderedDict"), ("itertools", "chain"), ("functools", "partial"), ("time", "monotonic"),
    ("math", "sqrt"), ("string", "ascii_letters"), ("textwrap", "dedent"), ("typing", "Optional"),
    ("pathlib", "Path"), ("struct", "pack"), ("io", "StringIO"), ("copy", "deepcopy"), ("heapq", "heappush"),
    ("operator", "itemgetter"), ("warnings", "warn"), ("contextlib", "contextmanager"), ("shutil", "copyfile"),
    ("socket", "create_connection"), ("threading", "Lock"), ("subprocess", "run"), ("tempfile", "mkdtemp"),
)
COMMENTS = (
    "Fast path: nothing to do.", "Keep the original order.", "TODO: handle the {noun} case.",
    "See the note in {verb}_{noun}.", "This is a hot loop; keep it simple.", "XXX: remove once {noun} is fixed.",
    "Normalize before comparing.", "The {noun} may be None here.", "Called once per {noun}.",
    "Avoid a second lookup.", "Copy so the caller's {noun} is not changed.", "{verb} the {noun} lazily.",
    "Backwards compatibility with older {noun}s.", "Never reached in practice.", "Same as above, for {noun}s.",
)
DOC_TEMPLATES = (
    "Return the {noun} for the given {noun2}.", "{Verb} the {noun} and return it.", "Helper for {verb}_{noun}.",
    "{Verb} all {noun}s in place.", "Return True if the {noun} is valid.", "Compute the {noun} of a {noun2}.",
    "{Verb} the {noun} from {noun2}.", "Internal: {verb} one {noun}.",
)
# Words for string contents: letters only, so a string's last character never merges with its closing quote.
TEXT_WORDS = (
    "invalid", "value", "for", "the", "missing", "file", "not", "found", "expected", "got", "unknown",
    "option", "error", "while", "reading", "cannot", "open", "no", "such", "key", "bad", "request",
    "done", "skipping", "empty", "input", "warning", "line", "too", "long", "in", "header", "user",
    "name", "timeout", "after", "retry", "connection", "closed", "ok", "ready", "hello", "world",
    "utf", "ascii", "data", "default", "config", "path", "mode", "read", "write", "only", "all",
)

Names = set[str]

# Newline then the 4-space indentation of a function body, as one token: byte-level BPE pre-tokenizes
# "\n    x" as "\n   " + " x". Tasks whose answer is "end the line" keep the next line at indent 4 so
# that this token is the same in every example (tokenizers without it fall back to a bare "\n").
NEWLINE_BODY = "\n   "


def pick(rng: random.Random, options: Sequence[str]) -> str:
    return options[rng.randrange(len(options))]


def maybe(rng: random.Random, p: float, text: str | Callable[[], str]) -> str:
    """`text` with probability `p`, else "" (a callable is only called when used)."""
    if rng.random() >= p:
        return ""
    return text() if callable(text) else text


def _fresh(rng: random.Random, make: Callable[[], str], avoid: Names) -> str:
    """A name from `make` that is not in `avoid`; it is added to `avoid` so later picks differ."""
    for _ in range(100):
        name = make()
        if name not in avoid:
            avoid.add(name)
            return name
    raise RuntimeError(f"could not find a fresh name outside {len(avoid)} used ones")


def var_name(rng: random.Random, avoid: Names | None = None) -> str:
    """A local variable name: ``value``, ``next_node``, ``line_count``, ``_cache``, ``paths``..."""

    def make() -> str:
        roll = rng.random()
        noun = pick(rng, NOUNS)
        if roll < 0.45:
            return noun
        if roll < 0.65:
            return f"{pick(rng, ADJECTIVES)}_{noun}"
        if roll < 0.8:
            return f"{noun}_{pick(rng, NOUNS)}"
        if roll < 0.9:
            return f"{noun}s"
        return f"_{noun}"

    return _fresh(rng, make, avoid if avoid is not None else set())


def func_name(rng: random.Random, avoid: Names | None = None) -> str:
    """A function name: ``parse_header``, ``_load``, ``get_next_node``..."""

    def make() -> str:
        roll = rng.random()
        verb, noun = pick(rng, VERBS), pick(rng, NOUNS)
        if roll < 0.6:
            return f"{verb}_{noun}"
        if roll < 0.75:
            return f"_{verb}_{noun}"
        if roll < 0.85:
            return verb
        return f"{verb}_{pick(rng, ADJECTIVES)}_{noun}"

    return _fresh(rng, make, avoid if avoid is not None else set())


def class_name(rng: random.Random) -> str:
    """A CamelCase class name: ``NodeCache``, ``Parser``, ``RemoteSession``..."""
    parts = [pick(rng, NOUNS)] if rng.random() < 0.4 else [pick(rng, ADJECTIVES), pick(rng, NOUNS)]
    suffix = pick(rng, ("", "", "Handler", "Manager", "Error", "Parser", "Reader", "Builder", "Base"))
    return "".join(p.capitalize() for p in parts) + suffix


def words(rng: random.Random, low: int = 1, high: int = 5) -> str:
    """Space-separated lowercase words (letters only)."""
    return " ".join(pick(rng, TEXT_WORDS) for _ in range(rng.randint(low, high)))


def phrase(rng: random.Random, low: int = 1, high: int = 5) -> str:
    """String contents: words, sometimes capitalised; starts and ends with a letter."""
    text = words(rng, low, high)
    return text.capitalize() if rng.random() < 0.3 else text


def quoted(rng: random.Random, text: str | None = None) -> str:
    """A string literal with a random quote style (contents are letters and spaces)."""
    q = "'" if rng.random() < 0.5 else '"'
    return f"{q}{phrase(rng) if text is None else text}{q}"


def comment(rng: random.Random, indent: int) -> str:
    text = pick(rng, COMMENTS).format(noun=pick(rng, NOUNS), verb=pick(rng, VERBS))
    return " " * indent + "# " + text + "\n"


def docstring(rng: random.Random, indent: int) -> str:
    """A one-line docstring, or now and then a summary plus a short paragraph."""
    verb = pick(rng, VERBS)
    text = pick(rng, DOC_TEMPLATES).format(
        noun=pick(rng, NOUNS), noun2=pick(rng, NOUNS), verb=verb, Verb=verb.capitalize()
    )
    pad = " " * indent
    if rng.random() < 0.75:
        return f'{pad}"""{text}"""\n'
    more = phrase(rng, 4, 9).capitalize()
    return f'{pad}"""{text}\n\n{pad}{more}.\n{pad}"""\n'


def statement(rng: random.Random, indent: int, avoid: Names, inputs: Sequence[str] = ()) -> str:
    """One or two lines of ordinary code at `indent`, binding only fresh names (added to `avoid`).

    `inputs` are names already bound that the statement may read.
    """
    pad = " " * indent
    # Without inputs, read module-level names (`self` only where the caller passes it in `inputs`).
    src = pick(rng, inputs) if inputs and rng.random() < 0.7 else pick(rng, ("options", "config", "settings"))
    kind = rng.randrange(10)
    if kind == 0:
        return comment(rng, indent)
    if kind == 1 and src in inputs and src != "self":
        return f"{pad}if {src} is None:\n{pad}    {src} = {pick(rng, ('0', 'None', '[]', quoted(rng)))}\n"
    if kind == 2:
        logger = pick(rng, ("logger", "log", "_logger", "LOG"))
        q = pick(rng, ("'", '"'))
        return f"{pad}{logger}.{pick(rng, ('debug', 'info', 'warning'))}({q}{phrase(rng)} %s{q}, {src})\n"
    new = var_name(rng, avoid)
    if kind == 3:
        return f"{pad}{new} = {src}.get({quoted(rng, pick(rng, NOUNS))})\n"
    if kind == 4:
        return f"{pad}{new} = {func_name(rng)}({src})\n"
    if kind == 5:
        literal = rng.choice(("0", "1", "None", "False", "True", "[]", "{}", "()", str(rng.randint(2, 4096))))
        return f"{pad}{new} = {literal}\n"
    if kind == 6:
        return f"{pad}{new} = len({src})\n"
    if kind == 7:
        return f"{pad}{new} = {quoted(rng)}\n"
    if kind == 8:
        return f"{pad}{new} = {src}.{pick(rng, VERBS)}_{pick(rng, NOUNS)}()\n"
    each = pick(rng, ("x", "n", "k", "item", "entry", "p"))
    return f"{pad}{new} = [{each}.{pick(rng, NOUNS)} for {each} in {src}]\n"


def statements(rng: random.Random, indent: int, avoid: Names, low: int, high: int, inputs: Sequence[str] = ()) -> str:
    """`low`..`high` ordinary statements (see `statement`)."""
    return "".join(statement(rng, indent, avoid, inputs) for _ in range(rng.randint(low, high)))


def preamble(rng: random.Random, avoid: Names | None = None) -> str:
    """What sits above the code of interest in a module: a docstring, imports, a constant, a helper def.

    Empty now and then, so that some prompts start right at the code of interest.
    """
    avoid = avoid if avoid is not None else set()
    parts: list[str] = []
    if rng.random() < 0.25:
        parts.append(f'"""{phrase(rng, 2, 6).capitalize()}."""\n\n')
    if rng.random() < 0.7:
        chosen = rng.sample(MODULES, rng.randint(1, 3))
        lines = [
            f"import {mod}\n" if rng.random() < 0.7 else f"from {mod} import {name}\n" for mod, name in chosen
        ]
        parts.append("".join(sorted(lines)) + "\n")
    if rng.random() < 0.3:
        const = var_name(rng, avoid).upper().lstrip("_")
        parts.append(f"{const} = {rng.choice((str(rng.randint(1, 999)), quoted(rng), 'None', '()'))}\n\n")
    if rng.random() < 0.35:
        name = func_name(rng, avoid)
        arg = var_name(rng, avoid)
        body = statements(rng, 4, avoid, 0, 2, [arg])
        ret = pick(rng, (arg, "None", "True", f"len({arg})", f"str({arg})"))
        parts.append(f"def {name}({arg}):\n{maybe(rng, 0.5, lambda: docstring(rng, 4))}{body}    return {ret}\n\n\n")
    return "".join(parts)


def function_head(rng: random.Random, avoid: Names, params: Sequence[str] = ()) -> tuple[str, list[str]]:
    """A module-level ``def`` line with an optional docstring: (text, parameter names).

    Extra parameters are made up so that signatures vary; `params` are always included.
    """
    extra = [var_name(rng, avoid) for _ in range(rng.randint(0, 2))]
    names = list(params) + extra
    rng.shuffle(names)
    # Parameters with a default must come last; only made-up ones get one.
    defaulted = [n for n in names if n in extra and rng.random() < 0.3]
    signature = [n for n in names if n not in defaulted] + [f"{n}=None" for n in defaulted]
    text = f"def {func_name(rng, avoid)}({', '.join(signature)}):\n" + maybe(rng, 0.4, lambda: docstring(rng, 4))
    return text, names


def method_head(
    rng: random.Random, avoid: Names, params: Sequence[str] = (), first: str = "self"
) -> tuple[str, list[str]]:
    """A ``class`` line (sometimes with an earlier method) and a method ``def``: (text, parameter names)."""
    cls = class_name(rng)
    base = pick(rng, ("", "", "(object)", "(Exception)", "(dict)", f"({class_name(rng)})"))
    text = f"class {cls}{base}:\n" + maybe(rng, 0.4, lambda: docstring(rng, 4))
    if rng.random() < 0.4:
        attr = var_name(rng, avoid)
        text += f"\n    def __init__(self, {attr}):\n        self.{attr} = {attr}\n\n"
    elif rng.random() < 0.5:
        text += f"    {var_name(rng, avoid)} = {rng.choice(('None', '0', '()', quoted(rng)))}\n\n"
    names = list(params) + [var_name(rng, avoid) for _ in range(rng.randint(0, 1))]
    rng.shuffle(names)
    signature = ", ".join([first, *names])
    text += f"    def {func_name(rng, avoid)}({signature}):\n" + maybe(rng, 0.3, lambda: docstring(rng, 8))
    return text, names


def enclosing(
    rng: random.Random,
    avoid: Names,
    params: Sequence[str] = (),
    *,
    module_level: float = 0.0,
    method: float = 0.35,
    body: tuple[int, int] = (0, 3),
) -> tuple[str, int, list[str]]:
    """The code above a task's decision lines: (text, indent of the next line, names in scope).

    A module preamble, then a function (or, with probability `method`, a method in a
    class; with `module_level`, no def at all) with `params` among its parameters and a
    few ordinary statements in its body. In a method the names in scope include ``self``.
    """
    text = preamble(rng, avoid)
    roll = rng.random()
    if roll < module_level:
        names = list(params)
        indent = 0
        readable = names
    elif roll < module_level + method:
        head, names = method_head(rng, avoid, params)
        text += head
        indent = 8
        readable = ["self", *names]
    else:
        head, names = function_head(rng, avoid, params)
        text += head
        indent = 4
        readable = names
    text += statements(rng, indent, avoid, body[0], body[1], readable)
    return text, indent, readable


def open_block(rng: random.Random, indent: int, avoid: Names, names: Sequence[str]) -> str:
    """A compound-statement header (``for``/``if``/``with``) at `indent`; its body goes at `indent` + 4."""
    pad = " " * indent
    src = pick(rng, names) if names else pick(rng, ("items", "options", "args"))
    kind = rng.randrange(5)
    if kind == 0:
        return f"{pad}for {var_name(rng, avoid)} in {src}:\n"
    if kind == 1:
        return f"{pad}if {src}:\n"
    if kind == 2:
        return f"{pad}if {src} is not None:\n"
    if kind == 3:
        lock = "self._lock" if "self" in names else pick(rng, ("lock", "_lock", "LOCK"))
        return f"{pad}with {lock}:\n"
    return f"{pad}if not {src}.{pick(rng, ('closed', 'done', 'empty', 'ready'))}:\n"


def simple_statement(rng: random.Random, indent: int, avoid: Names) -> str:
    """One line that is a real statement (never a comment), e.g. to be the only line of a block."""
    pad = " " * indent
    kind = rng.randrange(4)
    if kind == 0:
        return f"{pad}{var_name(rng, avoid)} = {func_name(rng)}()\n"
    if kind == 1:
        return f"{pad}pass\n"
    if kind == 2:
        return f"{pad}{func_name(rng)}({pick(rng, NOUNS)})\n"
    return f"{pad}raise {pick(rng, ('ValueError', 'KeyError', 'TypeError', 'RuntimeError'))}({quoted(rng)})\n"
