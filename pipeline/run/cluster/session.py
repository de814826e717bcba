"""The Ray cluster a run works on: one at an address (``--ray-address``, ``ray.address``,
``RAY_ADDRESS``), or a local one started for the run and shut down after it."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import ConfigError, JobError, one_line
from pipeline.job.sections import RayConfig

INSTALL = 'pip install "embed-job[ray]"'
LOCAL_START_TRIES = 3  # a local node that misses Ray's start-up deadline gets this many tries


def import_ray() -> Any:
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - the runner reads through Ray Data
    except ImportError as e:
        raise ConfigError(f"runner ray needs Ray Data ({one_line(e)}): {INSTALL}") from None
    return ray


@dataclass
class Cluster:
    """What the run found: where, and the resources it reported when the run started."""

    address: str  # "local" for a cluster of the run's own
    nodes: int
    cpus: float
    gpus: float
    start_s: float  # joining (or starting) it
    resources: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"runner": "ray", "address": self.address, "nodes": self.nodes,
                "cpus": self.cpus, "gpus": self.gpus, "start_s": round(self.start_s, 3),
                "memory_gb": round(self.resources.get("memory", 0) / 2**30, 1),
                "object_store_gb": round(self.resources.get("object_store_memory", 0) / 2**30, 1)}


@contextmanager
def ray_cluster(config: RayConfig, address: str | None = None) -> Iterator[Cluster]:
    """Join (or start) the cluster; leave it as found. A caller that already joined one
    (``ray.init`` in a notebook, the tests) is used as it is and not shut down."""
    ray = import_ray()
    address = address or config.address or os.environ.get("RAY_ADDRESS") or None
    started = not ray.is_initialized()
    t0 = time.monotonic()
    if started:
        quiet: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                 "logging_level": logging.WARNING, "configure_logging": True}
        if address is not None:
            _init(ray, address, address=address, **quiet)
        else:
            # a private cluster of this run, on this host: nothing else may join it
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            _init(ray, "a new local cluster", tries=LOCAL_START_TRIES,
                  num_cpus=config.local_cpus or os.cpu_count() or 1,
                  object_store_memory=None if config.object_store_mb is None
                  else config.object_store_mb * 2**20, **quiet)
    try:
        from ray.data import DataContext

        data = DataContext.get_current()
        data.execution_options.preserve_order = True  # the plan reads the source in order
        data.enable_progress_bars = False  # the run shows its own progress
        for name in ("ray", "ray.data"):  # its INFO lines would bury the run's own
            logging.getLogger(name).setLevel(logging.ERROR)
        found = ray.cluster_resources()
        yield Cluster(address or "local", sum(1 for n in ray.nodes() if n.get("Alive")),
                      float(found.get("CPU", 0)), float(found.get("GPU", 0)),
                      time.monotonic() - t0, dict(found))
    finally:
        if started:
            ray.shutdown()


def _init(ray: Any, where: str, tries: int = 1, **kwargs: Any) -> None:
    """``ray.init``; a local node that did not come up within Ray's fixed deadlines (a loaded
    host) is started again, up to ``tries`` times; what still fails is one line."""
    for attempt in range(1, tries + 1):
        try:
            ray.init(**kwargs)
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception on a slow start
            if ray.is_initialized():
                ray.shutdown()
            # Ray's fixed start-up deadlines: the node's 30 s, the GCS's port file
            slow = "timed out" in str(e).lower()
            if not (slow or isinstance(e, (ConnectionError, RuntimeError, ValueError))):
                raise
            if slow and attempt < tries:
                logging.getLogger(__name__).warning(
                    "ray: %s did not start in time; starting it again", where)
                continue
            raise JobError(f"ray: cannot join the cluster at {where}: {one_line(e)}") from None


def cause(error: BaseException) -> BaseException:
    """The product's own error inside what Ray raised (a task's or an actor's), so the user
    reads its one line; else the error itself."""
    seen = error
    for _ in range(8):
        inner = getattr(seen, "cause", None) or seen.__cause__
        if inner is None or inner is seen:
            break
        if isinstance(inner, (JobError, MemoryError)):
            return inner
        seen = inner
    return error
