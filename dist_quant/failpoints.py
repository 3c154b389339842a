"""Named points at which a test can kill this process, to prove that ``--resume`` continues from anywhere.

``DIST_QUANT_KILL_AT=NAME[:N]`` sends SIGKILL to the process the N-th time (default: the first) it reaches the point
NAME; without the variable every point is a no-op. SIGKILL is what a lost node or an OOM killer does: no cleanup,
no ``finally``, files left as they are.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "DIST_QUANT_KILL_AT"
_reached: Counter = Counter()


def reach(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    _reached[name] += 1
    if _reached[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
