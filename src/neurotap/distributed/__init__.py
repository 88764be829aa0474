"""Sharded serving: one model split over several processes, served as one.

``stages`` splits a decoder into contiguous ranges of layers and builds each
rank's module tree with only its own weights; ``pipe`` moves hidden states rank
to rank and keeps the ranks in step when something fails; ``executor`` is the
``Executor`` rank 0's server talks to and the loop the other ranks follow;
``launch`` starts the ranks with torch's elastic launcher.
"""

from .executor import ShardedExecutor
from .pipe import RankFailedError

__all__ = ["RankFailedError", "ShardedExecutor"]
