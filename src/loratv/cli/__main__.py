"""`python -m loratv.cli`: the same entry point as the `loratv` command."""

import sys

from loratv.cli.app import main

if __name__ == "__main__":
    sys.exit(main())
