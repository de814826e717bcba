"""Checks that need more than the job file: the model on disk and the source paths.

``validate`` prints every problem; ``run`` refuses to start on the same ones, so a job that
validates is a job that starts.
"""

from __future__ import annotations

import re

from pipeline.config import Job
from pipeline.errors import ConfigError, JobError
from pipeline.models import ModelInfo, read_model_info, resolve_model_dir


def model_problems(job: Job, info: ModelInfo) -> list[str]:
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
    device = device_problem(job.model.device, job.model.backend)
    if device:
        problems.append(device)
    return problems


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def device_problem(device: str, backend: str) -> str | None:
    """An unknown device, or a GPU the machine does not have, said before any model loads."""
    if not _DEVICE.match(device):
        return f"model.device: {device!r} is not one of auto, cpu, cuda, cuda:N"
    if backend == "sglang" and device == "cpu":
        return "model.device: the sglang backend needs a CUDA GPU; use backend: transformers"
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return f"model.device: {device} asked for, but torch sees no CUDA GPU on this machine"
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            return f"model.device: {device}: this machine has {torch.cuda.device_count()} GPU(s)"
    return None


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


def job_problems(job: Job) -> list[str]:
    """Every problem `validate` can find, each one line naming the job file."""
    from pipeline.readers import check_source

    problems = []
    try:
        load_model_info(job)
    except ConfigError as e:
        problems += str(e).splitlines()
    try:
        check_source(job.source, job.resolve)
    except JobError as e:
        problems.append(f"{job.source_file}: {e}")
    return problems
