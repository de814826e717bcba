"""``embed-job eval JOB``: retrieval quality of the live index per Matryoshka dimension, and
the approximate index against exact search (the figures: ``pipeline.run.retrieval``)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pipeline.commands.live import fail, live_index
from pipeline.errors import ConfigError, JobError
from pipeline.job.load import load_job
from pipeline.run.retrieval import evaluate, load_queries, sample_queries


@click.command(name="eval")
@click.argument("job_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--queries", "queries_path", type=click.Path(path_type=Path),
              help="JSONL of {query, relevant: [doc ids]}, or a BEIR directory; without it, a "
                   "self-retrieval sample of the source.")
@click.option("--sample", type=click.IntRange(min=1), default=200, show_default=True,
              help="Documents sampled for self-retrieval.")
@click.option("--dims", default="full", show_default=True,
              help="Dimensions to measure, comma-separated (64,128,full): the stored vectors cut "
                   "and re-normalized.")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_command(job_file: Path, queries_path: Path | None, sample: int, dims: str, k: int,
                 as_json: bool) -> None:
    """Measure retrieval quality of the built index: recall@k, MRR@10, nDCG@10 per
    Matryoshka dimension, and the approximate index against exact search."""
    try:
        job = load_job(job_file)
        wanted = [None if d.strip() == "full" else _dimension(d) for d in dims.split(",")]
        queries = load_queries(queries_path) if queries_path else sample_queries(job, sample)
        with live_index(job) as index:
            result = evaluate(job, index, queries, wanted, k,
                              "labelled" if queries_path else "self-retrieval")
    except JobError as e:
        fail(e)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.table())


def _dimension(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"--dims {text!r}: a number or 'full'") from None
    if value < 1:
        raise ConfigError(f"--dims {value}: at least 1")
    return value
