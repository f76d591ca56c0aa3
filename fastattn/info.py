"""``python -m fastattn.info [--json]``: print which backends can run here, and why not."""

import sys

from ._info import main

if __name__ == "__main__":
    sys.exit(main())
