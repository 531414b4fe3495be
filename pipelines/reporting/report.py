"""Run metrics: resources sampled while the pipeline runs, and the JSON report it leaves behind."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import psutil

logger = logging.getLogger(__name__)


class ResourceSampler:
    """Samples this process tree's memory and the machine's CPU use on a background thread.

    With an embedded Ray, the raylet and every Ray worker are descendants of the driver, so the tree
    covers the whole local pipeline. Shared pages (the object store) count once per process that
    maps them, so ``peak_rss_mb`` is an upper bound.
    """

    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self.peak_rss = 0
        self.cpu_samples: list[float] = []
        self.timeline: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="resource-sampler", daemon=True)
        self._started = 0.0

    def __enter__(self) -> ResourceSampler:
        self._started = time.time()
        psutil.cpu_percent(interval=None)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()  # a run shorter than one interval still gets a figure

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        root = psutil.Process()
        rss = 0
        for proc in [root, *root.children(recursive=True)]:
            try:
                rss += proc.memory_info().rss
            except psutil.Error:
                continue
        cpu = psutil.cpu_percent(interval=None)
        self.peak_rss = max(self.peak_rss, rss)
        self.cpu_samples.append(cpu)
        self.timeline.append(
            {"t": round(time.time() - self._started, 2), "rss_mb": round(rss / 2**20, 1), "cpu_pct": cpu}
        )

    def summary(self) -> dict[str, Any]:
        cpu = sum(self.cpu_samples) / len(self.cpu_samples) if self.cpu_samples else 0.0
        return {
            "peak_rss_mb": round(self.peak_rss / 2**20, 1),
            "cpu_util_pct": round(cpu, 1),
            "cpu_count": psutil.cpu_count(),
        }


def stage_times(stats: Any) -> dict[str, dict[str, float]]:
    """Per-operator times from Ray Data's stats summary (Dataset.get_stats_summary())."""
    stages: dict[str, dict[str, float]] = {}
    node = stats
    seen: list[Any] = []
    stack = [node]
    while stack:  # the summary is a tree of datasets; operators of parents ran first
        node = stack.pop()
        seen.append(node)
        stack.extend(node.parents or [])
    for summary in reversed(seen):
        for op in summary.operators_stats:
            stages[op.operator_name] = {
                "wall_s": round(float(op.time_total_s or 0.0), 3),
                "task_wall_s_sum": round(_stat_sum(op.wall_time), 3),
                "task_cpu_s_sum": round(_stat_sum(op.cpu_time), 3),
                "rows_out": int(_stat_sum(op.output_num_rows)),
            }
    cpu = sum(stage["task_cpu_s_sum"] for stage in stages.values())
    for stage in stages.values():  # each stage's share of the CPU time the pipeline's tasks used
        stage["cpu_share"] = round(stage["task_cpu_s_sum"] / cpu, 3) if cpu > 0 else 0.0
    return stages


def _stat_sum(stat: Any) -> float:
    if stat is None:
        return 0.0
    value = stat.get("sum", 0.0) if isinstance(stat, dict) else getattr(stat, "sum", 0.0)
    return float(value or 0.0)


def build_report(
    *,
    run_id: str,
    source: str,
    db: str,
    model: str,
    wall_s: float,
    counts: dict[str, Any],
    resources: dict[str, Any],
    stages: dict[str, Any],
    shards: dict[str, int],
    config: dict[str, Any],
    hourly_usd: float,
    timeline: list[dict[str, Any]],
) -> dict[str, Any]:
    """Assemble the run report; ``docs.seen == ingested + unchanged + failed`` by construction."""
    docs = {
        "seen": counts["ingested"] + counts["unchanged"] + len(counts["failed"]),
        "ingested": counts["ingested"],
        "unchanged": counts["unchanged"],
        "failed": len(counts["failed"]),
    }
    wall = max(wall_s, 1e-9)
    cost = hourly_usd * wall_s / 3600
    return {
        "run_id": run_id,
        "started_at": counts["started_at"],
        "source": source,
        "db": db,
        "model": model,
        "wall_s": round(wall_s, 3),
        "docs": docs,
        "chunks": {"written": counts["chunks"]},
        "tokens_embedded": counts["tokens"],
        "throughput": {
            "docs_per_min": round(docs["seen"] / wall * 60, 1),
            "chunks_per_s": round(counts["chunks"] / wall, 2),
            "embeddings_per_s": round(counts["chunks"] / wall, 2),
            "tokens_per_s": round(counts["tokens"] / wall, 1),
        },
        "resources": resources,
        "cost": {
            "hourly_usd": hourly_usd,
            "total_usd": round(cost, 6),
            "per_doc_usd": round(cost / docs["seen"], 9) if docs["seen"] else 0.0,
        },
        "stages": stages,
        "shards": shards,
        "failures": [
            {"doc_id": doc_id, "source": src, "reason": reason} for doc_id, src, reason in counts["failed"]
        ],
        "progress": timeline,
        "config": config,
    }


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, ensure_ascii=False)


def write_report(report: dict[str, Any], *paths: Path) -> None:
    text = dumps(report)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)


def _stood_in(embeddings: dict[str, Any]) -> str:
    """Where logical GPUs (EMBEDPIPE_LOGICAL_GPUS, tests) stood in: the plan says cuda, the CPU computed."""
    devices = (embeddings.get("actor_devices") or {}).values()
    logical = [d for d in devices if d.get("logical_gpu")]
    if not logical:
        return ""
    ran = ", ".join(sorted({f"{d.get('dtype', '?')} on {d.get('device', '?')}" for d in logical}))
    return f"; {len(logical)} actor(s) held a logical GPU and computed {ran}"


def summary_table(report: dict[str, Any]):
    """A short rich table of a run's headline numbers."""
    from rich.table import Table

    docs, tp = report["docs"], report["throughput"]
    table = Table(title=f"ingest run {report['run_id']}", show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        (
            "docs",
            f"{docs['seen']} seen: {docs['ingested']} ingested, {docs['unchanged']} unchanged, "
            f"{docs['failed']} failed",
        ),
        ("chunks written", str(report["chunks"]["written"])),
        *([("pruned", f"{docs['pruned']} documents no longer in the source")] if "pruned" in docs else []),
        *(
            [("embeddings", "none: every document unchanged, found without Ray or the model (quick check)")]
            if report.get("backend", {}).get("quick_check")
            else []
        ),
        *(
            [
                (
                    "embeddings",
                    f"{report['embeddings']['computed']} computed, {report['embeddings']['cache_hits']} "
                    f"from the cache ({report.get('backend', {}).get('dtype', '?')} on "
                    f"{report.get('backend', {}).get('engine', 'torch')}/"
                    f"{report.get('backend', {}).get('device', '?')}, "
                    f"{report['embeddings']['oom_splits']} OOM splits"
                    + _stood_in(report["embeddings"])
                    + (
                        f", model busy {report['embeddings']['busy_fraction']:.0%} of the actors' time"
                        if report["embeddings"].get("busy_fraction") is not None
                        else ""
                    )
                    + ")",
                )
            ]
            if "embeddings" in report and not report.get("backend", {}).get("quick_check")
            else []
        ),
        ("tokens embedded", str(report["tokens_embedded"])),
        ("wall time", f"{report['wall_s']:.1f} s"),
        (
            "throughput",
            f"{tp['docs_per_min']:.0f} docs/min, {tp['chunks_per_s']:.1f} chunks/s, "
            f"{tp['tokens_per_s']:.0f} tokens/s",
        ),
        ("peak RSS", f"{report['resources']['peak_rss_mb']:.0f} MB"),
        ("CPU use", f"{report['resources']['cpu_util_pct']:.0f}%"),
        ("shards", ", ".join(f"{k}={v}" for k, v in report["shards"].items())),
    ]
    for failure in report["failures"][:5]:
        rows.append(("failed", f"{failure['doc_id']}: {failure['reason']}"))
    if len(report["failures"]) > 5:
        rows.append(("", f"... and {len(report['failures']) - 5} more in the report"))
    for key, value in rows:
        table.add_row(key, value)
    return table
