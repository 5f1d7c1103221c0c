import sys

from rlp_operator.main import main

sys.exit(main(sys.argv[1:]))
