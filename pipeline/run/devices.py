"""Which workers a run embeds with: the run's own process (the default), N worker processes
on the CPU (``--workers N``), or worker processes on GPUs of this host (``--gpus
all|N|0,2,5``, with ``--workers K`` per GPU, which then split its memory).

Everything here is decided before a model loads, so a wrong count is one line, not a crash
half-way through start-up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from pipeline.errors import ConfigError

GpuSpec = int | Literal["all"] | list[int]

# Kept off in every worker: NVLink multicast can take a shared host's GPUs out of service.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class Slot:
    """One worker: its GPU (as this process sees it; None on the CPU) and how many workers
    share that device."""

    index: int
    gpu: int | None
    share: int

    @property
    def label(self) -> str:
        if self.gpu is None:
            return f"cpu{self.index}"
        return f"gpu{self.gpu}" if self.share == 1 else f"gpu{self.gpu}.{self.index % self.share}"

    def env(self, threads: int | None) -> dict[str, str]:
        """The variables a worker sets before anything imports torch."""
        env = dict(NO_MULTICAST)
        if self.gpu is not None:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            names = [v.strip() for v in visible.split(",")] if visible else None
            env["CUDA_VISIBLE_DEVICES"] = names[self.gpu] if names else str(self.gpu)
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        return env


def parse_gpus(text: str) -> GpuSpec:
    """``--gpus``: 'all', a count, or a comma-separated list of GPU indexes."""
    text = text.strip()
    if text == "all":
        return "all"
    try:
        if "," in text:
            return [int(p) for p in text.split(",") if p.strip()]
        return int(text)
    except ValueError:
        raise ConfigError(f"--gpus {text}: expected 'all', a count (2) or GPU indexes (0,2,5)"
                          ) from None


def gpu_count() -> tuple[int, str]:
    """GPUs this process may use, and their name, without starting CUDA here."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return n, (torch.cuda.get_device_name(0) if n else "")


def worker_slots(gpus: GpuSpec | None, workers: int, device: str,
                 found: tuple[int, str] | None = None, key: str = "--gpus") -> list[Slot]:
    """The run's workers; one slot with ``gpu=None`` and share 1 means "in this process".

    ``found``: (GPU count, name), read from torch when not given. ``key``: where ``gpus``
    came from, for the message (the option, or ``model.gpus`` in the job file).
    """
    if workers < 1:
        raise ConfigError(f"--workers {workers}: at least 1")
    if gpus is None:
        return [Slot(i, None, workers) for i in range(workers)]
    n, name = found if found is not None else gpu_count()
    what = f"this machine has {n} GPU(s)" + (f" ({name})" if name else "")
    if n == 0:
        raise ConfigError(f"{key} {_spec(gpus)}: torch sees no CUDA GPU here; on the CPU, "
                          f"use --workers N")
    if device not in ("auto", "cuda"):
        raise ConfigError(f"{key} with model.device {device}: leave model.device at auto (or "
                          f"cuda); {key} picks the GPUs")
    if gpus == "all":
        chosen = list(range(n))
    elif isinstance(gpus, int):
        if gpus < 1 or gpus > n:
            raise ConfigError(f"{key} {gpus}: {what}")
        chosen = list(range(gpus))
    else:
        bad = [g for g in gpus if not 0 <= g < n]
        if bad or not gpus or len(set(gpus)) != len(gpus):
            raise ConfigError(f"{key} {_spec(gpus)}: " + (
                f"GPU {bad[0]} is not there; {what}" if bad else
                "each GPU once (use --workers K for K workers on each)"))
        chosen = list(gpus)
    return [Slot(i, g, workers) for i, g in enumerate(g for g in chosen for _ in range(workers))]


def planner_processes(setting: int | Literal["auto"], slots: list[Slot], device: str,
                      found: int | None = None) -> int:
    """Tokenizing processes: the job's number, or for ``auto`` two per GPU (one process plans
    ~380K tokens/s with the Qwen3 vocabulary, one GPU embeds up to ~110K in FP8) within the cores,
    leaving two for the run's own threads. A run embedding on a GPU in its own process
    (``device`` not cpu, a GPU present) counts as one GPU: its planning must not share the
    process's interpreter lock with the thread that launches the GPU's work (measured in
    docs/benchmarks.md). CPU workers need the cores themselves: one, in the run's process.
    ``found``: the GPU count, read from torch when not given."""
    if setting != "auto":
        return max(1, setting)
    gpus = sum(1 for s in slots if s.gpu is not None)
    if in_process(slots) and device != "cpu" and (found if found is not None
                                                   else gpu_count()[0]) > 0:
        gpus = 1
    return max(1, min(2 * gpus, (os.cpu_count() or 1) - 2))


def in_process(slots: list[Slot]) -> bool:
    """One worker on the job's own device: embed in the run's process, as always."""
    return len(slots) == 1 and slots[0].gpu is None


def _spec(gpus: GpuSpec) -> str:
    return ",".join(map(str, gpus)) if isinstance(gpus, list) else str(gpus)
