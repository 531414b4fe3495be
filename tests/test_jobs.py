"""`ray job submit -- embedpipe ingest ...` against a Ray head started for this test on 127.0.0.1.

The head gets its own temp dir, its own ports and its own token (Ray 2.60 turns token auth on), so it
cannot meet the session's embedded Ray or anyone else's. Teardown stops exactly the processes of this
head (found by its temp dir, and their children); `ray stop` would stop every Ray on the machine.
"""

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from pipelines import store
from tests.conftest import scifact_docs

BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _stop_head(temp_dir: str) -> int:
    """Terminate the processes of the head that lives in ``temp_dir``; returns how many there were."""
    me = os.getpid()
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid != me and any(temp_dir in arg for arg in proc.info["cmdline"] or []):
            roots.append(proc)
    procs = {}
    for root in roots:
        try:
            procs.update({p.pid: p for p in [root, *root.children(recursive=True)]})
        except psutil.Error:
            continue
    for proc in procs.values():
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(list(procs.values()), timeout=15)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return len(procs)


@pytest.fixture(scope="module")
def head():
    temp_dir = tempfile.mkdtemp(prefix="ep-head-", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard, client, agent, agent_grpc, metrics, runtime_env, node, objects = _free_ports(9)
    command = [
        str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
        f"--node-manager-port={node}", f"--object-manager-port={objects}", "--num-cpus=2",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]  # fmt: skip
    try:
        started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, check=False)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-3000:]
        yield {"env": env, "url": f"http://127.0.0.1:{dashboard}", "gcs": f"127.0.0.1:{gcs}"}
    finally:
        stopped = _stop_head(temp_dir)
        print(f"\nstopped {stopped} processes of the head in {temp_dir}")
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray(head, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ray"), *args],
        env=head["env"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.slow
def test_job_submit_ingest(head, tmp_path, scifact):
    docs = scifact_docs(30)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    db, report_path = tmp_path / "db", tmp_path / "report.json"
    job_id = f"embedpipe-test-{secrets.token_hex(4)}"
    submitted = _ray(
        head, "job", "submit", "--address", head["url"], "--submission-id", job_id, "--",
        str(BIN / "embedpipe"), "ingest", str(corpus), "--db", str(db), "--shards", "2",
        "--report", str(report_path),
    )  # fmt: skip
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, output[-5000:]
    assert f"Job '{job_id}' succeeded" in output
    status = _ray(head, "job", "status", "--address", head["url"], job_id, timeout=120)
    assert f"Job '{job_id}' succeeded" in status.stdout + status.stderr

    # The job's driver joined this head (RAY_ADDRESS is set in a job) instead of starting its own Ray.
    tasks = _ray(head, "list", "tasks", "--address", head["gcs"], "--format", "json", "--limit", "10000")
    assert tasks.returncode == 0, tasks.stderr[-2000:]
    names = [t["name"] for t in json.loads(tasks.stdout)]
    assert "MapBatches(write_chunks)" in names

    report = json.loads(report_path.read_text())
    assert report["docs"] == {"seen": 30, "ingested": 30, "unchanged": 0, "failed": 0}
    rows = [
        r
        for t in store.open_shards(db).values()
        for r in t.to_arrow().select(["chunk_id", "doc_id"]).to_pylist()
    ]
    assert len(rows) == report["chunks"]["written"] == len({r["chunk_id"] for r in rows})
    assert {r["doc_id"] for r in rows} == {d["_id"] for d in docs}
    print(f"job {job_id}: {report['docs']}, {len(rows)} chunks in {report['shards']}, {report['wall_s']} s")
