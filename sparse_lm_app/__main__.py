import sys

from sparse_lm_app.cli import main

sys.exit(main())
