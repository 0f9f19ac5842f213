"""Built-in tasks. Every module here is imported by the registry on first use; to add a task, add a file."""
