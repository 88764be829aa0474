"""``python -m neurotap.serve [MODEL] [options]``: ``neurotap serve``, for launchers that start modules
(``torchrun ... -m neurotap.serve MODEL``, which makes each process one rank of a sharded server)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
