"""The app on top of the sparse-lm libraries: the ``sparse-lm`` CLI and the main job.

Nothing imports this package; it imports `sparse_lm`, `tasks`, `pruning` and
`bridges` (see the import contract in pyproject.toml).
"""
