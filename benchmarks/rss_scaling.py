"""Peak memory of an ingest as the corpus grows: a corpus and the same corpus repeated N times.

The copies get unique ids (``<id>~copy<k>``), written copy after copy, so the run reads, chunks, stages
and commits N times the rows. Their texts repeat, so only the first copy goes through the model and
the rest come from the embedding cache: the model is loaded and used in both runs, and what grows
with the corpus (reading, staging, committing, the driver's bookkeeping) is what is measured.

    python benchmarks/rss_scaling.py ../shared/datasets/scifact/corpus.jsonl --copies 10 --workdir /tmp/rss
    # reuse a 1x run's report (e.g. the (c) run of `embedpipe bench`):
    python benchmarks/rss_scaling.py CORPUS --copies 10 --workdir /tmp/rss --one-x-report DB/_runs/RUN.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", type=Path, help="a JSONL corpus")
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--one-x-report", type=Path, default=None, help="a 1x run report to compare with")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from pipelines import ingest
    from pipelines.config import load_config

    cfg = load_config(args.config, **{"ray.progress_bars": False})
    args.workdir.mkdir(parents=True, exist_ok=True)
    big = args.workdir / f"corpus-x{args.copies}.jsonl"
    with big.open("w") as out:
        for copy in range(args.copies):
            with args.corpus.open() as f:
                for line in f:
                    record = json.loads(line)
                    key = "_id" if "_id" in record else "id"
                    if copy:
                        record[key] = f"{record[key]}~copy{copy}"
                    out.write(json.dumps(record) + "\n")

    def run(source: Path, name: str) -> dict:
        db = args.workdir / name
        shutil.rmtree(db, ignore_errors=True)
        return ingest.build(source=source, db=db, cfg=cfg)

    one = json.loads(args.one_x_report.read_text()) if args.one_x_report else run(args.corpus, "db-x1")
    many = run(big, f"db-x{args.copies}")
    figures = {
        "copies": args.copies,
        "x1": {
            "docs": one["docs"]["ingested"],
            "peak_rss_mb": one["resources"]["peak_rss_mb"],
            "wall_s": one["wall_s"],
            "run_id": one["run_id"],
        },
        f"x{args.copies}": {
            "docs": many["docs"]["ingested"],
            "peak_rss_mb": many["resources"]["peak_rss_mb"],
            "wall_s": many["wall_s"],
            "embeddings": many["embeddings"],
            "run_id": many["run_id"],
        },
        "rss_ratio": round(many["resources"]["peak_rss_mb"] / one["resources"]["peak_rss_mb"], 3),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
