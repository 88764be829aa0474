"""Serving a model over HTTP: ``neurotap serve`` and ``nt.connect(url)``.

``wire`` defines the wire format, ``executor`` runs batches of requests on the
model, sharing passes as ``batching`` describes, ``worker`` is the thread that
feeds it, ``server`` is the HTTP layer and ``client`` the remote model.
"""

from .client import RemoteError, RemoteModel, connect, launch_and_connect
from .wire import PROTOCOL, CrossEntropy, LogitDiff, Output

__all__ = [
    "PROTOCOL",
    "CrossEntropy",
    "LogitDiff",
    "Output",
    "RemoteError",
    "RemoteModel",
    "connect",
    "launch_and_connect",
]
