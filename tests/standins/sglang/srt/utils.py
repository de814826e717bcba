"""Stand-in for ``sglang.srt.utils.kill_process_tree``: records the call, kills nothing.

The real one (``srt/utils/common.py``) SIGKILLs every child of ``parent_pid``; the stand-in
engine spawns no processes, so recording is all a test needs.
"""

from __future__ import annotations

KILL_CALLS: list[tuple[int, bool]] = []


def kill_process_tree(parent_pid: int, include_parent: bool = True, skip_pid: int | None = None,
                      wait_timeout: float | None = None) -> None:
    KILL_CALLS.append((parent_pid, include_parent))
