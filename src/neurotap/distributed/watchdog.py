"""A process beside each rank that kills it once it stops beating.

A rank that hangs or is stopped (``SIGSTOP``) cannot end itself, and it
ignores the ``SIGTERM`` of its launcher. Its launcher may never even try:
torch's elastic agent that hosts the rendezvous store does not notice that the
other nodes have gone, and waits on its live but silent worker for ever. So
every rank starts this watchdog, which reads the rank's heartbeat on its
standard input, one byte a beat, and kills the rank once none has come for as
long as the other ranks wait before taking it for hung; the launcher then sees
its worker fail and ends as after a crash.

Run as a script (``python -I -S watchdog.py PID SECONDS``), so that it imports
nothing but the standard library; it ends with its rank (its input closes).
"""

import os
import select
import signal
import sys


def watch(pid: int, silent_after: float) -> None:
    # the rank's launcher may signal the rank's whole process group when it stops the server: the watchdog
    # stays until the rank itself has gone
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        ready, _, _ = select.select([0], [], [], silent_after)
        if not ready:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        if not os.read(0, 4096):
            return  # the rank has exited


if __name__ == "__main__":
    watch(int(sys.argv[1]), float(sys.argv[2]))
