"""``python -m neurotap.distributed MODEL [serve options]``: one rank of a sharded server (under torchrun)."""

import os
import sys

from .launch import rank_main

code = rank_main()
# the rank's work is done and its output flushed; tearing torch.distributed down would only wait for the
# rendezvous store several seconds, and the launcher (or a supervisor) waits for this exit
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
