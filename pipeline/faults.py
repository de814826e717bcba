"""Named fault points, so tests can kill or break a run at an exact place.

``EMBED_JOB_FAULT="after_sink_write@3:kill"`` SIGKILLs the process the 3rd time the run
passes ``after_sink_write``; ``:raise`` raises RuntimeError, ``:oom`` raises MemoryError,
``:transient`` raises TransientError. Several specs may be given, comma-separated.
Unset (the normal case) a fault point costs one dict lookup.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter

from pipeline.errors import TransientError

POINTS = ("after_read", "after_chunk", "after_plan_window", "after_embed", "after_sink_write",
          "after_ack", "during_checkpoint_write")

_hits: Counter[str] = Counter()
_lock = threading.Lock()


def _specs() -> dict[str, tuple[int, str]]:
    raw = os.environ.get("EMBED_JOB_FAULT", "")
    out = {}
    for spec in filter(None, (s.strip() for s in raw.split(","))):
        point_n, _, action = spec.partition(":")
        point, _, n = point_n.partition("@")
        if point not in POINTS:
            raise ValueError(f"EMBED_JOB_FAULT: unknown fault point {point!r}; one of {POINTS}")
        out[point] = (int(n or 1), action or "kill")
    return out


def fault_point(name: str) -> None:
    if "EMBED_JOB_FAULT" not in os.environ:
        return
    spec = _specs().get(name)
    if spec is None:
        return
    with _lock:
        _hits[name] += 1
        hit = _hits[name] == spec[0]
    if not hit:
        return
    action = spec[1]
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "oom":
        raise MemoryError(f"injected out-of-memory at {name}")
    if action == "transient":
        raise TransientError(f"injected transient failure at {name}")
    raise RuntimeError(f"injected fault at {name}")
