import sys

from rlp_jobs.cli import main

sys.exit(main())
