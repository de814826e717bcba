"""What a run knows before it does anything: the job, the model, the tokenizer, the
fingerprint; and the decision, made once per run, of where it writes and on what it builds."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from pipeline.chunking import ModelTokenizer
from pipeline.errors import ConfigError
from pipeline.job.config import Job
from pipeline.job.model_info import ModelInfo, read_model_info, resolve_model_dir
from pipeline.plan.store import PlanStore
from pipeline.run.devices import GpuSpec, worker_slots
from pipeline.state.checkpoint import Checkpoint, Mode, RunPlan
from pipeline.state.sync_state import SyncState


@dataclass
class RunOptions:
    restart: bool = False
    limit: int | None = None
    progress: bool = True
    mode: Mode | None = None  # overrides job.sync.mode
    accept_missing_files: bool = False  # source files read before and gone now: delete theirs
    progress_interval_s: float = 30.0  # off a terminal: one progress line this often
    progress_emit: Callable[[str], None] | None = None  # where such a line goes (stderr)
    gpus: GpuSpec | None = None  # overrides model.gpus
    workers: int | None = None  # overrides model.workers
    runner: str | None = None  # overrides job.runner: local or ray
    ray_address: str | None = None  # overrides ray.address


def model_problems(job: Job, info: ModelInfo) -> list[str]:
    """What the job asks of the model that the model cannot do (one line each)."""
    problems = []
    if job.model.dimension is not None and job.model.dimension > info.hidden_size:
        problems.append(f"model.dimension: {job.model.dimension} > model hidden size "
                        f"{info.hidden_size}")
    if job.chunking.max_tokens > info.max_context:
        problems.append(f"chunking.max_tokens: {job.chunking.max_tokens} > model context "
                        f"{info.max_context}")
    if job.batching.token_budget < min(job.chunking.max_tokens, info.max_context):
        problems.append(f"batching.token_budget: {job.batching.token_budget} < "
                        f"chunking.max_tokens {job.chunking.max_tokens}: a full chunk would not "
                        f"fit a batch")
    device = job.model.device_problem()
    if device:
        problems.append(device)
    if job.model.gpus is not None:
        try:
            worker_slots(job.model.gpus, job.model.workers, job.model.device, key="model.gpus")
        except ConfigError as e:
            problems.append(str(e))
    return problems


def load_model_info(job: Job) -> ModelInfo:
    """The job's model, checked against the job; one ConfigError line per problem."""
    try:
        info = read_model_info(resolve_model_dir(job.model.path, job.model.revision, job.base_dir))
    except ConfigError as e:
        raise ConfigError(f"{job.source_file}: {e}") from None
    problems = model_problems(job, info)
    if problems:
        raise ConfigError("\n".join(f"{job.source_file}: {p}" for p in problems))
    return info


def check_sink(job: Job) -> None:
    """The sink's own problems (a token variable unset, a certificate unreadable) as one
    ConfigError, so ``run`` refuses what ``validate`` reports."""
    problems = job.sink.problems(job.resolve)
    if problems:
        raise ConfigError("\n".join(f"{job.source_file}: {p}" for p in problems))


@dataclass
class JobContext:
    """Everything derived from the job file and the model before any work starts."""

    job: Job
    info: ModelInfo
    tokenizer: ModelTokenizer
    fingerprint: str

    @classmethod
    def load(cls, job: Job) -> JobContext:
        info = load_model_info(job)
        check_sink(job)
        tokenizer = ModelTokenizer.from_model_dir(info.path, job.model.pooling_for(info))
        return cls(job, info, tokenizer, job.fingerprint(tokenizer.identity()))

    @property
    def dimension(self) -> int:
        return self.job.model.dimension or self.info.hidden_size

    @property
    def max_context(self) -> int:
        return self.job.model.max_context(self.info)

    @property
    def run_dir(self) -> Path:
        return self.job.state.run_dir

    def discard_run(self) -> None:
        """Remove the unfinished run (ledger and plan)."""
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.__dict__.pop("plan_store", None)

    @cached_property
    def plan_store(self) -> PlanStore:
        """One instance for the run: it caches the plan's manifest, which it alone writes."""
        return PlanStore(self.job.state.plan_dir)

    def decide(self, sync: SyncState, checkpoint: Checkpoint, mode: Mode) -> RunPlan:
        """Where a new run writes and what it builds on, saved in the ledger so a resumed run
        keeps the decision: the published generation itself when the settings are the same
        (updated in place), else the next generation, built beside the live one."""
        published = sync.published()
        same = published is not None and published.fingerprint == self.fingerprint
        generation = published.generation + 1 if published else 1
        job = self.job
        checkpoint.run = RunPlan(
            generation=generation,
            target=job.sink.target_name(job.collection_name, self.fingerprint, generation),
            base=published.target if published is not None and same else None,
            skip_unchanged=same and mode == "incremental",
            mode=mode,
            plan_settings=job.plan_settings())
        checkpoint.save()
        return checkpoint.run

    def settings_changed(self, plan: RunPlan) -> str | None:
        """Why the unfinished plan was made with other source settings (None: the same, or a
        plan of an earlier version, which did not record them)."""
        before, now = plan.plan_settings, self.job.plan_settings()
        if before is None or before == now:
            return None
        keys = [f"source.{k}" for k in {**before["source"], **now["source"]}
                if before["source"].get(k) != now["source"].get(k)]
        keys += ["sink.store_text"] if before["store_text"] != now["store_text"] else []
        return f"source settings changed since it was planned ({', '.join(keys)})"
