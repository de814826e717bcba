"""``embed-job eval JOB``: retrieval quality of the live index per Matryoshka dimension, and
the approximate index against exact search (the figures: ``pipeline.run.retrieval``)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pipeline.commands.live import fail, live_index
from pipeline.errors import ConfigError, JobError
from pipeline.job.load import load_job
from pipeline.run.retrieval import EvalResult, evaluate, load_queries, sample_queries


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
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also draw quality against dimension into this PNG (needs matplotlib).")
def eval_command(job_file: Path, queries_path: Path | None, sample: int, dims: str, k: int,
                 as_json: bool, plot_path: Path | None) -> None:
    """Measure retrieval quality of the built index: recall@k, MRR@10, nDCG@10 per
    Matryoshka dimension, and the approximate index against exact search."""
    try:
        if plot_path is not None:
            _can_plot(plot_path)  # before the work, not after it
        job = load_job(job_file)
        wanted = [None if d.strip() == "full" else _dimension(d) for d in dims.split(",")]
        queries = load_queries(queries_path) if queries_path else sample_queries(job, sample)
        with live_index(job) as index:
            result = evaluate(job, index, queries, wanted, k,
                              "labelled" if queries_path else "self-retrieval")
        if plot_path is not None:
            plot(result, plot_path)
    except JobError as e:
        fail(e)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.table())
    if plot_path is not None and not as_json:
        click.echo(f"  plot: {plot_path}")


def _dimension(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"--dims {text!r}: a number or 'full'") from None
    if value < 1:
        raise ConfigError(f"--dims {value}: at least 1")
    return value


def _can_plot(path: Path) -> None:
    try:
        import matplotlib  # noqa: F401 - optional: only --plot needs it
    except ImportError:
        raise ConfigError("--plot needs matplotlib, which is not installed: pip install "
                          "matplotlib") from None
    if not path.parent.is_dir():
        raise ConfigError(f"--plot {path}: {path.parent} is not a directory")


def plot(result: EvalResult, path: Path) -> None:
    """recall@k, MRR@10 and nDCG@10 against the dimension, one line each, as a PNG: where
    cutting the vectors starts to cost."""
    from matplotlib.figure import Figure  # no pyplot: no display, no global state

    dims = sorted(result.by_dimension, key=int)
    x = [int(d) for d in dims]
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = figure.subplots()
    for key, label in (("recall", f"recall@{result.k}"), ("mrr", "MRR@10"), ("ndcg", "nDCG@10")):
        ax.plot(x, [result.by_dimension[d][key] for d in dims], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(d) for d in x])
    ax.minorticks_off()
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("Matryoshka dimension (stored vectors cut and re-normalized)")
    ax.set_ylabel("score")
    ax.set_title(f"{result.job}: {result.queries} {result.kind} queries")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    try:
        figure.savefig(path, format="png", dpi=120)
    except OSError as e:
        raise ConfigError(f"--plot {path}: {e.strerror or e}") from None
