"""``python -m fastattn [--json]``: print which backends can run here, and why not (``fastattn.info()``)."""

import sys

from ._info import main

if __name__ == "__main__":
    sys.exit(main())
