"""The embedpipe command, through typer's runner, on a real local Ray and the bundled model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.cli import EXIT_SOME_FAILED, app

runner = CliRunner()


def test_ingest_query_eval(ray_local, mini_beir, tmp_path):
    db = tmp_path / "db"
    report_path = tmp_path / "report.json"
    result = runner.invoke(
        app,
        [
            "ingest",
            str(mini_beir / "corpus.jsonl"),
            "--db",
            str(db),
            "--shards",
            "2",
            "--report",
            str(report_path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "ingested" in result.output
    report = json.loads(report_path.read_text())
    assert report["docs"]["failed"] == 0 and len(report["shards"]) == 2

    result = runner.invoke(app, ["query", "vitamin D deficiency", "--db", str(db), "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.output)["results"]
    assert len(hits) == 3
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert set(hits[0]) >= {"chunk_id", "doc_id", "title", "text", "score", "shard"}

    # eval finds the corpus already ingested and only scores it.
    result = runner.invoke(app, ["eval", str(mini_beir), "--db", str(db), "--json"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output.strip().splitlines()[-1])
    assert set(scores) == {"ndcg@10", "recall@100", "mrr@10", "queries"}
    assert scores["queries"] == 20
    assert scores["ndcg@10"] > 0.5  # a small corpus: the judged docs are easy to find

    # Keyword search alone, and one result per document, after `embedpipe index`.
    assert runner.invoke(app, ["index", "--db", str(db)]).exit_code == 0
    args = ["query", "vitamin D deficiency", "--db", str(db), "-k", "4", "--json", "--mode", "text"]
    result = runner.invoke(app, [*args, "--collapse"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.output)["results"]
    assert len({h["doc_id"] for h in hits}) == len(hits) == 4
    assert hits[0]["score"] > 1 and "vitamin" in (hits[0]["title"] + hits[0]["text"]).lower()  # BM25
    for mode in ("text", "hybrid"):
        result = runner.invoke(app, ["eval", str(mini_beir), "--db", str(db), "--json", "--mode", mode])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output.strip().splitlines()[-1])["ndcg@10"] > 0.5


def test_failed_documents_give_their_own_exit_code(ray_local, tmp_path):
    src = tmp_path / "docs"
    src.mkdir()
    (src / "good.txt").write_text("Enzymes speed up reactions.")
    (src / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    result = runner.invoke(app, ["ingest", str(src), "--db", str(tmp_path / "db")])
    assert result.exit_code == EXIT_SOME_FAILED, result.output
    assert "bad.txt" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ingest", "/nonexistent/src", "--db", "DB"], "does not exist"),
        (["query", "x", "--db", "/nonexistent/db"], "not an embedpipe db"),
        (["eval", "/nonexistent/beir", "--db", "DB"], "not a BEIR collection"),
        (["query", "x", "--db", "DB", "--mode", "sparse"], "'vector', 'text' or 'hybrid'"),
        (["query", "x", "--db", "DB", "--mode", "hybrid", "--weight", "2"], "less than or equal to 1"),
    ],
)
def test_errors_are_one_clear_line(tmp_path, args, message):
    args = [str(tmp_path / "db") if a == "DB" else a for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert message in " ".join(result.output.split())  # the console may wrap a long line
    assert "Traceback" not in result.output


def test_bad_config_is_reported(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("shards: -1\n")
    (tmp_path / "a.txt").write_text("x")
    result = runner.invoke(
        app, ["ingest", str(tmp_path / "a.txt"), "--db", str(tmp_path / "db"), "--config", str(config)]
    )
    assert result.exit_code == 1
    assert "shards" in result.output


def test_quantize_calibrates_int8_on_the_corpus_and_refuses_too_little(
    ray_local, mini_beir, tmp_path, monkeypatch
):
    """`embedpipe quantize` makes the int8 model from the corpus's first chunks (once per machine); a corpus
    too small to calibrate on is one clear error."""
    monkeypatch.setenv("EMBEDPIPE_CACHE", str(tmp_path / "cache"))
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text(
        "".join(
            json.dumps({"_id": str(i), "title": "T", "text": f"Short text {i}."}) + "\n" for i in range(3)
        )
    )
    refused = runner.invoke(app, ["quantize", str(tiny)])
    assert refused.exit_code == 1 and "int8 needs 64 chunks" in " ".join(refused.output.split())
    result = runner.invoke(app, ["quantize", str(mini_beir / "corpus.jsonl")])
    assert result.exit_code == 0, result.output
    (meta,) = (tmp_path / "cache").glob("int8/**/meta.json")
    calibrated = json.loads(meta.read_text())["calibration_texts"]
    assert calibrated >= 64 and f"calibrated on {calibrated} chunks" in " ".join(result.output.split())


def test_sample_corpus(tmp_path):
    result = runner.invoke(app, ["sample-corpus", str(tmp_path / "topics")])
    assert result.exit_code == 0
    files = list((tmp_path / "topics").glob("*.rst"))
    assert len(files) > 50


@pytest.mark.slow
def test_console_shows_progress_and_summary_and_the_log_file_has_the_rest(tmp_path, mini_beir):
    """A real `embedpipe ingest` process, with its own embedded Ray: the console carries our lines
    (and errors), the run's log file next to the report carries Ray's; -v brings Ray's back."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    command = [str(Path(sys.executable).parent / "embedpipe"), "ingest", str(mini_beir / "corpus.jsonl")]
    quiet = subprocess.run([*command, "--db", str(tmp_path / "a")], env=env, capture_output=True, text=True)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "ingested" in quiet.stdout
    noise = [
        line
        for line in quiet.stderr.splitlines()
        if line.strip()
        # a first run on a machine says it quantizes / measures the backends, once
        and " NOTICE " not in line
    ]
    assert all(line.startswith(("ingest:", "report:", "log:")) for line in noise), noise
    log = Path(noise[-1].split(":", 1)[1].strip())
    assert log.parent == tmp_path / "a" / "_runs" and log.suffix == ".log"
    assert "Starting execution of Dataset" in log.read_text()  # Ray Data's INFO, in the file only

    loud = subprocess.run(
        [str(Path(sys.executable).parent / "embedpipe"), "-v", *command[1:], "--db", str(tmp_path / "b")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert "Starting execution of Dataset" in loud.stderr
    # -v keeps Ray's C++ line about actor restarts (ray#53727) that the default console drops
    assert "has constructor arguments in the object store" in loud.stderr
    assert "has constructor arguments" not in quiet.stderr


RELAYED = r"""
import os, sys
from pipelines.stderr_relay import relay_stderr
with relay_stderr():
    os.write(2, b"[2026-12-02 07:13:18,249 E 1 1] core_worker.cc:2465: Actor with class name: 'MapWorker(A)' "
                b"and ID: 'ab' has constructor arguments in the object store and max_restarts > 0. ...\n")
    os.write(2, b"[2026-12-02 07:13:18,250 E 1 1] core_worker.cc:900: something else went wrong\n")
    print("from python", file=sys.stderr)
    if sys.argv[1] == "crash":
        os.write(2, b"a last word before the crash\n")
        os._exit(3)
    if sys.argv[1] == "interrupt":  # Ctrl-C reaches the whole process group; the run goes on here
        import signal, time
        signal.signal(signal.SIGINT, lambda *a: None)
        os.killpg(os.getpgid(0), signal.SIGINT)
        time.sleep(0.5)
        os.write(2, b"after the interrupt\n")
os.write(2, b"after the block\n")
"""


@pytest.mark.parametrize("ending", ["normal", "crash", "interrupt"])
def test_the_stderr_relay_drops_only_the_known_line_and_loses_nothing_on_a_crash(ending):
    """Ray's one harmless C++ line goes; any other C-level line, Python's own output, and the last
    line of a process that dies at once still reach standard error."""
    done = subprocess.run(
        [sys.executable, "-c", RELAYED, ending], capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).resolve().parent.parent, start_new_session=True,  # its own process group
    )  # fmt: skip
    assert "has constructor arguments" not in done.stderr
    assert "core_worker.cc:900: something else went wrong" in done.stderr
    assert "from python" in done.stderr
    if ending == "crash":
        assert done.returncode == 3
        # the relay outlives the process and drains the pipe (run waits for the pipe to close)
        assert "a last word before the crash" in done.stderr
    else:
        assert done.returncode == 0, done.stderr
        assert "after the block" in done.stderr
    if ending == "interrupt":
        assert "after the interrupt" in done.stderr


def test_the_stderr_relay_leaves_a_replaced_sys_stderr_alone(monkeypatch):
    """Under a test runner (or CliRunner) sys.stderr is a buffer: what Python prints stays there."""
    import io

    from pipelines.stderr_relay import relay_stderr

    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buffer)
    with relay_stderr():
        assert sys.stderr is buffer
        print("into the buffer", file=sys.stderr)
    assert sys.stderr is buffer and buffer.getvalue() == "into the buffer\n"
