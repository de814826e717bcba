"""What a run did: counters, the one-screen summary, and the JSON report for cron."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.atomic import atomic_write_bytes
from pipeline.secrets import redact

Status = Literal["running", "completed", "partial", "interrupted", "failed"]  # partial: --limit


@dataclass
class RunReport:
    job: str
    status: Status = "running"
    outcome: Literal["", "synced", "nothing_to_do"] = ""  # once completed
    mode: str = ""
    fingerprint: str = ""
    target: str = ""
    sink: str = ""
    docs_added: int = 0
    docs_updated: int = 0
    docs_unchanged: int = 0
    docs_deleted: int = 0
    vectors_in_target: int = 0
    # the plan as a whole (all windows planned so far, this run and earlier ones)
    docs: int = 0
    rows_rejected: int = 0  # source rows that did not become documents (dead letters)
    chunks: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    batches: int = 0
    plan_complete: bool = False
    # this run
    batches_embedded: int = 0
    batches_skipped: int = 0
    chunks_embedded: int = 0
    tokens_embedded: int = 0
    vectors_written: int = 0
    vectors_total: int = 0
    dead_letters: int = 0
    dead_letters_added: int = 0
    dead_letter_file: str = ""
    model_load_s: float = 0.0
    wall_s: float = 0.0
    tokens_per_s: float = 0.0  # tokens embedded / time after the model was loaded
    # where the embedder stood idle: no planned batch ready (reading/tokenizing is behind), or
    # the writer's queue full (the sink is behind); both near 0 when the device sets the pace
    waited_for_plan_s: float = 0.0
    waited_for_sink_s: float = 0.0
    # one entry per embedding worker process (--gpus / --workers): pace, waits, deaths
    workers: list[dict[str, Any]] = field(default_factory=list)
    # runner ray: where the run ran (address, nodes, CPUs, GPUs, memory)
    cluster: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific figures
    # what hide() was given: never written (to_dict drops it)
    _secrets: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)

    def hide(self, secrets: Iterable[str]) -> None:
        """Keep ``secrets`` out of every text the report writes: an error quoted from the
        destination may carry one (URI passwords are masked in any case)."""
        self._secrets = tuple(secrets)

    def _redacted(self, value: Any) -> Any:
        if isinstance(value, str):
            return redact(value, self._secrets)
        if isinstance(value, list):
            return [self._redacted(v) for v in value]
        if isinstance(value, dict):
            return {k: self._redacted(v) for k, v in value.items()}
        return value

    def warn(self, message: str) -> None:
        """Something the user must hear of even with --quiet (one line, printed by the CLI)."""
        self.warnings.append(message)

    @property
    def padding_waste(self) -> float:
        """Share of computed (padded) tokens that were padding."""
        return 1 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0

    def to_dict(self) -> dict:
        fields = asdict(self)
        del fields["_secrets"]
        return {**self._redacted(fields), "padding_waste": round(self.padding_waste, 4)}

    def write_json(self, path: Path) -> None:
        atomic_write_bytes(path, json.dumps(self.to_dict(), indent=2).encode())

    def write_prometheus(self, path: Path) -> None:
        """Counters in the node-exporter textfile format, replaced atomically."""
        label = f'job="{self.job}"'
        lines = []
        cluster = self.cluster
        for name, value, help_ in [
            ("docs_added", self.docs_added, "documents embedded for the first time"),
            ("docs_updated", self.docs_updated, "changed documents re-embedded"),
            ("docs_unchanged", self.docs_unchanged, "documents skipped as unchanged"),
            ("docs_deleted", self.docs_deleted, "documents removed from the index"),
            ("chunks_embedded", self.chunks_embedded, "chunks embedded by this run"),
            ("tokens_embedded", self.tokens_embedded, "tokens embedded by this run"),
            ("vectors_written", self.vectors_written, "vectors acknowledged by the sink"),
            ("dead_letters", self.dead_letters, "rows and chunks in the dead-letter file"),
            ("wall_seconds", round(self.wall_s, 3), "run time"),
            ("model_load_seconds", round(self.model_load_s, 3), "model/engine start-up"),
            ("tokens_per_second", round(self.tokens_per_s, 1), "embedding rate after start-up"),
            ("waited_for_plan_seconds", round(self.waited_for_plan_s, 3),
             "embedder idle waiting for planned batches"),
            ("waited_for_sink_seconds", round(self.waited_for_sink_s, 3),
             "embedder idle waiting for the sink"),
            ("success", int(self.status == "completed"), "1 if the run completed"),
            ("last_run_timestamp_seconds", round(time.time(), 3),
             "when this file was written (a stale file shows the job stopped running)"),
        ] + ([
            ("cluster_nodes", cluster["nodes"], "Ray nodes alive when the run started"),
            ("cluster_cpus", cluster["cpus"], "the Ray cluster's CPUs"),
            ("cluster_gpus", cluster["gpus"], "the Ray cluster's GPUs"),
            ("cluster_start_seconds", cluster["start_s"], "time to join (or start) the cluster"),
        ] if cluster else []):
            lines += [f"# HELP embed_job_{name} {help_}", f"# TYPE embed_job_{name} gauge",
                      f"embed_job_{name}{{{label}}} {value}"]
        for name, key, help_ in [
            ("worker_tokens_per_second", "tokens_per_s", "one embedding worker's rate"),
            ("worker_waited_for_plan_seconds", "waited_for_plan_s", "worker idle, no batch"),
            ("worker_waited_for_sink_seconds", "waited_for_sink_s", "worker held up by the writer"),
            ("worker_deaths", "deaths", "times the worker process died and was replaced"),
        ] if self.workers else []:
            lines += [f"# HELP embed_job_{name} {help_}", f"# TYPE embed_job_{name} gauge"]
            lines += [f'embed_job_{name}{{{label},worker="{w["worker"]}"}} {w[key]}'
                      for w in self.workers]
        atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())

    def summary(self) -> str:
        rate = f"{self.tokens_per_s:,.0f}"
        lines = [
            f"embed-job {self.job}: {self.status}" + (f" ({self.outcome})" if self.outcome else ""),
            f"  sync          {self.mode}: {self.docs_added:,} added, {self.docs_updated:,} updated, "
            f"{self.docs_unchanged:,} unchanged, {self.docs_deleted:,} deleted",
            f"  documents     {self.docs:,}" + ("" if self.plan_complete else " (plan incomplete)"),
            f"  chunks        {self.chunks:,} in {self.batches:,} batches "
            f"(padding waste {self.padding_waste:.1%})",
            f"  tokens        {self.tokens:,}",
            f"  this run      {self.chunks_embedded:,} chunks, {self.tokens_embedded:,} tokens "
            f"embedded; {self.batches_skipped:,} batches already done",
            f"  vectors       {self.vectors_written:,} written this run; "
            f"{self.vectors_in_target:,} in {self.sink}",
            f"  dead letters  {self.dead_letters:,} ({self.dead_letters_added:,} new)"
            + (f" -> {self.dead_letter_file}" if self.dead_letters else ""),
            f"  time          {self.wall_s:,.1f} s wall, model load {self.model_load_s:,.1f} s, "
            f"{rate} tokens/s",
            f"  waits         {self.waited_for_plan_s:,.1f} s for the plan (reading, chunking), "
            f"{self.waited_for_sink_s:,.1f} s for the sink",
        ]
        if "publish_gate" in self.extra:
            lines.append(_gate_line(self.extra["publish_gate"]))
        if self.cluster:
            c = self.cluster
            lines.append(f"  cluster       ray at {c['address']}: {c['nodes']} node(s), "
                         f"{c['cpus']:g} CPUs, {c['gpus']:g} GPUs, {c['memory_gb']:g} GB; "
                         f"joined in {c['start_s']:,.1f} s")
        for w in self.workers:
            lines.append(f"  {w['worker']:<13} {w['tokens']:,} tokens, {w['tokens_per_s']:,.0f} "
                         f"tokens/s; waited {w['waited_for_plan_s']:,.1f} s for batches, "
                         f"{w['waited_for_sink_s']:,.1f} s for the writer"
                         + (f"; died {w['deaths']}x" if w["deaths"] else ""))
        if self.error:
            lines.append(f"  error         {self.error}")
        return redact("\n".join(lines), self._secrets)


def _gate_line(gate: dict[str, Any]) -> str:
    """The publish gate's figures: recall@10, and on a model change the agreement@10 with the
    generation replaced."""
    recall = next(iter(gate["by_dimension"].values()))["recall"]
    line = f"  gate          recall@10 {recall:.3f} on {gate['queries']} {gate['kind']} queries"
    agreement = gate.get("agreement_at_10")
    if agreement is not None:
        found = ("not measured (no sampled chunk in both)" if agreement["at_10"] is None
                 else f"{agreement['at_10']:.3f} on {agreement['chunks']} chunks")
        line += f"; agreement@10 with {agreement['previous']}: {found}"
    return line
