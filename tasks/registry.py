"""The task registry: built-in tasks (`tasks.library`), user tasks, and JSONL files by path.

A generator function decorated with `register_task` becomes a `Task` under
its name. The built-in tasks register when the `tasks` package is imported
(``tasks/__init__`` imports `tasks.library`, which imports each of its modules).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tasks.jsonl import load_jsonl_task
from tasks.task import Generator, Task

__all__ = ["register_task", "add_task", "list_tasks", "get_task", "UnknownTaskError"]

# -- registry ------------------------------------------------------------------------------------

_REGISTRY: dict[str, Task] = {}


def add_task(task: Task) -> Task:
    """Register a ready-made `Task` (e.g. from `load_jsonl_task`); names must be unique."""
    if task.name in _REGISTRY:
        raise ValueError(f"a task named {task.name!r} is already registered (from {_REGISTRY[task.name].source})")
    _REGISTRY[task.name] = task
    return task


def register_task(
    *,
    description: str,
    completions: tuple[str, str],
    alternatives: tuple[tuple[str, str], ...] = (),
    boundary_shifts: tuple[int, ...] = (),
    name: str | None = None,
) -> Callable[[Generator], Generator]:
    """Decorator: register a generator function as a task named after the function (or `name`).

    The generator is called as ``gen(rng, family)`` and returns ``(prompt, continuation)``
    where the continuation is the code that follows the prompt and starts with
    ``completions[family]`` (or returns the prompt alone). `alternatives` are further
    completion pairs tried, in order, for tokenizers that split the written text
    differently from the nominal pair; `boundary_shifts` are further prompt ends to try
    (`Task.boundary_shifts`).
    """

    def decorate(generator: Generator) -> Generator:
        add_task(
            Task(
                name=name or generator.__name__,
                description=description,
                completion_options=(tuple(completions), *map(tuple, alternatives)),  # type: ignore[arg-type]
                generator=generator,
                source=generator.__module__,
                boundary_shifts=tuple(boundary_shifts),
            )
        )
        return generator

    return decorate


def list_tasks() -> list[str]:
    """Names of all registered tasks (built-in and user-registered), sorted."""
    return sorted(_REGISTRY)


def get_task(name: str) -> Task:
    """The task called `name`; a path ending in ``.jsonl`` loads that file as a task."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.endswith(".jsonl") and Path(name).is_file():
        return load_jsonl_task(name)
    raise UnknownTaskError(
        f"unknown task {name!r}; known tasks: {', '.join(sorted(_REGISTRY))} (or give a path to a .jsonl file)"
    )


class UnknownTaskError(KeyError):
    """`get_task` was given a name that is not registered."""

    def __str__(self) -> str:
        # KeyError would print the message with quotes around it.
        return str(self.args[0])
