"""``python -m neurotap.distributed MODEL [serve options]``: one rank of a sharded server (under torchrun)."""

import sys

from .launch import rank_main

sys.exit(rank_main())
