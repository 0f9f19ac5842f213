"""Built-in tasks: importing this package registers every task below (`tasks` imports it).

To add a task, add a module here and import it in this list.
"""

from tasks.library import brackets, control_flow, definitions, strings, variables  # noqa: F401

__all__ = ["brackets", "control_flow", "definitions", "strings", "variables"]
