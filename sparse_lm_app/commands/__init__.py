"""One module per group of subcommands: each has ``add_<name>_arguments(parser)`` and ``run_<name>(args)``.

The modules import only argparse at the top, so that ``sparse-lm --help`` stays fast; the libraries
are imported inside the ``run_*`` functions.
"""
