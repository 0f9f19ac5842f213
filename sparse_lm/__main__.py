import sys

from sparse_lm.cli import main

sys.exit(main())
