import sys

from sparse_lm_app.main_job.pipeline import main

sys.exit(main())
