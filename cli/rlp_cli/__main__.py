import sys

from rlp_cli.main import main

sys.exit(main())
