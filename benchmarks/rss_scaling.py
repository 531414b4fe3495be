"""Peak memory of an ingest as the corpus grows: a corpus and N distinct copies of it.

The copies get unique ids (``<id>~copy<k>``) and distinct texts: copy k has a word of its own
(``c<k>``) after every ``MARK_EVERY`` words of the title and text and at their end, so every chunk
differs from every other copy's and each goes through the model (none comes from the embedding cache);
a copy has 1/16 more words than the original. The run reads, chunks, embeds, stages and commits N times
the rows, so what grows with the corpus, embedding work included, is what is measured
(``--repeat-texts``: the texts as they are, only the first copy embedded, as before).

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

MARK_EVERY = 16  # words between two copy marks


def distinct(text: str, copy: int) -> str:
    """``text`` with the copy's own word after every MARK_EVERY words and at its end (copy 0: as is)."""
    if not copy or not text:
        return text
    out = []
    words = text.split(" ")
    for i, word in enumerate(words, 1):
        out.append(word)
        if i % MARK_EVERY == 0 or i == len(words):
            out.append(f"c{copy}")
    return " ".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", type=Path, help="a JSONL corpus")
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--one-x-report", type=Path, default=None, help="a 1x run report to compare with")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--repeat-texts", action="store_true", help="copies keep the texts (embedding cache)")
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
                        if not args.repeat_texts:
                            for field in ("title", "text"):
                                if isinstance(record.get(field), str):
                                    record[field] = distinct(record[field], copy)
                    out.write(json.dumps(record) + "\n")

    def run(source: Path, name: str) -> dict:
        db = args.workdir / name
        shutil.rmtree(db, ignore_errors=True)
        return ingest.build(source=source, db=db, cfg=cfg)

    one = json.loads(args.one_x_report.read_text()) if args.one_x_report else run(args.corpus, "db-x1")
    many = run(big, f"db-x{args.copies}")
    figures = {
        "copies": args.copies,
        "texts": "repeated" if args.repeat_texts else "distinct",
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
