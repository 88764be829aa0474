"""``python -m neurotap.collect [options]``: ``neurotap collect``, for launchers that start modules
(``torchrun ... -m neurotap.collect ...``, which makes each process one rank of a parallel collection)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["collect", *sys.argv[1:]]))
