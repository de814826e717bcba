"""Named fault points, so tests can kill or break a run at an exact place.

``EMBED_JOB_FAULT="after_sink_write@3:kill"`` SIGKILLs the process the 3rd time the run
passes ``after_sink_write``; ``point~0.2:oom`` fires at random with probability 0.2 (seeded by
``EMBED_JOB_FAULT_SEED``); ``:raise`` raises RuntimeError, ``:oom`` raises MemoryError,
``:transient`` raises TransientError, ``:enospc`` raises a disk-full OSError. Several specs
may be given, comma-separated. A ``worker_*`` point fires in the first embedding worker's
first process only (``--workers``/``--gpus``), so a test kills exactly one worker.
``EMBED_JOB_MEMORY_LIMIT_TOKENS=N`` makes every embedding call of more than N padded tokens
fail with MemoryError, like a device that is too small.
Unset (the normal case) a fault point costs one dict lookup.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from collections import Counter

from pipeline.errors import TransientError

POINTS = ("after_read", "after_chunk", "after_plan_window", "during_embed", "after_embed",
          "before_sink_write", "after_sink_write", "after_ack", "during_checkpoint_write",
          "before_publish", "after_commit", "worker_after_embed")

_hits: Counter[str] = Counter()
_lock = threading.Lock()


_rng = random.Random(int(os.environ.get("EMBED_JOB_FAULT_SEED", "0")))


def _specs() -> dict[str, tuple[str, float, str]]:
    """point -> ('@', nth hit, action) or ('~', probability, action)."""
    raw = os.environ.get("EMBED_JOB_FAULT", "")
    out = {}
    for spec in filter(None, (s.strip() for s in raw.split(","))):
        where, _, action = spec.partition(":")
        mode = "~" if "~" in where else "@"
        point, _, n = where.partition(mode)
        if point not in POINTS:
            raise ValueError(f"EMBED_JOB_FAULT: unknown fault point {point!r}; one of {POINTS}")
        out[point] = (mode, float(n or 1), action or "kill")
    return out


def fault_point(name: str) -> None:
    if "EMBED_JOB_FAULT" not in os.environ:
        return
    spec = _specs().get(name)
    if spec is None:
        return
    mode, n, action = spec
    with _lock:
        _hits[name] += 1
        hit = _rng.random() < n if mode == "~" else _hits[name] == int(n)
    if not hit:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "oom":
        raise MemoryError(f"injected out-of-memory at {name}")
    if action == "transient":
        raise TransientError(f"injected transient failure at {name}")
    if action == "enospc":
        raise OSError(28, "No space left on device (injected)")
    raise RuntimeError(f"injected fault at {name}")


def memory_limit() -> int | None:
    raw = os.environ.get("EMBED_JOB_MEMORY_LIMIT_TOKENS")
    return int(raw) if raw else None
