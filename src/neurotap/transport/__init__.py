"""Serving a model over HTTP: ``neurotap serve`` and ``nt.connect(url)``.

``wire`` defines the wire format, ``limits`` the server's settings and what one
request may cost, ``executor`` runs batches of requests on the model, sharing
passes as ``batching`` describes, ``worker`` is the thread that feeds it,
``server`` is the HTTP layer and ``client`` the remote model.
"""

from .client import ClientTimeoutError, RemoteError, RemoteModel, ServerGoneError, connect, launch_and_connect, stop
from .wire import PROTOCOL, CrossEntropy, LogitDiff, Output

__all__ = [
    "PROTOCOL",
    "ClientTimeoutError",
    "CrossEntropy",
    "LogitDiff",
    "Output",
    "RemoteError",
    "RemoteModel",
    "ServerGoneError",
    "connect",
    "launch_and_connect",
    "stop",
]
