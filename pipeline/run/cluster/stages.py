"""What ``runner: ray`` puts in place of the local stages: where the documents are read,
where they are chunked, what embeds them; everything else of the run is the local one's."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError
from pipeline.job.config import Job
from pipeline.plan.build import RejectedRows
from pipeline.plan.parallel import PoolFactory
from pipeline.records import Document
from pipeline.run.cluster.session import Cluster, ray_cluster
from pipeline.run.report import RunReport

if TYPE_CHECKING:
    from pipeline.run.cluster.actors import ActorPool


class OnCluster:
    """The cluster a ``runner: ray`` run joins, and its stages sized to what it found."""

    def __init__(self, job: Job, address: str | None) -> None:
        self.job, self.address = job, address
        self.cluster: Cluster | None = None

    @contextmanager
    def joined(self, report: RunReport) -> Iterator[Cluster]:
        with ray_cluster(self.job.ray, self.address) as cluster:
            self.cluster = cluster
            report.cluster = cluster.to_dict()
            yield cluster

    def _found(self) -> Cluster:
        assert self.cluster is not None, "joined() first"
        return self.cluster

    def actors(self) -> tuple[int, float, float]:
        """(actors, CPUs each, GPUs each), checked against the cluster: a request it cannot
        meet would wait for resources for ever."""
        cluster, config, model = self._found(), self.job.ray, self.job.model
        gpus = 1.0 if cluster.gpus and model.device in ("auto", "cuda") else 0.0
        if model.device == "cuda" and not cluster.gpus:
            raise ConfigError(f"{self.job.source_file}: model.device cuda: the Ray cluster at "
                              f"{cluster.address} has no GPU")
        n = config.actors if config.actors != "auto" else (int(cluster.gpus) if gpus else 1)
        what = f"the Ray cluster at {cluster.address} has {cluster.cpus:g} CPUs, " \
               f"{cluster.gpus:g} GPUs"
        if gpus and n > cluster.gpus:
            raise ConfigError(f"{self.job.source_file}: ray.actors {n}: one GPU each; {what}")
        if n * config.actor_cpus > cluster.cpus:
            raise ConfigError(f"{self.job.source_file}: ray.actors {n} x ray.actor_cpus "
                              f"{config.actor_cpus:g}: {what}; lower ray.actor_cpus")
        return n, config.actor_cpus, gpus

    def documents(self, rejected: RejectedRows) -> Iterator[Document]:
        from pipeline.run.cluster.reading import cluster_documents

        return cluster_documents(self.job.source, self.job.resolve, rejected)

    def chunk_pool(self) -> PoolFactory:
        """Chunking tasks in flight: the CPUs the actors leave (one at least)."""
        from pipeline.run.cluster.reading import ClusterChunkPool

        n, cpus, _ = self.actors()
        spare = max(1, int(self._found().cpus - n * cpus))
        return lambda chunker, fingerprint: ClusterChunkPool(chunker, fingerprint, spare)

    def engine(self, make: Callable[[], object], budget: int | None, ceiling: int) -> ActorPool:
        from pipeline.run.cluster.actors import ActorPool

        n, cpus, gpus = self.actors()
        room = self.job.model.tokens_in_flight(self.job.batching.token_budget) \
            + self.job.batching.token_budget
        return ActorPool(n, make, budget, ceiling, room, cpus, gpus)
