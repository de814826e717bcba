"""``embed-job search JOB "query"``: the query embedded exactly as queries must be for this
model (the job's tokenizer and special tokens, ``model.query_instruction`` around it, which
documents never get), then the nearest chunks of what readers see now."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from pipeline.commands.live import fail, live_index
from pipeline.errors import JobError
from pipeline.job.config import Job
from pipeline.job.load import load_job
from pipeline.run.retrieval import embed_queries
from pipeline.sinks.base import Hit

SNIPPET = 240  # characters of a chunk's text shown (the whole text with --json)


def search_live(job: Job, vectors: np.ndarray, k: int) -> list[list[Hit]]:
    """The ``k`` nearest chunks of each vector in the live generation."""
    with live_index(job) as index:
        return index.search(vectors, k)


@click.command()
@click.argument("job_file", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("query")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True,
              help="How many chunks to show.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per hit.")
def search(job_file: Path, query: str, k: int, as_json: bool) -> None:
    """Search what readers see now with QUERY, embedded as this job's queries must be.

    Prints the nearest chunks, best first: score (the destination's metric; higher is
    nearer), document id, chunk index, and the start of the chunk's text.
    """
    try:
        job = load_job(job_file)
        hits = search_live(job, embed_queries(job, [query]), k)[0]
    except JobError as e:
        fail(e)
    for rank, hit in enumerate(hits, 1):
        if as_json:
            click.echo(json.dumps({"rank": rank, "doc_id": hit.doc_id,
                                   "chunk_index": hit.chunk_index,
                                   "score": round(hit.score, 6), "text": hit.text},
                                  ensure_ascii=False))
            continue
        text = " ".join((hit.text or "").split())
        snippet = text[:SNIPPET] + ("..." if len(text) > SNIPPET else "")
        click.echo(f"{rank:>3}  {hit.score:.4f}  {hit.doc_id}#{hit.chunk_index}"
                   + (f"  {snippet}" if snippet else ""))
    if not hits:
        click.echo("no chunks: the live generation is empty", err=True)
